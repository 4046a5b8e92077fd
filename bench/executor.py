"""Candidate evaluation on Ray workers against serial: the same allocations, the same numbers, the wall time.

    python bench/executor.py [--model ../shared/models/bench-a --data ../shared/data] [--workers 2]
        [--allocations 8] [--windows 4] [--seqlen 256] [--out executor.json]

Without ``--model`` a random-weight Llama of bench-a's shape is built here (seed 0) and evaluated on
random tokens; with it, on the first ``--windows`` WikiText-2 test windows. ``--allocations`` random
allocations over ``--formats`` (seed 0) are evaluated by an RTN ``AllocationEvaluator`` here with one
torch thread, then by a ``PooledEvaluator`` on a local Ray cluster of ``--workers`` CPUs (one
worker per CPU, one torch thread each) in one ``map``, as ``--verify K`` does. For context, the
serial evaluator also runs with ``--workers`` torch threads (all the cores, no Ray; its numbers may
differ in the last bits). ``setup_s`` is building the evaluator (the Ray row: starting the actors,
shipping the model, each actor's weight cache), ``eval_s`` the evaluations; ``speedup`` is the serial
one-thread ``eval_s`` over the row's. ``identical`` says whether the row's losses equal the serial
one-thread losses bit for bit.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))

from automp.allocation import Allocation  # noqa: E402
from automp.data import load_windows  # noqa: E402
from automp.execution.executor import get_executor  # noqa: E402
from automp.model import inventory, load_model  # noqa: E402
from automp.search.evaluator import AllocationEvaluator  # noqa: E402
from automp.search.pooled import PooledEvaluator  # noqa: E402
from common import WIKITEXT, Timer, markdown_table, report  # noqa: E402

BENCH_A = Path(__file__).parent.parent.parent / "shared" / "models" / "bench-a"


def bench_model(args) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """(model, evaluation windows, what they are)."""
    if args.model:
        model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
        windows = load_windows(str(Path(args.data) / WIKITEXT), tokenizer, args.seqlen)[: args.windows]
        return model, windows, f"{args.model}, WikiText-2 test"
    config = AutoConfig.from_pretrained(BENCH_A)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    windows = torch.randint(
        0, config.vocab_size, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0)
    )
    return model, windows, "random bench-a-shaped Llama, random tokens"


def allocations(model: torch.nn.Module, formats: list[str], count: int) -> list[Allocation]:
    names = [layer.name for layer in inventory(model).layers]
    rng = np.random.default_rng(0)
    return [Allocation(formats={name: formats[rng.integers(len(formats))] for name in names}) for _ in range(count)]


def serial_row(model, windows, formats, candidates, threads: int) -> dict:
    torch.set_num_threads(threads)
    with Timer() as setup:
        evaluator = AllocationEvaluator(model, windows, formats)
    with Timer() as timer, evaluator:
        losses = [evaluator(allocation) for allocation in candidates]
    torch.set_num_threads(1)
    return {
        "executor": f"serial, {threads} thread(s)",
        "setup_s": setup.seconds,
        "eval_s": timer.seconds,
        "losses": losses,
    }


def ray_row(model, windows, formats, candidates, workers: int) -> dict:
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        with get_executor("ray") as executor:
            with Timer() as setup:
                evaluator = PooledEvaluator(executor.pool(partial(AllocationEvaluator, model, windows, formats)))
            with Timer() as timer:
                losses = evaluator.map(candidates)
            label = f"ray, {evaluator.workers} workers x 1 thread"
    finally:
        ray.shutdown()
    return {"executor": label, "setup_s": setup.seconds, "eval_s": timer.seconds, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory (default: a random model of bench-a's shape)")
    parser.add_argument("--data", help="the shared data directory (with --model)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--allocations", type=int, default=8)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--formats", default="w2g64,w3g128,w4g128,w8,fp16")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.model and not args.data:
        parser.error("--model needs --data (the WikiText-2 windows)")

    torch.set_num_threads(1)
    model, windows, source = bench_model(args)
    formats = args.formats.split(",")
    candidates = allocations(model, formats, args.allocations)
    rows = [serial_row(model, windows, formats, candidates, 1)]
    rows.append(ray_row(model, windows, formats, candidates, args.workers))
    rows.append(serial_row(model, windows, formats, candidates, args.workers))
    for row in rows:
        row["speedup"] = rows[0]["eval_s"] / row["eval_s"]
        row["identical"] = row["losses"] == rows[0]["losses"]
    payload = {
        "model": source,
        "windows": list(windows.shape),
        "allocations": args.allocations,
        "formats": formats,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    columns = [
        ("executor", "executor", "s"),
        ("setup_s", "setup s", ".2f"),
        ("eval_s", f"{args.allocations} evaluations s", ".2f"),
        ("speedup", "speed-up", ".2f"),
        ("identical", "same losses", ""),
    ]
    report("Candidate evaluation: Ray workers vs serial", payload, markdown_table(rows, columns), args.out)


if __name__ == "__main__":
    main()
