"""The ``--format gptq`` export loaded by GPTQModel: its perplexity against automp's own dequantized model.

    python bench/gptq_export.py --model ../shared/models/bench-a --data ../shared/data \\
        --gptqmodel-python /tmp/gptqm/bin/python --windows 64 --out /tmp/gptq_export.json

automp GPTQ-quantizes the model (w4g128, with w3g128, w8 and one asymmetric w4g128a layer at a few
layers), saves it as a run, and exports ``--format gptq``. A second Python that has GPTQModel (its own
virtual environment: GPTQModel is not automp's dependency) loads the export with its torch backend on the
CPU, compares each quantized layer's dequantized weight with automp's, and scores the same WikiText-2
windows (512 tokens, non-overlapping, the first ``--windows``). The row to watch: GPTQModel's perplexity
within 0.5 % of automp's (and the weights identical in fp16, where GPTQModel's torch kernel computes).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

SEQLEN = 512
MIXED = {  # layer name suffix -> format, on top of w4g128 everywhere else
    "layers.0.mlp.down_proj": "w8", "layers.5.mlp.down_proj": "w8",
    "layers.2.mlp.gate_proj": "w3g128", "layers.2.mlp.up_proj": "w3g128",
    "layers.3.mlp.gate_proj": "w3g128", "layers.3.mlp.up_proj": "w3g128",
    "layers.4.self_attn.q_proj": "w3g128", "layers.4.self_attn.k_proj": "w3g128",
    "layers.4.self_attn.v_proj": "w3g128", "layers.1.self_attn.o_proj": "w4g128a",
}  # fmt: skip


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Mean token NLL of each window (automp's perplexity protocol, written out for the GPTQModel side)."""
    nll = []
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        nll.extend(loss.view(len(ids), -1).mean(dim=1).tolist())
    return nll


