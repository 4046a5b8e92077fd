"""The commands as Python functions: each takes its settings and returns the metrics it reports.

Outputs are written to a staging directory beside the target and renamed into place only when the
whole command succeeded, so a failure never leaves a partial output directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from automp.allocation import Allocation
from automp.checkpoint import model_bytes, save_quantized
from automp.data import load_windows
from automp.errors import AutompError
from automp.evaluate import perplexity
from automp.export import REPORT_FILE, RunDir, export_run
from automp.lm_eval_backend import evaluate_tasks_lm_eval
from automp.model import inventory, lm_head_name, load_model, max_positions, resolve_device
from automp.quantize import GPTQConfig, quantize_
from automp.quantizers.qweight import QuantizedWeight
from automp.search.problem import Problem
from automp.sensitivity.table import SensitivityTable
from automp.settings import (
    EvalSettings,
    ExportSettings,
    ModelSettings,
    ProfileSettings,
    QuantizeSettings,
    RunSettings,
    SearchSettings,
)
from automp.tasks import evaluate_tasks, resolve_tasks_dir
from automp.usage import peak_memory, reset_peak_memory, throughput

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


def write_file_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place: never a partial file."""
    path = Path(path)
    staging = path.parent / f".{path.name}.partial"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.write_text(text)
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)


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
    """Perplexity and/or zero-shot task accuracy, with peak memory and forward tokens per second."""
    clock = Stopwatch()
    device = resolve_device(settings.device)
    reset_peak_memory(device)
    names = [name.strip() for name in (settings.tasks or "").split(",") if name.strip()]
    if not settings.ppl and not names:
        raise AutompError("nothing to evaluate: give --ppl TEXT and/or --tasks NAMES")
    with clock.stage("load"):
        tasks_dir = resolve_tasks_dir(settings.tasks_dir) if names and settings.backend == "automp" else None
        model, tokenizer = _load(settings)
        windows = load_windows(settings.ppl, tokenizer, window_length(model, settings.seqlen)) if settings.ppl else None
    metrics: dict = {}
    tokens, seconds = 0, 0.0  # forwards timed for the throughput
    if windows is not None:
        with clock.stage("eval"):
            began = time.perf_counter()
            result = perplexity(model, windows, settings.batch_size, progress)
            tokens, seconds = result.tokens, time.perf_counter() - began
        metrics.update(result.summary())
    if names:
        with clock.stage("tasks"):
            if settings.backend == "lm-eval":  # lm-eval runs its own loop: it is not timed here
                metrics["tasks"] = evaluate_tasks_lm_eval(model, tokenizer, names, settings.limit, settings.batch_size)
            else:
                metrics["tasks"], cost = evaluate_tasks(
                    model, tokenizer, names, tasks_dir, settings.limit, settings.batch_size, progress
                )
                tokens, seconds = tokens + cost.tokens, seconds + cost.seconds
    metrics.update(peak_memory(device), tokens_per_s=throughput(tokens, seconds), forward_tokens=tokens)
    return {**metrics, "seconds": clock.total, "stage_seconds": clock.seconds}


@dataclass
class Quantized:
    """A model quantized in memory, with the figures ``automp quantize`` reports about it."""

    model: nn.Module
    tokenizer: Any
    allocation: Allocation
    qweights: dict[str, QuantizedWeight]
    metrics: dict


