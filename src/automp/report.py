"""``automp report DIR``: an HTML page of plots about one ``automp run`` directory.

``DIR/report/index.html`` references PNG files beside it (matplotlib, Agg backend) and holds a small
table of the run's metrics. Sections:

* **sensitivity**: the proxy of every layer at one reference format, as a heat map of blocks x roles
  (log scale);
* **allocation**: the bits per weight of each layer's chosen format, blocks x roles, with the rank of
  each low-rank correction (``+rN``) written in its cell;
* **frontier**: the predicted loss vs average bits (``search.frontier`` on the saved table), with each
  uniform format and the run's own allocation marked;
* **statistics**: input-activation and weight statistics per layer;
* **learning curves**: PPL (or KL), memory saving and reward per episode, when a learned solver saved a
  curve (``allocation.json.curve.json``);
* **calibration stability** (``bootstrap.json``, from ``automp run --bootstrap N``): the share of
  resamples of the calibration windows that keep each layer's format, blocks x roles, with the 95 %
  confidence interval of the allocation's predicted loss in the title;
* **seeds** (``--seeds N`` only): the final PPL of N runs of search + quantize + evaluate with seeds
  0..N-1, as a box plot. Each seed re-quantizes the model, so this is the slow section; with
  ``--executor ray`` the seeds run in parallel, one whole run per worker (serially inside it).

A section whose input is missing says so on the page instead of failing the report.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from automp.errors import AutompError
from automp.execution.executor import Executor, SerialExecutor
from automp.formats import get_format
from automp.sensitivity.table import TABLE_FILE, SensitivityTable

if TYPE_CHECKING:
    from automp.settings import RunSettings

REPORT_DIR = "report"
CURVE_SUFFIX = ".curve.json"
REFERENCE_FORMATS = ("w4g128", "w4g64", "w4", "w3g128")  # preferred reference for the sensitivity map


def write_report(run_dir: Path, seeds: int = 0, progress: bool = True, executor: Executor | None = None) -> dict:
    """Write ``run_dir/report/index.html`` and its PNGs; returns the page's path and each section's state.
    ``executor`` (default: serial) runs the seeds."""
    from automp.io import staged_output
    from automp.pipeline import ALLOCATION_FILE
    from automp.search.result import SearchResult

    run_dir = Path(run_dir)
    if not (run_dir / TABLE_FILE).is_file():
        raise AutompError(f"{run_dir} is not an `automp run` directory (no {TABLE_FILE})")
    if seeds < 0:
        raise AutompError(f"--seeds must be at least 0, got {seeds}")
    table = SensitivityTable.load(run_dir / TABLE_FILE)
    result = SearchResult.load(run_dir / ALLOCATION_FILE) if (run_dir / ALLOCATION_FILE).is_file() else None
    metrics = _read_json(run_dir / "metrics.json") or {}
    curve = _read_json(run_dir / (ALLOCATION_FILE + CURVE_SUFFIX))
    proxy = result.proxy if result is not None else "hessian"

    sections: list[tuple[str, str, Callable[[Path], str | None]]] = [
        ("verification", "Verified delivery", lambda path: _verification(run_dir, path)),
        ("sensitivity", "Per-layer sensitivity", lambda path: _sensitivity(table, proxy, path)),
        ("allocation", "Allocation", lambda path: _allocation(table, result, path)),
        ("frontier", "Pareto frontier (predicted)", lambda path: _frontier(table, result, proxy, path)),
        ("statistics", "Weight and activation statistics", lambda path: _statistics(table, path)),
        ("curves", "Learning curves", lambda path: _curves(curve, path)),
        ("stability", "Calibration stability (bootstrap)", lambda path: _stability(run_dir, table, path)),
    ]
    if seeds:
        draw = partial(_seeds, run_dir, seeds, progress=progress, executor=executor or SerialExecutor())
        sections.append(("seeds", "Final PPL across seeds", draw))
    out = run_dir / REPORT_DIR
    states: dict[str, str] = {}
    parts = [f"<h1>automp report: {html.escape(str(run_dir.resolve().name))}</h1>", _metrics_table(metrics, table)]
    with staged_output(out) as staging:
        for key, title, draw in sections:
            missing = draw(staging / f"{key}.png")  # None when drawn, else why not
            states[key] = "drawn" if missing is None else "missing"
            body = f'<img src="{key}.png" alt="{html.escape(title)}">' if missing is None else f"<p>{missing}</p>"
            parts.append(f"<h2>{html.escape(title)}</h2>\n{body}")
        page = "<!doctype html>\n<html><head><meta charset='utf-8'><title>automp report</title>"
        page += "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}img{max-width:100%}"
        page += "td,th{padding:2px 8px;text-align:left}</style></head><body>\n"
        page += "\n".join(parts) + "\n</body></html>\n"
        (staging / "index.html").write_text(page)
    return {"index": str(out / "index.html"), "sections": states}


def _read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise AutompError(f"could not read {path}: {err}") from err


def _metrics_table(metrics: dict, table: SensitivityTable) -> str:
    rows = {"model": table.model, "layers": len(table.layers), "profiled formats": ", ".join(table.formats)}
    keys = ("delivered", "solver", "proxy", "method", "target_bits", "avg_bits", "bytes", "predicted_loss", "ppl")
    for key in (*keys, "seconds"):
        if key in metrics:
            value = metrics[key]
            rows[key] = f"{value:.6g}" if isinstance(value, float) else value
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(table: SensitivityTable, values: dict[str, float]) -> tuple[np.ndarray, list[int], list[str]]:
    """(blocks, roles) array of ``values`` by layer name; NaN where a block has no such role."""
    blocks = sorted({layer.block for layer in table.layers})
    roles = list(dict.fromkeys(layer.role for layer in table.layers))
    grid = np.full((len(blocks), len(roles)), np.nan)
    for layer in table.layers:
        if layer.name in values:
            grid[blocks.index(layer.block), roles.index(layer.role)] = values[layer.name]
    return grid, blocks, roles


def _heatmap(
    grid: np.ndarray, blocks: list[int], roles: list[str], title: str, label: str, path: Path,
    notes: dict[tuple[int, int], str] | None = None, **kw,
) -> None:  # fmt: skip
    """``notes``: text written into cells, by (block row, role column)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(roles), 1.2 + 0.35 * len(blocks)))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", **kw)
    for (row, col), text in (notes or {}).items():
        ax.text(col, row, text, ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(roles)), roles)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_xlabel("role")
    ax.set_ylabel("block")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _reference_format(table: SensitivityTable) -> str | None:
    quantized = [f for f in table.formats if get_format(f).quantized]
    preferred = [f for f in REFERENCE_FORMATS if f in quantized]
    return (preferred or sorted(quantized, key=lambda f: -get_format(f).bits))[0] if quantized else None


