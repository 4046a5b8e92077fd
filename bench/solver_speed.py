"""How fast the deterministic solvers re-solve from a cached sensitivity table.

    python bench/solver_speed.py [--blocks 32] [--repeats 3] [--out solver_speed.json]

The table has the shape of Llama-2-7B's: 32 blocks x 7 linear layers (q, k, v, o 4096x4096; gate,
up 11008x4096; down 4096x11008) = 224 layers x 6 formats, with exact stored bits from the format
registry. Its predicted losses are synthetic (a log-normal sensitivity per layer times a loss that
falls 4x per bit), which is all a solver's speed depends on. Times are wall seconds per solve,
including turning the table into matrices, the median of ``--repeats`` runs. ``knapsack (milp)`` is
the exact knapsack's fallback algorithm, timed for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from automp.formats import get_format  # noqa: E402
from automp.search.frontier import frontier  # noqa: E402
from automp.search.knapsack import Knapsack  # noqa: E402
from automp.search.problem import Problem  # noqa: E402
from automp.search.registry import get_solver  # noqa: E402
from automp.sensitivity.table import PROXIES, CalibInfo, FormatCost, LayerStats, SensitivityTable  # noqa: E402
from common import markdown_table, report  # noqa: E402

FORMATS = ["w2g64", "w3g128", "w4g128", "nf4g64", "w8", "fp16"]
SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096)}
SHAPES |= {"gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
TARGETS = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0)


def llama_table(blocks: int, seed: int = 0) -> SensitivityTable:
    rng = np.random.default_rng(seed)
    layers, costs, fused = [], {}, []
    stats = dict(act_absmean=1.0, act_std=1.0, act_max=8.0, act_kurtosis=3.0, weight_absmean=0.02)
    stats |= dict(weight_std=0.03, weight_max=0.3, weight_kurtosis=3.0)
    for block in range(blocks):
        names = {role: f"model.layers.{block}.{role}_proj" for role in SHAPES}
        fused += [[names["q"], names["k"], names["v"]], [names["gate"], names["up"]]]
        for role, (out, inp) in SHAPES.items():
            layer = LayerStats(name=names[role], block=block, role=role, out_features=out, in_features=inp, **stats)
            layers.append(layer)
            sensitivity = rng.lognormal(0.0, 1.5)
            costs[layer.name] = {}
            for name in FORMATS:
                fmt = get_format(name)
                bits = fmt.storage_bits(out, inp)
                base = sensitivity * 4.0 ** -(bits / layer.numel) if fmt.quantized else 0.0
                noisy = {field: base * rng.uniform(0.8, 1.25) for field in PROXIES.values() if field != "kl"}
                costs[layer.name][name] = FormatCost(bits=bits, **noisy)
    calib = CalibInfo(spec="synthetic", nsamples=128, seqlen=2048, seed=seed)
    return SensitivityTable(
        model="llama-2-7b-shaped", formats=FORMATS, layers=layers, costs=costs, fused=fused, calib=calib, dense_bytes=0
    )


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    table = llama_table(args.blocks)
    with tempfile.TemporaryDirectory() as tmp:
        table.save(Path(tmp))
        load_seconds, table = timed(lambda: SensitivityTable.load(Path(tmp)), args.repeats)
    solvers = {
        "knapsack": Knapsack(),
        "knapsack (milp)": Knapsack("milp"),
        "greedy": get_solver("greedy"),
        "quantile": get_solver("quantile"),
    }
    rows = []
    for tie_fused in (False, True):
        for target in TARGETS:
            problem = Problem(table, target_bits=target, tie_fused=tie_fused)
            row: dict = {"target_bits": target, "tie_fused": tie_fused}
            for label, solver in solvers.items():
                seconds, solution = timed(lambda s=solver, p=problem: s.solve(p), args.repeats)
                row[f"{label} s"] = seconds
                row[f"{label} loss"] = solution.predicted_loss
            rows.append(row)
    frontier_seconds, points = timed(lambda: frontier(Problem(table), 2.5, 8.0, 0.25), args.repeats)
    payload = {
        "layers": len(table.layers),
        "formats": FORMATS,
        "weights": table.weight_count(),
        "table_load_seconds": load_seconds,
        "frontier_2.5_8_0.25_seconds": frontier_seconds,
        "frontier_points": len(points),
        "rows": rows,
    }
    columns = [("target_bits", "target bits", "g"), ("tie_fused", "tied", "")]
    for label in solvers:
        columns += [(f"{label} s", f"{label} s", ".3f"), (f"{label} loss", f"{label} loss", ".5g")]
    table_md = markdown_table(rows, columns)
    table_md += f"\n\nTable load {load_seconds:.2f} s; frontier 2.5:8:0.25 ({len(points)} points, knapsack) "
    table_md += f"{frontier_seconds:.2f} s."
    report(f"Solver speed: {len(table.layers)} layers x {len(FORMATS)} formats", payload, table_md, args.out)


if __name__ == "__main__":
    main()