def gptqmodel_side(export_dir: str, windows_file: str, weights_file: str, dtype: str, out: str) -> None:
    """Runs in GPTQModel's Python: load the export (torch backend, CPU), compare weights, score the windows."""
    import time

    from gptqmodel import BACKEND, GPTQModel, __version__
    from safetensors.torch import load_file

    start = time.perf_counter()
    model = GPTQModel.load(export_dir, device="cpu", backend=BACKEND.TORCH, dtype=getattr(torch, dtype))
    load_seconds = time.perf_counter() - start
    automp = load_file(weights_file)
    weights = {}
    for name, weight in automp.items():
        module = model.model.get_submodule(name)
        ours = module.dequantize_weight().T.float()  # GPTQ's (in, out) -> (out, in)
        weights[name] = {
            "kernel": type(module).__name__,
            "bits": module.bits,
            "identical_in_dtype": torch.equal(ours, weight.to(getattr(torch, dtype)).float()),
            "max_abs_diff": (ours - weight).abs().max().item(),
        }
    start = time.perf_counter()
    nll = window_nll(model.model, torch.load(windows_file))
    result = {"gptqmodel": __version__, "dtype": dtype, "load_seconds": load_seconds, "weights": weights,
              "nll": nll, "eval_seconds": time.perf_counter() - start}  # fmt: skip
    Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--gptqmodel-python", required=True, help="a Python with gptqmodel installed")
    parser.add_argument("--calib", default="calib/c4.txt", help="calibration text, relative to --data")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--windows", type=int, default=64, help="WikiText-2 windows to score (0: all)")
    parser.add_argument("--dtype", default="bfloat16", help="GPTQModel's compute dtype: bfloat16 or float16")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from automp.allocation import Allocation
    from automp.checkpoint import save_quantized
    from automp.data import load_windows
    from automp.model import inventory, load_model
    from automp.pipeline import export
    from automp.quantize import quantize_, round_to_storage
    from automp.settings import ExportSettings
    from common import WIKITEXT, markdown_table, report

    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    round_to_storage(model)  # the 16-bit model as a checkpoint stores it
    windows = load_windows(str(Path(args.data) / WIKITEXT), tokenizer, SEQLEN)
    windows = windows[: args.windows] if args.windows else windows
    calib = load_windows(str(Path(args.data) / args.calib), tokenizer, SEQLEN, args.nsamples, 0)
    inv = inventory(model)
    formats = {lay.name: next((f for s, f in MIXED.items() if lay.name.endswith(s)), "w4g128") for lay in inv.layers}
    allocation = Allocation(formats=formats)
    fp_nll = window_nll(model, windows)

    with tempfile.TemporaryDirectory() as tmp:
        run_dir, export_dir = Path(tmp) / "run", Path(tmp) / "gptq"
        qweights = quantize_(model, allocation, "gptq", calib, progress=False)
        save_quantized(run_dir, model, tokenizer, allocation, qweights)
        exported = export(ExportSettings(run=run_dir, format="gptq", out=export_dir))
        automp_nll = window_nll(model, windows)  # quantize_ left automp's dequantized weights in the model
        same_dtype_nll = window_nll(model.to(getattr(torch, args.dtype)), windows)
        torch.save(windows, Path(tmp) / "windows.pt")
        weights = {name: q.dequantize().contiguous() for name, q in qweights.items()}
        from safetensors.torch import save_file

        save_file(weights, Path(tmp) / "automp_weights.safetensors")
        files = [str(Path(tmp) / f) for f in ("windows.pt", "automp_weights.safetensors")]
        result = Path(tmp) / "theirs.json"
        child = [args.gptqmodel_python, __file__, "--gptqmodel-side", str(export_dir), *files, args.dtype, str(result)]
        subprocess.run(child, check=True, stdout=sys.stderr)  # GPTQModel's banner and logs stay off stdout
        theirs = json.loads(result.read_text())

    def ppl(nll: list[float]) -> float:
        return math.exp(sum(nll) / len(nll))

    automp_ppl = ppl(automp_nll)
    rows = [
        {"model": "fp16 (as stored)", "dtype": "float32", "ppl": ppl(fp_nll)},
        {"model": "automp dequantized", "dtype": "float32", "ppl": automp_ppl},
        {"model": "automp dequantized", "dtype": args.dtype, "ppl": ppl(same_dtype_nll)},
        {"model": f"GPTQModel {theirs['gptqmodel']} torch backend", "dtype": args.dtype, "ppl": ppl(theirs["nll"])},
    ]
    for row in rows:
        row["vs_automp_pct"] = 100 * (row["ppl"] / automp_ppl - 1)
    identical = sum(w["identical_in_dtype"] for w in theirs["weights"].values())
    payload = {
        "model": args.model,
        "windows": len(windows),
        "seqlen": SEQLEN,
        "allocation": dict(sorted(Counter(formats.values()).items())),
        "export": {k: v for k, v in exported.items() if k not in ("kernels",)},
        "rows": rows,
        "gptqmodel_within_0.5pct": abs(rows[-1]["vs_automp_pct"]) < 0.5,
        "layers_identical_in_dtype": f"{identical}/{len(theirs['weights'])}",
        "layer_kernels": sorted({w["kernel"] for w in theirs["weights"].values()}),
        "max_weight_abs_diff_vs_float32": max(w["max_abs_diff"] for w in theirs["weights"].values()),
        "gptqmodel_load_seconds": theirs["load_seconds"],
        "gptqmodel_eval_seconds": theirs["eval_seconds"],
    }
    columns = [("model", "model", ""), ("dtype", "dtype", ""), ("ppl", "PPL", ".3f"),
               ("vs_automp_pct", "vs automp %", "+.3f")]  # fmt: skip
    report("GPTQ export in GPTQModel", payload, markdown_table(rows, columns), args.out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--gptqmodel-side":
        gptqmodel_side(*sys.argv[2:])
    else:
        main()