def _sensitivity(table: SensitivityTable, proxy: str, path: Path) -> str | None:
    from matplotlib.colors import LogNorm

    reference = _reference_format(table)
    if reference is None:
        return "No quantized format was profiled, so there is no sensitivity to show."
    column = table.proxy_matrix(proxy)[:, table.format_index(reference)]
    values = {layer.name: float(v) for layer, v in zip(table.layers, column, strict=True) if v > 0}
    if not values:
        return f"Every layer's {proxy} proxy at {reference} is zero."
    grid, blocks, roles = _grid(table, values)
    norm = LogNorm(vmin=min(values.values()), vmax=max(values.values()))
    _heatmap(grid, blocks, roles, f"{proxy} proxy at {reference}", f"{proxy} (log scale)", path, norm=norm)
    return None


def _allocation(table: SensitivityTable, result, path: Path) -> str | None:
    if result is None:
        return "No allocation.json in the run directory."
    sizes = {layer.name: layer for layer in table.layers}
    bits = {
        name: get_format(fmt).bits_per_weight(sizes[name].out_features, sizes[name].in_features)
        for name, fmt in result.formats.items()
        if name in sizes
    }
    grid, blocks, roles = _grid(table, bits)
    notes = {  # the low-rank corrections' ranks (their bytes are in the colour already)
        (blocks.index(sizes[name].block), roles.index(sizes[name].role)): f"r{get_format(fmt).rank}"
        for name, fmt in result.formats.items()
        if name in sizes and get_format(fmt).rank
    }
    title = f"{result.solver} at {result.target_bits:g} bits" + (" (rN: low-rank correction)" if notes else "")
    _heatmap(grid, blocks, roles, title, "bits per weight (corrections included)", path, notes)
    return None


