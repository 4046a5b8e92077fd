"""Uniform quantization on a benchmark model: FP16, RTN and GPTQ per format (plus AWQ at 4 and 3 bits),
and our GPTQ and AWQ next to llmcompressor's on the same calibration windows and scheme.

    python bench/uniform.py --model ../shared/models/bench-a --data ../shared/data

ΔPPL is against the FP16 model; ``±`` is the paired standard error of the mean per-window NLL
difference (a difference smaller than ~2 SE is not a real one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from automp.allocation import Allocation  # noqa: E402
from automp.checkpoint import model_bytes  # noqa: E402
from automp.model import inventory  # noqa: E402
from automp.quantize import quantize_  # noqa: E402
from common import Bench, RowCache, Timer, markdown_table, report  # noqa: E402

FORMATS = ("w8", "w4g128", "w3g128", "w2g64", "nf4g64")
AWQ_FORMATS = ("w4g128", "w3g128")
LLMCOMPRESSOR_FORMATS = ("w4g128", "w3g128")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--no-llmcompressor", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--work", help="cache every finished row here, so a rerun resumes")
    args = parser.parse_args()
    cache = RowCache(Path(args.work)) if args.work else None

    bench = Bench.load(args.model, args.data, args.nsamples)
    inv = inventory(bench.model)
    rows = [
        {
            "format": "fp16",
            "method": "-",
            "avg_bits": 16.0,
            "mb": model_bytes(bench.model, {}) / 1e6,
            "ppl": bench.baseline.ppl,
            "delta_ppl_pct": 0.0,
        }
    ]
    for scheme in args.formats.split(","):
        for method in ("rtn", "gptq", "awq") if scheme in AWQ_FORMATS else ("rtn", "gptq"):
            if cache and (row := cache.get(f"{scheme}-{method}")):
                rows.append(row)
                continue
            model = bench.reset()
            allocation = Allocation.uniform(inv, scheme)
            with Timer() as timer:
                qweights = quantize_(model, allocation, method, bench.calib, progress=False)
            rows.append(
                {
                    "format": scheme,
                    "method": method,
                    "avg_bits": allocation.avg_bits(inv),
                    "mb": model_bytes(model, qweights) / 1e6,
                    "seconds": timer.seconds,
                    **bench.compare(),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
            if cache:
                cache.put(f"{scheme}-{method}", rows[-1])

    versus = []
    if not args.no_llmcompressor:
        from baselines import llmcompressor_quantize

        for scheme in LLMCOMPRESSOR_FORMATS:
            for method in ("gptq", "awq"):
                ours = next((r for r in rows if r["format"] == scheme and r["method"] == method), None)
                if ours is None:  # not among --formats
                    continue
                key = f"{scheme}-llmcompressor-{method}"
                if not (cache and (row := cache.get(key))):
                    with Timer() as timer:
                        theirs = llmcompressor_quantize(args.model, scheme, bench.calib, method)
                    bits = Allocation.uniform(inv, scheme).avg_bits(inv)
                    row = {
                        "format": scheme,
                        "method": f"llmcompressor-{method}",
                        "avg_bits": bits,
                        "seconds": timer.seconds,
                        **bench.compare(theirs),
                    }
                    print(row, file=sys.stderr, flush=True)
                    if cache:
                        cache.put(key, row)
                rows.append(row)
                versus.append(
                    {
                        "format": scheme,
                        "method": method,
                        "ppl_ratio": ours["ppl"] / row["ppl"],
                        "time_ratio": ours["seconds"] / row["seconds"],
                    }
                )

    columns = [
        ("format", "format", ""),
        ("method", "method", ""),
        ("avg_bits", "avg bits", ".3f"),
        ("mb", "MB", ".2f"),
        ("ppl", "PPL", ".2f"),
        ("delta_ppl_pct", "ΔPPL %", "+.2f"),
        ("delta_nll_se", "± (NLL SE)", ".5f"),
        ("seconds", "seconds", ".1f"),
    ]
    table = markdown_table(rows, columns)
    if versus:
        table += "\n\n" + markdown_table(
            versus,
            [
                ("format", "format", ""),
                ("method", "method", ""),
                ("ppl_ratio", "PPL ours/llmcompressor", ".4f"),
                ("time_ratio", "time ours/llmcompressor", ".2f"),
            ],
        )
    payload = {
        "model": args.model,
        "eval_windows": bench.baseline.windows,
        "seqlen": bench.baseline.seqlen,
        "nsamples": args.nsamples,
        "rows": rows,
        "versus_llmcompressor": versus,
    }
    report("uniform quantization", payload, table, args.out)


if __name__ == "__main__":
    main()
