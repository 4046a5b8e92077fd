"""The commands as Python functions: each takes its settings and returns the metrics it reports.

Outputs are written to a staging directory beside the target and renamed into place only when the
whole command succeeded, so a failure never leaves a partial output directory.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from automp.allocation import Allocation
from automp.checkpoint import model_bytes, save_quantized
from automp.data import load_windows
from automp.errors import AutompError
from automp.evaluate import perplexity
from automp.model import inventory, lm_head_name, load_model, max_positions
from automp.quantize import GPTQConfig, quantize_
from automp.settings import EvalSettings, ModelSettings, QuantizeSettings

DEFAULT_SEQLEN = 2048


class Stopwatch:
    """Wall seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)

    @property
    def total(self) -> float:
        return round(sum(self.seconds.values()), 3)


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a fresh staging directory; move it to ``out`` on success, delete it on failure."""
    out = Path(out)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def window_length(model, requested: int | None) -> int:
    limit = max_positions(model)
    seqlen = requested or min(DEFAULT_SEQLEN, limit or DEFAULT_SEQLEN)
    if seqlen < 2:
        raise AutompError("--seqlen must be at least 2")
    if limit and seqlen > limit:
        raise AutompError(f"--seqlen {seqlen} exceeds the model's maximum positions ({limit})")
    return seqlen


def _load(settings: ModelSettings):
    torch.manual_seed(settings.seed)
    return load_model(
        settings.model, dtype=settings.dtype, device=settings.device, trust_remote_code=settings.trust_remote_code
    )


def evaluate(settings: EvalSettings, progress: bool = True) -> dict:
    clock = Stopwatch()
    with clock.stage("load"):
        model, tokenizer = _load(settings)
        windows = load_windows(settings.ppl, tokenizer, window_length(model, settings.seqlen))
    with clock.stage("eval"):
        result = perplexity(model, windows, settings.batch_size, progress)
    return {**result.summary(), "seconds": clock.total, "stage_seconds": clock.seconds}


def quantize(settings: QuantizeSettings, progress: bool = True) -> dict:
    """Load, quantize uniformly with ``settings.scheme``, optionally evaluate, save to ``settings.out``."""
    clock = Stopwatch()
    with clock.stage("load"):
        model, tokenizer = _load(settings)
        seqlen = window_length(model, settings.seqlen)
        inv = inventory(model, include_lm_head=settings.lm_head)
        allocation = Allocation.uniform(inv, settings.scheme)
        calib = None
        if settings.method != "rtn":
            if settings.calib is None:
                raise AutompError(f"--method {settings.method} needs calibration text (--calib)")
            calib = load_windows(settings.calib, tokenizer, seqlen, settings.nsamples, settings.seed)
        windows = load_windows(settings.eval, tokenizer, seqlen) if settings.eval else None
    with staged_output(settings.out) as staging:
        with clock.stage("quantize"):
            gptq = GPTQConfig(damp=settings.damp, act_order=settings.act_order)
            qweights = quantize_(
                model, allocation, settings.method, calib, gptq=gptq, batch_size=settings.batch_size, progress=progress
            )
        metrics = {
            "scheme": settings.scheme,
            "method": settings.method,
            "avg_bits": allocation.avg_bits(inv),
            "bytes": model_bytes(model, qweights),
            "layers": len(qweights),
            "lm_head_quantized": lm_head_name(model) in qweights,
        }
        if windows is not None:
            with clock.stage("eval"):
                result = perplexity(model, windows, settings.batch_size, progress)
            metrics.update(ppl=result.ppl, eval=result.summary())
        with clock.stage("save"):
            save_quantized(staging, model, tokenizer, allocation, qweights)
        metrics.update(seconds=clock.total, stage_seconds=clock.seconds)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (staging / "automp_config.json").write_text(settings.model_dump_json(indent=1))
    return metrics