def _frontier(table: SensitivityTable, result, proxy: str, path: Path) -> str | None:
    from automp.search.frontier import frontier
    from automp.search.grouped import Grouped
    from automp.search.problem import Problem

    problem = Problem(table=table, proxy=proxy, allowed=result.allowed if result else None)
    grouped = Grouped.of(problem)
    lo, hi = grouped.min_avg_bits(), float(table.bits_matrix().max(axis=1).sum() / table.weight_count())
    step = max((hi - lo) / 40, 1e-3)
    points = frontier(problem, lo, hi, step)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.step([p.avg_bits for p in points], [p.predicted_loss for p in points], where="post", label="knapsack frontier")
    bits, loss = table.bits_matrix(), table.proxy_matrix(proxy)
    for j, fmt in enumerate(table.formats):
        avg = bits[:, j].sum() / table.weight_count()
        ax.scatter([avg], [loss[:, j].sum()], marker="s", zorder=3)
        ax.annotate(fmt, (avg, loss[:, j].sum()), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if result is not None:
        ax.scatter([result.avg_bits], [result.predicted_loss], marker="*", s=160, c="red", zorder=4, label="this run")
    ax.set_yscale("symlog", linthresh=_linear_threshold(loss))
    ax.set_xlabel("average stored bits per weight")
    ax.set_ylabel(f"predicted loss ({proxy}, summed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def _linear_threshold(loss: np.ndarray) -> float:
    positive = loss[loss > 0]
    return float(positive.min()) if positive.size else 1.0


def _statistics(table: SensitivityTable, path: Path) -> str | None:
    plt = _pyplot()
    fields = [
        ("act_max", "input max |x|"),
        ("act_kurtosis", "input kurtosis"),
        ("weight_max", "weight max |w|"),
        ("weight_kurtosis", "weight kurtosis"),
    ]
    x = np.arange(len(table.layers))
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    for ax, (field, title) in zip(axes.flat, fields, strict=True):
        ax.bar(x, [getattr(layer, field) for layer in table.layers])
        ax.set_title(title)
        ax.set_yscale("log" if all(getattr(layer, field) > 0 for layer in table.layers) else "linear")
    for ax in axes[1]:
        ax.set_xticks(x, [f"{layer.block}.{layer.role}" for layer in table.layers], rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def _verification(run_dir: Path, path: Path) -> str | None:
    """Each candidate's measured NLL difference to the best uniform one (2 SE bars), the delivered one marked."""
    from automp.delivery import VERIFICATION_FILE, Verification

    if not (run_dir / VERIFICATION_FILE).is_file():
        return "The run was not verified (--no-verify): its allocation was delivered on the proxy alone."
    record = Verification.model_validate_json((run_dir / VERIFICATION_FILE).read_text())
    if record.best_uniform is None:
        return f"No uniform format fits the budget; delivered {record.delivered} ({record.reason})."
    plt = _pyplot()
    rows = sorted(record.candidates, key=lambda c: c.nll)
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.4 * len(rows)))
    colors = ["tab:green" if c.label == record.delivered else "tab:gray" if c.kind == "uniform" else "tab:blue"
              for c in rows]  # fmt: skip
    ax.barh(range(len(rows)), [c.delta_nll for c in rows], xerr=[2 * (c.se or 0) for c in rows], color=colors)
    ax.set_yticks(range(len(rows)), [f"{c.label} ({c.avg_bits:.3f} b)" for c in rows])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"NLL per token minus {record.best_uniform} (bars: 2 SE over {record.windows} windows)")
    ax.set_title(f"delivered: {record.delivered} (green); {record.reason}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def _curves(curve: list | None, path: Path) -> str | None:
    if not curve:
        return "No learning curve: the allocation came from a solver that does not learn (knapsack, greedy, quantile)."
    metric = next((key for key in ("ppl", "kl", "loss") if key in curve[0]), None)
    panels = [(key, key) for key in (metric, "memory_saving", "reward") if key is not None and key in curve[0]]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    episodes = [row.get("episode", i) for i, row in enumerate(curve)]
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        ax.plot(episodes, [row[key] for row in curve])
        ax.set_title(title)
        ax.set_xlabel("episode")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def _stability(run_dir: Path, table: SensitivityTable, path: Path) -> str | None:
    from automp.search.bootstrap import BOOTSTRAP_FILE, BootstrapResult

    if not (run_dir / BOOTSTRAP_FILE).is_file():
        return (
            f"No {BOOTSTRAP_FILE} in the run directory: run `automp run ... --bootstrap N` to re-solve on N "
            "resamples of the calibration windows and see how stable each layer's format is."
        )
    result = BootstrapResult.load(run_dir / BOOTSTRAP_FILE)
    grid, blocks, roles = _grid(table, {layer.name: layer.stability for layer in result.layers})
    ci = result.allocation_loss
    title = (
        f"format stability over {result.n} resamples ({result.proxy}, {result.target_bits:g} bits)\n"
        f"predicted loss {result.predicted_loss:.4g}, 95% CI [{ci.low:.4g}, {ci.high:.4g}]"
    )
    _heatmap(grid, blocks, roles, title, "share of resamples keeping the format", path, vmin=0, vmax=1, cmap="RdYlGn")
    return None


def _seeds(run_dir: Path, count: int, path: Path, *, progress: bool, executor: Executor) -> str | None:
    ppls = seed_ppls(run_dir, count, progress, executor)
    if not ppls:
        return "The run has no evaluation text (--eval), so there is no PPL to compare across seeds."
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.boxplot([ppls])
    ax.scatter(np.ones(len(ppls)), ppls, s=12, c="black", zorder=3)
    ax.set_xticks([1], [f"{count} seeds"])
    ax.set_ylabel("perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def seed_ppls(run_dir: Path, count: int, progress: bool = True, executor: Executor | None = None) -> list[float]:
    """Final PPL of the run repeated with seeds 0..count-1 (solver, calibration and verification windows).

    Each seed is a whole ``automp run`` with the run's own settings (``automp_config.json``), search and
    verification included, on its cached sensitivity table; nothing is kept but the numbers. Empty when
    the run had no evaluation text. ``executor`` (default: serial) runs the seeds; on a remote one each
    seed is one job, run serially on its worker.
    """
    import tempfile

    from automp.settings import RunSettings

    settings = RunSettings.model_validate_json((run_dir / "automp_config.json").read_text())
    if settings.eval is None:
        return []
    executor = executor or SerialExecutor()
    if executor.remote:  # a worker runs its seed itself: no pool inside a pool
        settings = settings.model_copy(update={"executor": "serial", "ray_address": None})
    scratch = Path(tempfile.mkdtemp(prefix="automp-seeds-"))
    try:
        with executor.pool(partial(_Rerun, run_dir, settings, scratch, progress and not executor.remote)) as pool:
            ppls = pool.map(_Rerun.ppl, range(count))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [p for p in ppls if math.isfinite(p)]


@dataclass
class _Rerun:
    """``run_dir``'s run repeated under other seeds, each in its own directory under ``scratch``."""

    run_dir: Path
    settings: RunSettings
    scratch: Path
    progress: bool

    def ppl(self, seed: int) -> float:
        """The final PPL of the run under ``seed``, on the run's cached sensitivity table."""
        from automp.pipeline import run
        from automp.sensitivity.windows import WINDOWS_FILE

        out = self.scratch / f"seed-{seed}"
        out.mkdir()
        for name in (TABLE_FILE, WINDOWS_FILE):  # the measured table is reused, not measured again
            if (self.run_dir / name).is_file():
                shutil.copyfile(self.run_dir / name, out / name)
        return run(self.settings.model_copy(update={"out": out, "seed": seed}), progress=self.progress)["ppl"]
