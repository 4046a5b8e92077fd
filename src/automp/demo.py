"""``automp demo``: the whole job on a model automp trains itself, offline, in a few minutes on a CPU.

The demo model (``demo_model.py``) learns the standard library's documentation; the demo quantizes it
with RTN and GPTQ at 8, 4 and 3 bits, then with one format per layer chosen by a quick profile and the
exact knapsack at the bits of w3g128, and reports bits, megabytes and held-out perplexity.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from automp.allocation import Allocation
from automp.checkpoint import model_bytes
from automp.data import calibration_windows, eval_windows, tokenize
from automp.demo_model import EVAL_FILE, demo_model_dir, stdlib_corpus
from automp.evaluate import perplexity
from automp.formats import parse_formats
from automp.model import inventory, load_model
from automp.quantize import quantize_, round_to_storage
from automp.search.problem import Problem
from automp.search.registry import get_solver
from automp.sensitivity.profile import profile_model
from automp.sensitivity.table import CalibInfo

SCHEMES = ("w8", "w4g128", "w3g128")
METHODS = ("rtn", "gptq")
SEQLEN = 256
NSAMPLES = 64
MIXED_AT = "w3g128"  # the mixed row gets exactly this uniform format's average bits
PROFILE_FORMATS = "w2g64,w3g128,w4g128,w8"
PROFILE_NSAMPLES = 8  # the profile only ranks layers: a few windows are enough


def run_demo(out: Path | None = None, progress: bool = True) -> dict:
    torch.manual_seed(0)
    model_dir = demo_model_dir(progress=progress)
    model, tokenizer = load_model(model_dir, device="cpu")
    windows = eval_windows(tokenize((model_dir / EVAL_FILE).read_text(), tokenizer), SEQLEN)
    calib = calibration_windows(tokenize(stdlib_corpus()[0], tokenizer), NSAMPLES, SEQLEN, seed=0)
    inv = inventory(model)
    round_to_storage(model)  # the baseline is the model as stored in 16-bit
    original = {k: v.clone() for k, v in model.state_dict().items()}

    fp16 = perplexity(model, windows, progress=progress)
    rows = [_row("fp16", "-", 16.0, model_bytes(model, {}), fp16.ppl, fp16.ppl)]
    for method in METHODS:
        for scheme in SCHEMES:
            model.load_state_dict(original)
            allocation = Allocation.uniform(inv, scheme)
            qweights = quantize_(model, allocation, method, calib, progress=progress)
            ppl = perplexity(model, windows, progress=progress).ppl
            rows.append(_row(scheme, method, allocation.avg_bits(inv), model_bytes(model, qweights), ppl, fp16.ppl))
    model.load_state_dict(original)
    rows.append(_mixed_row(model, original, calib, windows, str(model_dir), fp16.ppl, progress))
    result = {"model": str(model_dir), "eval_windows": fp16.windows, "seqlen": SEQLEN, "rows": rows}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "demo.json").write_text(json.dumps(result, indent=1))
    return {**result, "table": _table(rows)}


def _mixed_row(
    model: nn.Module,
    original: dict[str, torch.Tensor],
    calib: torch.Tensor,
    windows: torch.Tensor,
    model_name: str,
    base: float,
    progress: bool,
) -> dict:
    """Mixed precision at exactly the bits of uniform ``MIXED_AT``: a cheap profile (a few windows, no
    KL), the exact knapsack on its Hessian proxy, then GPTQ with the chosen format per layer."""
    inv = inventory(model)
    target = Allocation.uniform(inv, MIXED_AT).avg_bits(inv)
    info = CalibInfo(spec="stdlib documentation", nsamples=PROFILE_NSAMPLES, seqlen=SEQLEN, seed=0)
    table = profile_model(
        model, parse_formats(PROFILE_FORMATS), calib[:PROFILE_NSAMPLES], model_name=model_name, calib_info=info,
        progress=progress,
    )  # fmt: skip
    allocation = get_solver("knapsack").solve(Problem(table=table, target_bits=target)).allocation
    model.load_state_dict(original)
    qweights = quantize_(model, allocation, "gptq", calib, progress=progress)
    ppl = perplexity(model, windows, progress=progress).ppl
    return _row(f"mixed@{target:g}", "gptq+knapsack", allocation.avg_bits(inv), model_bytes(model, qweights), ppl, base)


def _row(scheme: str, method: str, bits: float, nbytes: int, ppl: float, base: float) -> dict:
    return {
        "format": scheme,
        "method": method,
        "avg_bits": bits,
        "mb": nbytes / 1e6,
        "ppl": ppl,
        "delta_pct": 100 * (ppl / base - 1),
    }


def _table(rows: list[dict]) -> str:
    lines = ["| format | method | avg bits | MB | PPL | ΔPPL % |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['method']} | {r['avg_bits']:.3f} | {r['mb']:.3f} | {r['ppl']:.3f} | "
            f"{r['delta_pct']:+.2f} |"
        )
    return "\n".join(lines)