def quantize_model(
    settings: QuantizeSettings,
    allocation: Allocation | None = None,
    clock: Stopwatch | None = None,
    progress: bool = True,
) -> Quantized:
    """Load, quantize with ``allocation`` (default: ``settings.scheme`` for every layer), and evaluate
    perplexity when ``settings.eval`` is given. Nothing is written."""
    clock = clock or Stopwatch()
    with clock.stage("load"):
        model, tokenizer = _load(settings)
        seqlen = window_length(model, settings.seqlen)
        inv = inventory(model, include_lm_head=settings.lm_head)
        if allocation is None:
            allocation, scheme = Allocation.uniform(inv, settings.scheme), settings.scheme
        else:
            allocation.check(inv)
            scheme = "mixed"
        calib = None
        if settings.method != "rtn":
            if settings.calib is None:
                raise AutompError(f"--method {settings.method} needs calibration text (--calib)")
            calib = load_windows(settings.calib, tokenizer, seqlen, settings.nsamples, settings.seed)
        windows = load_windows(settings.eval, tokenizer, seqlen) if settings.eval else None
    with clock.stage("quantize"):
        gptq = GPTQConfig(damp=settings.damp, act_order=settings.act_order)
        qweights = quantize_(
            model, allocation, settings.method, calib, gptq=gptq, batch_size=settings.batch_size, progress=progress
        )
    metrics = {
        "scheme": scheme,
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
    return Quantized(model, tokenizer, allocation, qweights, metrics)


def save_checkpoint(staging: Path, quantized: Quantized, settings: BaseModel, clock: Stopwatch, extra: dict) -> dict:
    """Write the automp checkpoint, ``metrics.json`` (the quantizer's figures, then ``extra``, then the
    timings) and ``automp_config.json`` (``settings``) into ``staging``; returns the metrics."""
    with clock.stage("save"):
        save_quantized(staging, quantized.model, quantized.tokenizer, quantized.allocation, quantized.qweights)
    metrics = {**quantized.metrics, **extra, "seconds": clock.total, "stage_seconds": clock.seconds}
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (staging / "automp_config.json").write_text(settings.model_dump_json(indent=1))
    return metrics


def quantize(settings: QuantizeSettings, progress: bool = True) -> dict:
    """Load, quantize uniformly with ``settings.scheme``, optionally evaluate, save to ``settings.out``."""
    clock = Stopwatch()
    with staged_output(settings.out) as staging:
        quantized = quantize_model(settings, clock=clock, progress=progress)
        return save_checkpoint(staging, quantized, settings, clock, {})


def profile(settings: ProfileSettings, progress: bool = True) -> dict:
    """Measure every layer x format and save the sensitivity table to ``settings.out``.

    Measurements accumulate in a work directory beside the output (``.<out>.profile-work``) that
    survives a crash or a kill. Rerunning the same command resumes from it, and it is removed
    only once the table is in place.
    """
    from automp.formats import parse_formats
    from automp.sensitivity.profile import profile_model
    from automp.sensitivity.table import TABLE_FILE, CalibInfo

    clock = Stopwatch()
    with clock.stage("load"):
        model, tokenizer = _load(settings)
        seqlen = window_length(model, settings.seqlen)
        formats = parse_formats(settings.formats)
        if settings.calib is None:
            raise AutompError("automp profile needs calibration text (--calib)")
        calib = load_windows(settings.calib, tokenizer, seqlen, settings.nsamples, settings.seed)
        kl_windows = None
        if settings.kl:  # other windows than calibration's: a different seed, or other text
            kl_text = settings.kl_text or settings.calib
            kl_windows = load_windows(kl_text, tokenizer, seqlen, settings.kl_windows, settings.seed + 1)
    out = Path(settings.out)
    work = out.parent / f".{out.name}.profile-work"
    table = profile_model(
        model, formats, calib,
        model_name=settings.model,
        calib_info=CalibInfo(spec=settings.calib, nsamples=len(calib), seqlen=seqlen, seed=settings.seed),
        kl_windows=kl_windows, work_dir=work, gptq=GPTQConfig(damp=settings.damp, act_order=settings.act_order),
        batch_size=settings.batch_size, progress=progress, clock=clock,
    )  # fmt: skip
    with staged_output(out) as staging:
        table.save(staging)
        metrics = {
            "layers": len(table.layers),
            "formats": table.formats,
            "kl": settings.kl,
            "seconds": clock.total,
            "stage_seconds": clock.seconds,
            "path": str(out / TABLE_FILE),
        }
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (staging / "automp_config.json").write_text(settings.model_dump_json(indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def search(settings: SearchSettings) -> dict:
    """Choose each layer's format from a saved sensitivity table: one allocation for ``target_bits``,
    saved to ``out``; or, with ``frontier``, the predicted loss at every target in a range."""
    from automp.search.frontier import frontier, parse_range
    from automp.search.registry import get_solver
    from automp.search.result import SearchResult

    clock = Stopwatch()
    with clock.stage("load"):
        table = SensitivityTable.load(settings.profile)
        problem = search_problem(settings, table)
    options = {"max_loss": settings.max_loss} if settings.max_loss is not None else {}
    if settings.frontier is not None:
        with clock.stage("search"):
            lo, hi, step = parse_range(settings.frontier)
            points = frontier(problem, lo, hi, step, solver=settings.solver, seed=settings.seed, **options)
        count = table.weight_count()
        curve = [
            {"target_bits": p.target_bits, "avg_bits": p.avg_bits, "predicted_loss": p.predicted_loss,
             "bytes": math.ceil(round(p.avg_bits * count) / 8) + table.dense_bytes}
            for p in points
        ]  # fmt: skip
        return {"frontier": curve, "solver": settings.solver, "proxy": settings.proxy, "seconds": clock.total}
    from automp.search.measure import build_evaluator, check_and_refine, solver_options

    with clock.stage("evaluator"):  # only when something measures real quality (--eval)
        evaluator = build_evaluator(settings, problem)
    with clock.stage("search"):
        engine = get_solver(settings.solver, **options, **solver_options(settings))
        solution = engine.solve(problem, seed=settings.seed, evaluator=evaluator)
    extra: dict = {}
    if evaluator is not None:  # --verify K, --refine, and the real loss of the result
        with clock.stage("verify"):
            solution, extra = check_and_refine(settings, problem, solution, evaluator)
    result = SearchResult.of(problem, solution, profile=str(settings.profile), seed=settings.seed)
    with clock.stage("save"):
        write_file_atomic(settings.out, result.model_dump_json(indent=1))
    summary = result.summary() | {"solver_seconds": result.seconds, "seconds": clock.total}
    return {**summary, **extra, "stage_seconds": clock.seconds, "path": str(settings.out)}


def search_problem(settings: SearchSettings, table: SensitivityTable) -> Problem:
    """The Problem a search settings object describes, checked against the table."""
    from automp.formats import parse_formats

    if (settings.target_bits is None) == (settings.frontier is None):
        raise AutompError("automp search needs either --target-bits (with --out) or --frontier lo:hi:step")
    if settings.target_bits is not None:
        if not settings.target_bits > 0:
            raise AutompError(f"--target-bits must be positive, got {settings.target_bits:g}")
        if settings.out is None:
            raise AutompError("automp search --target-bits needs --out FILE for the allocation")
    allowed = [f.name for f in parse_formats(settings.formats)] if settings.formats else None
    return Problem(
        table=table,
        proxy=settings.proxy,
        target_bits=settings.target_bits if settings.target_bits is not None else 16.0,
        allowed=allowed,
        pinned=settings.pin,
        tie_fused=settings.tie_fused,
    )


def export(settings: ExportSettings) -> dict:
    """Write a deployable export (``settings.format``) of the automp output directory ``settings.run``."""
    clock = Stopwatch()
    if Path(settings.out).resolve() == Path(settings.run).resolve():
        raise AutompError("--out must differ from --run: the export would replace the run it reads")
    with clock.stage("load"):
        run = RunDir.open(settings.run)
    with staged_output(settings.out) as staging:
        with clock.stage("export"):
            report = export_run(run, settings.format, staging, settings.engine)
        report = {"format": settings.format, "engine": settings.engine, "out": str(settings.out), **report}
        report.update(seconds=clock.total, stage_seconds=clock.seconds)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


def run(settings: RunSettings, progress: bool = True) -> dict:
    """The whole job: profile, search, quantize the allocation, evaluate; one directory ``settings.out``.

    The sensitivity table is reused from ``<out>/sensitivity.json`` when a previous run left one there.
    Otherwise it is measured into a hidden directory beside the output (``.<out>.profile``), which a
    failed or killed run leaves behind so that the next run resumes or reuses it; it is removed once
    the output is in place.
    """
    from automp.search.result import SearchResult
    from automp.sensitivity.table import TABLE_FILE

    clock = Stopwatch()
    out = Path(settings.out)
    if not settings.target_bits > 0:
        raise AutompError(f"--target-bits must be positive, got {settings.target_bits:g}")
    if settings.calib is None:
        raise AutompError("automp run needs calibration text (--calib)")
    _check_reachable(settings)
    cached = out / TABLE_FILE
    scratch = out.parent / f".{out.name}.profile"
    if not cached.is_file():
        cached = scratch / TABLE_FILE
        if not cached.is_file():
            fields = set(ProfileSettings.model_fields) - {"out"}
            profiled = profile(ProfileSettings(**settings.model_dump(include=fields), out=scratch), progress)
            clock.seconds["profile"] = profiled["seconds"]
    with staged_output(out) as staging:
        shutil.copyfile(cached, staging / TABLE_FILE)
        # the options both commands share; `method` is run's final quantizer, not the search evaluator's
        shared = (set(SearchSettings.model_fields) & set(RunSettings.model_fields)) - {"out", "method"}
        search_settings = SearchSettings(
            profile=staging / TABLE_FILE, out=staging / ALLOCATION_FILE, **settings.model_dump(include=shared)
        )
        with clock.stage("search"):
            found = search(search_settings)
        result = SearchResult.load(staging / ALLOCATION_FILE)
        result.profile = str(out / TABLE_FILE)  # where the table lies once the output is in place
        write_file_atomic(staging / ALLOCATION_FILE, result.model_dump_json(indent=1))
        fields = set(QuantizeSettings.model_fields) - {"scheme", "lm_head"}
        quantized = quantize_model(
            QuantizeSettings(**settings.model_dump(include=fields)), result.allocation, clock, progress
        )
        extra = {
            "target_bits": settings.target_bits,
            "solver": result.solver,
            "proxy": result.proxy,
            "predicted_loss": result.predicted_loss,
            "search": {
                k: v for k, v in found.items() if k not in ("path", "profile", "model", "stage_seconds", "seconds")
            },
        }
        metrics = save_checkpoint(staging, quantized, settings, clock, extra)
    shutil.rmtree(scratch, ignore_errors=True)
    return metrics


ALLOCATION_FILE = "allocation.json"  # in an `automp run` directory: the search result


def _check_reachable(settings: RunSettings) -> None:
    """Refuse a target below what the cheapest allowed formats can store before spending a profile on it.

    The layer shapes come from the model built on the ``meta`` device (no weights are read). When that
    cannot be built here, the check is left to the search, which makes the exact one after profiling.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from automp.formats import parse_formats

    formats = parse_formats(settings.formats)
    try:
        config = AutoConfig.from_pretrained(settings.model, trust_remote_code=settings.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)
    except Exception:  # a hub id offline, a broken config: loading the model reports it properly
        return
    layers = inventory(skeleton).layers
    cheapest = 0
    for layer in layers:
        bits = []
        for fmt in formats:
            with contextlib.suppress(AutompError):  # groups that do not divide: the profile reports it
                fmt.check_shape(layer.out_features, layer.in_features)
                bits.append(fmt.storage_bits(layer.out_features, layer.in_features))
        cheapest += min(bits, default=0)
    minimum = math.ceil(cheapest / sum(layer.numel for layer in layers) * 1e4) / 1e4
    if settings.target_bits < minimum:
        raise AutompError(
            f"target {settings.target_bits:g} avg bits is below the minimum achievable {minimum:.4f} avg bits "
            f"with the formats {settings.formats}"
        )
