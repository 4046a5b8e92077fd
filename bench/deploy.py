"""Deployable output on a benchmark model: compressed-tensors export, reload in plain transformers,
zero-shot accuracy of FP16 and quantized models, memory and speed.

    python bench/deploy.py --model ../shared/models/bench-a --data ../shared/data \\
        --allocation /tmp/alloc/allocations/3.5_knapsack-kl.json --out /tmp/deploy.json

Cases: uniform w4g128 and w3g128 and a mixed allocation (``--allocation``, e.g. one written by
``bench/allocation.py``), each GPTQ-quantized with the benchmark's calibration windows, saved as
an automp checkpoint, exported (compressed-tensors, gguf-map, gptq-dynamic), and reloaded with
``AutoModelForCausalLM.from_pretrained`` (float32) and no automp code.

* bytes: the export's quantized tensors on disk against automp's computed figure;
* logits: max |difference| between the reloaded export and automp's quantized model on
  ``--logit-windows`` WikiText-2 windows, relative to the largest |logit|;
* tasks: zero-shot accuracy (``acc``) on the local task files, the first ``--limit`` items of
  each; the quantized models' difference to FP16 with its paired standard error over items;
* tokens/s: forward throughput while scoring the tasks (CPU; the export is timed after its first
  forward, which decompresses the packed weights), and peak RSS of the process.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from automp.allocation import Allocation  # noqa: E402
from automp.checkpoint import save_quantized  # noqa: E402
from automp.model import inventory  # noqa: E402
from automp.pipeline import export  # noqa: E402
from automp.quantize import quantize_  # noqa: E402
from automp.settings import ExportSettings  # noqa: E402
from automp.tasks import load_task, picks_per_item, score  # noqa: E402
from automp.usage import peak_memory  # noqa: E402
from common import Bench, markdown_table, report  # noqa: E402

TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "copa", "openbook_qa")


def task_scores(model, tokenizer, tasks: dict[str, list]) -> tuple[dict[str, list[bool]], float]:
    """Per task, whether each item is answered right (acc); and the forward tokens/s."""
    correct, tokens, seconds = {}, 0, 0.0
    for name, items in tasks.items():
        scores = score(model, tokenizer, [r for item in items for r in item.requests], progress=False)
        picks = picks_per_item(items, scores.loglik)
        correct[name] = [pick == item.gold for item, (pick, _) in zip(items, picks, strict=True)]
        tokens, seconds = tokens + scores.tokens, seconds + scores.seconds
    return correct, tokens / seconds


def paired(fp: list[bool], quantized: list[bool]) -> tuple[float, float]:
    """Accuracy difference quantized - FP over the same items, and its standard error."""
    diffs = torch.tensor(quantized, dtype=torch.float64) - torch.tensor(fp, dtype=torch.float64)
    return diffs.mean().item(), diffs.std().item() / math.sqrt(len(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--allocation", help="a mixed allocation (JSON) to export beside the uniform ones")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--logit-windows", type=int, default=4)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    bench = Bench.load(args.model, args.data, args.nsamples)
    inv = inventory(bench.model)
    tasks = {name: load_task(name, Path(args.data) / "eval", args.limit) for name in args.tasks.split(",")}
    ids = bench.eval_windows[: args.logit_windows]
    fp_correct, fp_speed = task_scores(bench.model, bench.tokenizer, tasks)
    rows = [{"case": "fp16", "avg_bits": 16.0, "tokens_per_s": fp_speed}]
    rows[0] |= {name: sum(c) / len(c) for name, c in fp_correct.items()}
    cases = {"w4g128": Allocation.uniform(inv, "w4g128"), "w3g128": Allocation.uniform(inv, "w3g128")}
    if args.allocation:
        cases["mixed"] = Allocation.load(Path(args.allocation))
    deltas = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, allocation in cases.items():
            model = bench.reset()
            qweights = quantize_(model, allocation, "gptq", bench.calib, progress=False)
            run_dir, ct_dir = Path(tmp) / case, Path(tmp) / f"{case}-ct"
            save_quantized(run_dir, model, bench.tokenizer, allocation, qweights)
            exported = export(ExportSettings(run=run_dir, format="compressed-tensors", out=ct_dir))
            maps = {
                fmt: export(ExportSettings(run=run_dir, format=fmt, out=Path(tmp) / f"{case}-{fmt}"))
                for fmt in ("gguf-map", "gptq-dynamic")
            }
            with torch.no_grad():
                ours = model(input_ids=ids).logits
                loaded = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32).eval()
                theirs = loaded(input_ids=ids).logits
            row = {
                "case": case,
                "avg_bits": allocation.avg_bits(inv),
                "formats": exported["layers_by_format"],
                "export_quant_bytes": exported["quantized_bytes_on_disk"],
                "automp_quant_bytes": exported["quantized_bytes_automp"],
                "bytes_ratio": exported["quantized_bytes_ratio"],
                "export_file_bytes": (ct_dir / "model.safetensors").stat().st_size,
                "vllm_warnings": len(exported["warnings"]),
                "map_warnings": {fmt: len(r.get("warnings", [])) for fmt, r in maps.items()},
                "logits_max_abs_diff": (theirs - ours).abs().max().item(),
                "logits_max_abs": ours.abs().max().item(),
            }
            correct, row["tokens_per_s"] = task_scores(model, bench.tokenizer, tasks)
            _, row["export_tokens_per_s"] = task_scores(loaded, bench.tokenizer, tasks)
            for name, c in correct.items():
                row[name] = sum(c) / len(c)
                delta, se = paired(fp_correct[name], c)
                deltas.append({"case": case, "task": name, "delta_acc": delta, "se": se, "n": len(c)})
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
            del loaded
    bench.reset()

    names = list(tasks)
    counts = {name: len(items) for name, items in tasks.items()}
    chance = {name: sum(1 / len(item.requests) for item in items) / len(items) for name, items in tasks.items()}
    columns = [
        ("case", "case", ""),
        ("avg_bits", "avg bits", ".3f"),
        ("export_quant_bytes", "export quant bytes", "d"),
        ("bytes_ratio", "on disk / computed", ".4f"),
        ("logits_max_abs_diff", "max |Δlogit|", ".2e"),
        ("tokens_per_s", "tok/s automp", ".0f"),
        ("export_tokens_per_s", "tok/s export", ".0f"),
    ]
    table = markdown_table(rows, columns)
    table += "\n\n" + markdown_table(
        [{"case": "chance", **chance}, *rows], [("case", "acc", "")] + [(n, f"{n} ({counts[n]})", ".3f") for n in names]
    )
    table += "\n\n" + markdown_table(
        deltas,
        [("case", "case", ""), ("task", "task", ""), ("delta_acc", "Δacc vs FP16", "+.4f"), ("se", "±", ".4f")],
    )
    payload = {
        "model": args.model,
        "limit": args.limit,
        "chance": chance,
        "rows": rows,
        "deltas": deltas,
        **peak_memory("cpu"),
    }
    report("deployable output", payload, table, args.out)


if __name__ == "__main__":
    main()
