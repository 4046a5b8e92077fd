"""``automp demo``: the whole job on a model automp trains itself, offline, in a few minutes on a CPU.

The demo model (``demo_model.py``) learns the standard library's documentation; the demo quantizes it
with RTN and GPTQ at 8, 4 and 3 bits, then runs ``automp run`` itself at the bits of w3g128 (profile,
knapsack, verification against uniform on held-out windows, GPTQ), and reports bits, megabytes and
held-out perplexity; the mixed row names what verification delivered.

The run directory (``<out>/run``) then gets its HTML report (``run/report``) and a compressed-tensors
export (``<out>/compressed-tensors``), so that the commands a user runs next (``automp report``,
``automp export``, ``automp eval``) have something to read. ``<out>`` is ``--out``, else ``demo`` in the
cache (``$AUTOMP_CACHE`` or ``~/.cache/automp``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from automp.allocation import Allocation
from automp.checkpoint import model_bytes
from automp.data import calibration_windows, eval_windows, tokenize
from automp.demo_model import EVAL_FILE, cache_root, demo_model_dir, stdlib_corpus
from automp.evaluate import perplexity
from automp.io import check_output, write_file_atomic
from automp.model import inventory, load_model
from automp.pipeline import export, run
from automp.quantize import quantize_, round_to_storage
from automp.report import write_report
from automp.sensitivity.table import TABLE_FILE
from automp.settings import ExportSettings, RunSettings

SCHEMES = ("w8", "w4g128", "w3g128")
METHODS = ("rtn", "gptq")
SEQLEN = 256
NSAMPLES = 64
MIXED_AT = "w3g128"  # the mixed row gets exactly this uniform format's average bits
PROFILE_FORMATS = "w2g64,w3g128,w4g128,w8"
CALIB_FILE = "calib.txt"  # the demo model's training text, which it calibrates on, as `automp run` reads it
OUT_SUBDIR = "demo"  # in the cache, unless --out is given
RUN_SUBDIR = "run"
EXPORT_SUBDIR = "compressed-tensors"


def run_demo(out: Path | None = None, progress: bool = True) -> dict:
    """Print-ready rows of every format, plus where the mixed model's run directory, report and export are."""
    root = Path(out) if out is not None else cache_root() / OUT_SUBDIR
    for path in (root, root / RUN_SUBDIR, root / EXPORT_SUBDIR):  # before training: a bad path fails at once
        check_output(path, option="--out" if path == root and out is not None else "the demo's output")
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
    calib_file = root / CALIB_FILE  # `automp run` reads texts from files: the demo's calibration text, once
    if not calib_file.is_file():
        write_file_atomic(calib_file, stdlib_corpus()[0])
    (root / RUN_SUBDIR / TABLE_FILE).unlink(missing_ok=True)  # measured afresh: the demo model may be new
    settings = RunSettings(
        model=str(model_dir), out=root / RUN_SUBDIR, target_bits=Allocation.uniform(inv, MIXED_AT).avg_bits(inv),
        formats=PROFILE_FORMATS, calib=str(calib_file), nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu",
        eval=str(model_dir / EVAL_FILE),
    )  # fmt: skip
    mixed = run(settings, progress=progress)
    rows.append(
        _row(f"mixed@{settings.target_bits:g}", f"gptq+{mixed['delivered']}", mixed["avg_bits"], mixed["bytes"],
             mixed["ppl"], fp16.ppl)
    )  # fmt: skip
    saved = report_and_export(settings.out, root / EXPORT_SUBDIR)
    result = {"model": str(model_dir), "eval_windows": fp16.windows, "seqlen": SEQLEN, "rows": rows, **saved}
    result["verification"] = mixed["verification"]
    if out is not None:
        (root / "demo.json").write_text(json.dumps(result, indent=1))
    return {**result, "table": _table(rows)}


def report_and_export(run_dir: Path, export_dir: Path) -> dict[str, str]:
    """Write the report of the ``automp run`` directory ``run_dir`` and its compressed-tensors export to
    ``export_dir``; returns the three paths (``run_dir``, ``report``, ``export``)."""
    report = write_report(run_dir, progress=False)["index"]
    # transformers: the engine that loads every format; `automp export --engine vllm` lists what vLLM cannot serve
    export(ExportSettings(run=run_dir, format="compressed-tensors", out=export_dir, engine="transformers"))
    return {"run_dir": str(run_dir), "report": report, "export": str(export_dir)}


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
