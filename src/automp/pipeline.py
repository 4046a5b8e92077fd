"""The commands as Python functions: each takes its settings and returns the metrics it reports.

Outputs are written to a staging directory beside the target and renamed into place only when the
whole command succeeded, so a failure never leaves a partial output directory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from automp.allocation import Allocation
from automp.budget import Budget
from automp.checkpoint import SpilledWeights, model_bytes, save_quantized
from automp.data import load_windows
from automp.errors import AutompError
from automp.evaluate import perplexity
from automp.execution.blocks import model_device
from automp.execution.executor import get_executor
from automp.execution.offload import is_streamed, load_planned
from automp.export import REPORT_FILE, RunDir, export_run
from automp.export.run_dir import SETTINGS_FILE
from automp.formats import get_format
from automp.io import check_output, staged_output, write_file_atomic
from automp.lm_eval_backend import evaluate_tasks_lm_eval
from automp.model import (
    EMBED_ROLE,
    HEAD_ROLE,
    checked_seqlen,
    embedding_name,
    inventory,
    inventory_for,
    lm_head_name,
    max_positions,
    resolve_device,
)
from automp.quantize import GPTQConfig, quantize_
from automp.quantizers.qweight import QWeight
from automp.repair import E2EConfig, ReconstructConfig, RepairConfig, RepairReport, repair_
from automp.repair.methods import DURING_QUANTIZATION, unstreamed
from automp.repair.selfgen import cached_windows
from automp.repair.seq_finetune import SeqFinetuneConfig, SeqFinetuneRecord, downstream_tuner
from automp.search.problem import Problem
from automp.sensitivity.table import SensitivityTable
from automp.settings import (
    EvalSettings,
    ExportSettings,
    ProfileSettings,
    QuantizeSettings,
    RepairSettings,
    RunSettings,
    SearchSettings,
)
from automp.tasks import evaluate_tasks, resolve_tasks_dir
from automp.timing import Stopwatch
from automp.usage import peak_memory, reset_peak_memory, throughput


def window_length(model, requested: int | None) -> int:
    return checked_seqlen(requested, max_positions(model))


def evaluate(settings: EvalSettings, progress: bool = True) -> dict:
    """Perplexity and/or zero-shot task accuracy, with peak memory and forward tokens per second."""
    clock = Stopwatch()
    device = resolve_device(settings.device)
    reset_peak_memory(device)
    names = [name.strip() for name in (settings.tasks or "").split(",") if name.strip()]
    if not settings.ppl and not names:
        raise AutompError("nothing to evaluate: give --ppl TEXT and/or --tasks NAMES")
    if settings.log_samples is not None:
        if not names or settings.backend != "automp":
            raise AutompError("--log-samples logs automp's task scorer: give --tasks with --backend automp")
        check_output(settings.log_samples, "file", "--log-samples")
    with clock.stage("load"):
        tasks_dir = resolve_tasks_dir(settings.tasks_dir) if names and settings.backend == "automp" else None
        stages = ("load", *(["perplexity"] if settings.ppl else []), *(["tasks"] if names else []))
        model, tokenizer = load_planned(settings, stages)
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
                    model, tokenizer, names, tasks_dir, settings.limit, settings.batch_size, progress,
                    log_samples=settings.log_samples,
                )  # fmt: skip
                tokens, seconds = tokens + cost.tokens, seconds + cost.seconds
    metrics.update(peak_memory(device), tokens_per_s=throughput(tokens, seconds), forward_tokens=tokens)
    return {**metrics, "streamed": is_streamed(model), "seconds": clock.total, "stage_seconds": clock.seconds}


@dataclass
class Quantized:
    """A model quantized in memory, with the figures ``automp quantize`` reports about it."""

    model: nn.Module
    tokenizer: Any
    allocation: Allocation
    qweights: dict[str, QWeight]
    metrics: dict
    repair: RepairReport | None = None


def quantize_model(
    settings: QuantizeSettings,
    allocation: Allocation | None = None,
    clock: Stopwatch | None = None,
    progress: bool = True,
    table: SensitivityTable | None = None,
) -> Quantized:
    """Load, quantize with ``allocation`` (default: ``settings.scheme`` for every layer), repair when
    ``settings.repair`` asks (``table`` feeds the sgra/joint schedules), and evaluate perplexity when
    ``settings.eval`` is given. Nothing is written but the repair's resumable state."""
    clock = clock or Stopwatch()
    with clock.stage("load"):
        stages = ["load", *([settings.method] if settings.method != "rtn" else []), "export"]
        stages += ["repair"] * bool(settings.repair) + ["perplexity"] * bool(settings.eval)
        model, tokenizer = load_planned(settings, tuple(stages), unstreamed(settings.repair))
        seqlen = window_length(model, settings.seqlen)
        named = allocation.formats if allocation is not None else ()  # a saved allocation's head and embedding
        inv = inventory_for(model, named, lm_head=settings.lm_head, embeddings=settings.embeddings)
        if allocation is None:
            allocation, scheme = Allocation.uniform(inv, settings.scheme), settings.scheme
        else:
            allocation.check(inv)
            scheme = "mixed"
        calib = None
        if settings.method != "rtn" or (settings.repair and settings.train_data == "calib"):
            if settings.calib is None:
                needs = f"--method {settings.method}" if settings.method != "rtn" else f"--repair {settings.repair}"
                raise AutompError(f"{needs} needs calibration text (--calib)")
            calib = load_windows(settings.calib, tokenizer, seqlen, settings.nsamples, settings.seed)
        windows = load_windows(settings.eval, tokenizer, seqlen) if settings.eval else None
    reference = None  # the full-precision model repair trains towards: a copy, or streamed from its own offload
    if settings.repair:
        if is_streamed(model):
            offload_dir = settings.offload_dir and Path(settings.offload_dir) / "reference"
            reference = load_planned(settings, tuple(stages), offload_dir=offload_dir)[0]
        else:
            reference = copy.deepcopy(model)
    tuned = SeqFinetuneRecord() if settings.repair and DURING_QUANTIZATION in settings.repair else None
    after_block = None
    if tuned is not None:  # the blocks downstream train as each block is quantized
        after_block = downstream_tuner(model, reference, calib, SeqFinetuneConfig(seed=settings.seed), tuned)
    # streamed, the codes wait on disk (the checkpoint then writes them in shards)
    codes = SpilledWeights(_scratch(settings.out, "codes")) if is_streamed(model) else None
    with clock.stage("quantize"):
        gptq = GPTQConfig.of(settings)
        qweights = quantize_(
            model, allocation, settings.method, calib, gptq=gptq, batch_size=settings.batch_size, progress=progress,
            after_block=after_block, codes=codes,
        )  # fmt: skip
    repaired = None
    if settings.repair:
        with clock.stage("repair"):
            state = _scratch(settings.out, "repair")
            repaired = repair_model(settings, model, reference, qweights, calib, allocation, table, state, progress)
            repaired.seq_finetune = None if tuned is None else asdict(tuned)
        del reference
    metrics = {
        "scheme": scheme,
        "method": settings.method,
        "avg_bits": allocation.avg_bits(inv),
        "bytes": model_bytes(model, qweights),
        "layers": len(qweights),
        "lm_head_quantized": lm_head_name(model) in qweights,
        **({"repair": repaired.summary()} if repaired else {}),
        "embeddings_quantized": embedding_name(model) in qweights,
        "streamed": is_streamed(model),
    }
    if windows is not None:
        with clock.stage("eval"):
            result = perplexity(model, windows, settings.batch_size, progress)
        metrics.update(ppl=result.ppl, eval=result.summary())
    return Quantized(model, tokenizer, allocation, qweights, metrics, repaired)


def save_checkpoint(staging: Path, quantized: Quantized, settings: BaseModel, clock: Stopwatch, extra: dict) -> dict:
    """Write the automp checkpoint, ``metrics.json`` (the quantizer's figures, then ``extra``, then the
    timings) and ``automp_config.json`` (``settings``) into ``staging``; returns the metrics."""
    with clock.stage("save"):
        save_quantized(staging, quantized.model, quantized.tokenizer, quantized.allocation, quantized.qweights)
        if quantized.repair is not None:
            (staging / REPAIR_FILE).write_text(json.dumps(asdict(quantized.repair), indent=1))
    metrics = {**quantized.metrics, **extra, "seconds": clock.total, "stage_seconds": clock.seconds}
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (staging / "automp_config.json").write_text(settings.model_dump_json(indent=1))
    return metrics


REPAIR_FILE = "repair.json"  # in a repaired checkpoint: what each block's training did
REPAIR_SETTINGS_FILE = "repair_config.json"  # automp repair's settings (automp_config.json stays the run's)


def repair_model(
    settings: QuantizeSettings | RunSettings | RepairSettings,
    model: nn.Module,
    reference: nn.Module,
    qweights: dict[str, QWeight],
    calib: torch.Tensor | None,
    allocation: Allocation,
    table: SensitivityTable | None,
    state_dir: Path,
    progress: bool = True,
) -> RepairReport:
    """Train ``model``'s quantized layers towards ``reference`` (``settings.repair``), in place; a killed
    repair resumes from ``state_dir``, which is removed once the caller has saved the result."""
    blocks = ReconstructConfig(epochs=settings.repair_epochs, iters=settings.repair_iters, seed=settings.seed)
    e2e = E2EConfig(epochs=settings.e2e_epochs, loss=settings.e2e_loss, seed=settings.seed)
    proxy = getattr(settings, "proxy", "outgrad")
    config = RepairConfig(
        tuple(settings.repair.split(",")), settings.schedule, settings.equal_steps, proxy, 2, blocks, e2e
    )
    _check_repair_state(state_dir, {"settings": settings.model_dump(mode="json", exclude={"eval", "out"})})
    windows = calib
    if settings.train_data == "self-generated":
        n, seqlen = (len(calib), calib.shape[1]) if calib is not None else (settings.nsamples, settings.seqlen)
        windows = cached_windows(reference, state_dir / "data", n, seqlen, settings.seed, progress=progress)
    return repair_(
        model, qweights, reference, windows, config, table=table, allocation=allocation, state_dir=state_dir,
        progress=progress,
    )  # fmt: skip


def _check_repair_state(state_dir: Path, manifest: dict) -> None:
    """Refuse to resume a repair state written under other settings; start one when there is none."""
    file = state_dir / "manifest.json"
    if file.is_file() and json.loads(file.read_text()) != manifest:
        raise AutompError(f"{state_dir} holds a repair made with other settings: remove it to start over")
    state_dir.mkdir(parents=True, exist_ok=True)
    write_file_atomic(file, json.dumps(manifest, indent=1))


def quantize(settings: QuantizeSettings, progress: bool = True) -> dict:
    """Load, quantize (uniformly with ``settings.scheme``, or with the saved ``settings.allocation``),
    optionally evaluate, save to ``settings.out``."""
    check_output(settings.out)
    clock = Stopwatch()
    allocation, extra = None, {}
    if settings.allocation is not None:
        if "scheme" in settings.model_fields_set:  # given as a flag or in the config file, not the default
            raise AutompError("give either --scheme (one format for every layer) or --allocation FILE, not both")
        allocation = Allocation.load(settings.allocation)  # also reads `automp search` results: their `formats`
        extra = {"allocation": str(settings.allocation)}
    with staged_output(settings.out) as staging:
        quantized = quantize_model(settings, allocation, clock, progress)
        metrics = save_checkpoint(staging, quantized, settings, clock, extra)
    _remove_scratch(settings.out)
    return metrics


SCRATCH = ("repair", "codes")  # beside the output: a repair's resumable state, a streamed run's spilled codes


def _scratch(out: Path, kind: str) -> Path:
    return Path(out).parent / f".{Path(out).name}.{kind}"


def _remove_scratch(out: Path) -> None:
    for kind in SCRATCH:
        shutil.rmtree(_scratch(out, kind), ignore_errors=True)


def repair(settings: RepairSettings, progress: bool = True) -> dict:
    """Repair the quantized model of the run directory ``settings.run`` by training; save it to ``settings.out``.

    The full-precision model, calibration text, window count, length and seed default to the run's own
    (its ``automp_config.json``); sgra/joint read the run's ``sensitivity.json`` unless ``--profile``."""
    from automp.checkpoint import load_quantized
    from automp.sensitivity.table import TABLE_FILE

    check_output(settings.out)
    if Path(settings.out).resolve() == Path(settings.run).resolve():
        raise AutompError("--out must differ from --run: the repair would replace the run it reads")
    clock = Stopwatch()
    with clock.stage("load"):
        run_dir = RunDir.open(settings.run)
        made = run_dir.settings
        defaults = {key: made.get(key) for key in ("model", "calib", "nsamples", "seqlen") if made.get(key) is not None}
        given = settings.model_dump(exclude_none=True)
        settings = RepairSettings(**{**defaults, **given})
        if settings.model is None:
            raise AutompError(f"{settings.run} does not say which model it was made from: give --model")
        if DURING_QUANTIZATION in settings.repair:
            raise AutompError(
                f"{DURING_QUANTIZATION} trains while the model is quantized, not after: "
                f"use automp quantize (or run) --repair {DURING_QUANTIZATION}"
            )
        if settings.train_data == "calib" and settings.calib is None:
            raise AutompError(f"{settings.run} does not say its calibration text: give --calib")
        table_file = settings.profile or (Path(settings.run) / TABLE_FILE)
        table = SensitivityTable.load(table_file) if Path(table_file).exists() else None
        if settings.profile is not None and table is None:
            raise AutompError(f"--profile {settings.profile}: no sensitivity table there")
        if settings.schedule != "uniform" and table is None:
            raise AutompError(f"--schedule {settings.schedule} needs the sensitivity profile: {settings.run} has none; "
                              "give --profile FILE, or --schedule uniform")  # fmt: skip
        reference, tokenizer = load_planned(settings, ("load", "repair"), "automp repair (of a saved run)")
        device = model_device(reference)
        stored = run_dir.quantized_weights()  # read once: the model is rebuilt from them
        model = load_quantized(Path(settings.run), next(reference.parameters()).dtype, stored).to(device)
        qweights = {name: q.to(device) for name, q in stored.items()}
        seqlen = window_length(reference, settings.seqlen)
        nsamples = settings.nsamples or 128
        calib = None
        if settings.train_data == "calib":
            calib = load_windows(settings.calib, tokenizer, seqlen, nsamples, settings.seed)
        settings = settings.model_copy(update={"nsamples": nsamples, "seqlen": seqlen})
        windows = load_windows(settings.eval, tokenizer, seqlen) if settings.eval else None
    state = _scratch(settings.out, "repair")
    with clock.stage("repair"):
        report = repair_model(settings, model, reference, qweights, calib, run_dir.allocation, table, state, progress)
    metrics = {
        "run": str(settings.run),
        "avg_bits": run_dir.allocation.avg_bits(run_dir.inventory),
        "bytes": model_bytes(model, qweights),
        "repair": report.summary(),
    }
    if windows is not None:
        with clock.stage("eval"):
            metrics["ppl"] = perplexity(model, windows, settings.batch_size, progress).ppl
    with staged_output(settings.out) as staging:
        quantized = Quantized(model, tokenizer, run_dir.allocation, qweights, metrics, report)
        for name in (TABLE_FILE, ALLOCATION_FILE):
            if (Path(settings.run) / name).is_file():
                shutil.copyfile(Path(settings.run) / name, staging / name)
        metrics = save_checkpoint(staging, quantized, settings, clock, {})
        (staging / REPAIR_SETTINGS_FILE).write_text(settings.model_dump_json(indent=1))
        if (Path(settings.run) / SETTINGS_FILE).is_file():  # exports read how the codes were made from it
            shutil.copyfile(Path(settings.run) / SETTINGS_FILE, staging / SETTINGS_FILE)
    _remove_scratch(settings.out)
    return metrics


def profile(settings: ProfileSettings, progress: bool = True) -> dict:
    """Measure every layer x format and save the sensitivity table to ``settings.out``.

    Measurements accumulate in a work directory beside the output (``.<out>.profile-work``) that
    survives a crash or a kill. Rerunning the same command resumes from it, and it is removed
    only once the table is in place.
    """
    from automp.formats import parse_formats
    from automp.sensitivity.profile import profile_model
    from automp.sensitivity.table import TABLE_FILE, CalibInfo
    from automp.sensitivity.windows import WINDOWS_FILE

    check_output(settings.out)
    clock = Stopwatch()
    with clock.stage("load"):
        model, tokenizer = load_planned(settings, ("load", "profile", *(["profile.kl"] if settings.kl else [])))
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
    with get_executor(settings.executor, settings.ray_address) as executor:
        table = profile_model(
            model, formats, calib,
            model_name=settings.model,
            calib_info=CalibInfo(spec=settings.calib, nsamples=len(calib), seqlen=seqlen, seed=settings.seed),
            kl_windows=kl_windows, work_dir=work, gptq=GPTQConfig.of(settings),
            batch_size=settings.batch_size, progress=progress, clock=clock, per_window=settings.per_window,
            lm_head=settings.lm_head, embeddings=settings.embeddings, executor=executor,
        )  # fmt: skip
    with staged_output(out) as staging:
        table.save(staging)
        if settings.per_window:
            shutil.copyfile(work / WINDOWS_FILE, staging / WINDOWS_FILE)
        metrics = {
            "layers": len(table.layers),
            "formats": table.formats,
            "kl": settings.kl,
            "streamed": is_streamed(model),
            "seconds": clock.total,
            "stage_seconds": clock.seconds,
            "path": str(out / TABLE_FILE),
        }
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (staging / "automp_config.json").write_text(settings.model_dump_json(indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def search(settings: SearchSettings, windows: torch.Tensor | None = None) -> dict:
    """Choose each layer's format from a saved sensitivity table: one allocation for the budget,
    saved to ``out``; or, with ``frontier``, the predicted loss at every target in a range.

    ``windows``: held-out token windows for the measuring steps (solvers that evaluate, ``--verify``,
    ``--refine``) instead of ``settings.eval``; ``automp run`` passes its verification windows."""
    from automp.search.frontier import frontier, parse_range
    from automp.search.registry import get_solver
    from automp.search.result import SearchResult

    if settings.out is not None:
        check_output(settings.out, "file")
    clock = Stopwatch()
    with clock.stage("load"):
        table = SensitivityTable.load(settings.profile)
        problem = search_problem(settings, table)
    options = {"max_loss": settings.max_loss} if settings.max_loss is not None else {}
    if settings.frontier is not None:
        with clock.stage("search"):
            lo, hi, step = parse_range(settings.frontier)
            points = frontier(problem, lo, hi, step, solver=settings.solver, seed=settings.seed, **options)
        count, dense = problem.table.weight_count(), problem.table.dense_bytes
        curve = [
            {"target_bits": p.target_bits, "avg_bits": p.avg_bits, "predicted_loss": p.predicted_loss,
             "bytes": math.ceil(round(p.avg_bits * count) / 8) + dense}
            for p in points
        ]  # fmt: skip
        return {"frontier": curve, "solver": settings.solver, "proxy": settings.proxy, "seconds": clock.total}
    from automp.search.measure import build_evaluator, check_and_refine, solver_options

    with get_executor(settings.executor, settings.ray_address) as executor:  # its workers end with the block
        with clock.stage("evaluator"):  # only when something measures real quality (--eval)
            evaluator = build_evaluator(settings, problem, windows, executor)
        with clock.stage("search"):
            engine = get_solver(settings.solver, **options, **solver_options(settings))
            solution = engine.solve(problem, seed=settings.seed, evaluator=evaluator)
        extra: dict = {}
        if evaluator is not None:  # --verify K, --refine, and the real loss of the result
            with clock.stage("verify"):
                solution, extra = check_and_refine(settings, problem, solution, evaluator)
            if settings.seq_finetune:  # the cost of fine-tuning inside every evaluation
                extra["seq_finetune"] = {"evaluations": evaluator.evaluations, "seconds": evaluator.seconds}
    result = SearchResult.of(problem, solution, profile=str(settings.profile), seed=settings.seed)
    with clock.stage("save"):
        write_file_atomic(settings.out, result.model_dump_json(indent=1))
    summary = result.summary() | {"solver_seconds": result.seconds, "seconds": clock.total}
    return {**summary, **extra, "stage_seconds": clock.seconds, "path": str(settings.out)}


def search_problem(settings: SearchSettings, table: SensitivityTable) -> Problem:
    """The Problem a search settings object describes, checked against the table: the budget as
    average bits, the allowed formats (narrowed to what ``--engine`` serves) and the ties."""
    budgets = [settings.target_bits, settings.target_size, settings.fit_memory]
    if settings.frontier is not None and any(b is not None for b in budgets):
        raise AutompError("automp search takes a budget (--target-bits/--target-size/--fit-memory) or --frontier")
    table = optional_layers(settings, table)
    target = 16.0
    if settings.frontier is None:
        budget = Budget.of(settings)
        if settings.out is None:
            raise AutompError("automp search with a budget needs --out FILE for the allocation")
        config = _config(settings.model or table.model, False) if budget.fit_memory is not None else None
        target = budget.average_bits(table.weight_count(), table.dense_bytes, len(table.layers), config)
    allowed, dropped = engine_formats(settings.formats or ",".join(table.formats), settings.engine)
    return Problem(
        table=table,
        proxy=settings.proxy,
        target_bits=target,
        allowed=allowed if (settings.formats or dropped) else None,
        pinned=settings.pin,
        tie_fused=settings.tie_fused or settings.engine == "vllm",
    )


def optional_layers(settings: SearchSettings, table: SensitivityTable) -> SensitivityTable:
    """The table with its output head / token embedding as ``--lm-head`` / ``--embeddings`` ask: kept when
    the flag is unset (None) or True, dropped (left 16-bit, counted as fixed bytes) when False; a flag that
    is True for a layer the table lacks is an error."""
    dropped = set()
    flags = ((HEAD_ROLE, settings.lm_head, "--lm-head"), (EMBED_ROLE, settings.embeddings, "--embeddings"))
    for role, flag, option in flags:
        names = {layer.name for layer in table.layers if layer.role == role}
        if flag and not names:
            raise AutompError(f"{option}: the sensitivity table has no {role} layer; profile again with {option}")
        if flag is False:
            dropped |= names
    return table.without(dropped) if dropped else table


def engine_formats(formats: str, engine: str) -> tuple[list[str], list[str]]:
    """The formats an engine serves among ``formats`` (kept, dropped): every format for transformers,
    GGUF types and 16-bit for llama.cpp, what vLLM's kernels take for vllm."""
    from automp.export.vllm_support import servable_format
    from automp.formats import parse_formats

    parsed = parse_formats(formats)
    if engine == "llama.cpp":
        kept = [f.name for f in parsed if f.ggml_type is not None and not f.rank]  # no +rN: export/peft_adapter.py
        if not any(get_format(name).quantized for name in kept):
            raise AutompError(
                f"--engine llama.cpp stores none of the formats {formats}: profile GGUF types "
                "(q2_k, q3_k, q4_k, q5_k, q6_k, q8_0, q4_0, iq4_nl) with --engine llama.cpp"
            )
        return kept, [f.name for f in parsed if f.name not in kept]
    if engine != "vllm":
        return [f.name for f in parsed], []
    kept = [f.name for f in parsed if servable_format(f)]
    if not any(get_format(name).quantized for name in kept):
        raise AutompError(
            f"--engine vllm serves none of the formats {formats}: its kernels take symmetric 4/8-bit and "
            "asymmetric 4-bit integers per channel or in groups of 32/64/128 (e.g. w4g128, w4g64, w8)"
        )
    return kept, [f.name for f in parsed if not servable_format(f)]


def _config(model: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as err:  # offline hub id, missing or broken config.json
        raise AutompError(f"could not read the config of {model} (needed for --fit-memory): {err}") from err


def export(settings: ExportSettings) -> dict:
    """Write a deployable export (``settings.format``) of the automp output directory ``settings.run``."""
    check_output(settings.out)
    clock = Stopwatch()
    if Path(settings.out).resolve() == Path(settings.run).resolve():
        raise AutompError("--out must differ from --run: the export would replace the run it reads")
    with clock.stage("load"):
        run = RunDir.open(settings.run)
    with staged_output(settings.out) as staging:
        with clock.stage("export"):
            report = export_run(run, settings.format, staging, settings.engine)
        report = {"format": settings.format, "out": str(settings.out), **report}  # report names its engine
        report.update(seconds=clock.total, stage_seconds=clock.seconds)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


def run(settings: RunSettings, progress: bool = True) -> dict:
    """The whole job in one directory ``settings.out``: profile, search, verify, quantize the delivered
    allocation, evaluate.

    The sensitivity table is reused from ``<out>/sensitivity.json`` when a previous run left one there.
    Otherwise it is measured into a hidden directory beside the output (``.<out>.profile``), which a
    failed or killed run leaves behind so that the next run resumes or reuses it; it is removed once
    the output is in place. Verification (``delivery.py``) measures the search's allocation, every
    proxy's knapsack and the uniform formats within the budget, quantized for real on held-out windows,
    and delivers the best; ``--no-verify`` delivers the search's allocation unmeasured.
    """
    from automp.delivery import VERIFICATION_FILE, deliver
    from automp.search.bootstrap import check_bootstrappable
    from automp.search.result import SearchResult
    from automp.sensitivity.table import TABLE_FILE
    from automp.sensitivity.windows import WINDOWS_FILE

    check_output(settings.out)
    clock = Stopwatch()
    out = Path(settings.out)
    budget = Budget.of(settings)
    if settings.calib is None:
        raise AutompError("automp run needs calibration text (--calib)")
    _check_run_options(settings)
    if settings.bootstrap:
        check_bootstrappable(settings.proxy)
    formats, dropped = engine_formats(settings.formats, settings.engine)
    _check_reachable(settings, budget, formats)
    cached = out / TABLE_FILE
    scratch = _scratch(out, "profile")

    def complete(table: Path) -> bool:  # --bootstrap also needs the per-window terms beside the table
        found = table.is_file() and (not settings.bootstrap or (table.parent / WINDOWS_FILE).is_file())
        return found and _holds_optional_layers(SensitivityTable.load(table), settings)

    if not complete(cached):
        cached = scratch / TABLE_FILE
        if not complete(cached):
            fields = set(ProfileSettings.model_fields) - {"out", "formats"}
            profile_settings = ProfileSettings(
                **settings.model_dump(include=fields), formats=",".join(formats), out=scratch,
                per_window=settings.bootstrap > 0,
            )  # fmt: skip
            profiled = profile(profile_settings, progress)
            clock.seconds["profile"] = profiled["seconds"]
    with staged_output(out) as staging:
        shutil.copyfile(cached, staging / TABLE_FILE)
        if (cached.parent / WINDOWS_FILE).is_file():
            shutil.copyfile(cached.parent / WINDOWS_FILE, staging / WINDOWS_FILE)
        table = SensitivityTable.load(staging / TABLE_FILE)
        model = calib = held_out = None  # loaded only when something measures real quality
        if _measures(settings):
            with clock.stage("load"):
                stages = ("load", *([settings.method] if settings.method != "rtn" else []))
                model, tokenizer = load_planned(settings, stages)
                seqlen = window_length(model, settings.seqlen)
                calib = load_windows(settings.calib, tokenizer, seqlen, settings.nsamples, settings.seed)
                held_out = _verification_windows(settings, tokenizer, seqlen)
        # the options both commands share; `method` is run's final quantizer, `eval` its reported text
        shared = set(SearchSettings.model_fields) & set(RunSettings.model_fields)
        shared -= {"out", "method", "eval", "formats"}
        search_settings = SearchSettings(
            profile=staging / TABLE_FILE, out=staging / ALLOCATION_FILE, formats=",".join(formats),
            method="gptq" if settings.method == "gptq" else "rtn", **settings.model_dump(include=shared),
        )  # fmt: skip
        with clock.stage("search"):
            evaluator_windows = None if held_out is None else held_out[0][: settings.eval_windows]
            found = search(search_settings, evaluator_windows)
        result = SearchResult.load(staging / ALLOCATION_FILE)
        problem = search_problem(search_settings, table)
        verification = None
        if settings.verify_delivery:
            with clock.stage("verify"):
                solution, verification = deliver(settings, problem, result, model, calib, held_out, progress)
            result = SearchResult.of(problem, solution, profile="", seed=settings.seed)
            write_file_atomic(staging / VERIFICATION_FILE, verification.model_dump_json(indent=1))
        del model
        stability = _bootstrap(settings, problem, result, staging) if settings.bootstrap else None
        result.profile = str(out / TABLE_FILE)  # where the table lies once the output is in place
        write_file_atomic(staging / ALLOCATION_FILE, result.model_dump_json(indent=1))
        fields = set(QuantizeSettings.model_fields) - {"scheme", "lm_head", "embeddings", "allocation"}
        quantized = quantize_model(
            QuantizeSettings(**settings.model_dump(include=fields)), result.allocation, clock, progress, table
        )
        extra = {
            "target_bits": result.target_bits,
            "budget": budget.describe(quantized.model.config),
            "engine": {"name": settings.engine, "dropped_formats": dropped},
            "solver": result.solver,
            "proxy": result.proxy,
            "predicted_loss": result.predicted_loss,
            "search": {
                k: v for k, v in found.items() if k not in ("path", "profile", "model", "stage_seconds", "seconds")
            },
        }
        if verification is not None:
            extra["verification"] = verification.summary()
            extra["delivered"] = verification.delivered
        if stability is not None:
            extra["bootstrap"] = stability
        metrics = save_checkpoint(staging, quantized, settings, clock, extra)
    shutil.rmtree(scratch, ignore_errors=True)
    _remove_scratch(out)
    return metrics


ALLOCATION_FILE = "allocation.json"  # in an `automp run` directory: the delivered allocation


def _bootstrap(settings: RunSettings, problem: Problem, result, staging: Path) -> dict:
    """``--bootstrap N``: how stable the knapsack's choice is over N calibration resamples, under the proxy
    that chose the delivered allocation (``--proxy`` when that proxy cannot be resampled, or for uniform)."""
    from dataclasses import replace

    from automp.search.bootstrap import BOOTSTRAP_PROXIES, bootstrap
    from automp.sensitivity.windows import WindowCosts

    proxy = result.proxy if result.proxy in BOOTSTRAP_PROXIES else settings.proxy
    found = bootstrap(replace(problem, proxy=proxy), WindowCosts.load(staging), settings.bootstrap, settings.seed)
    found.save(staging)
    return found.summary()


def _holds_optional_layers(table: SensitivityTable, settings: RunSettings) -> bool:
    """Whether a cached table has the head and the embedding when ``--lm-head`` / ``--embeddings`` ask for them."""
    roles = {layer.role for layer in table.layers}
    return (HEAD_ROLE in roles or not settings.lm_head) and (EMBED_ROLE in roles or not settings.embeddings)


def _measures(settings: RunSettings) -> bool:
    """Whether anything in the run measures real quality on held-out windows."""
    from automp.search.measure import MEASURING_SOLVERS

    return settings.verify_delivery or settings.solver in MEASURING_SOLVERS or bool(settings.verify) or settings.refine


def _check_run_options(settings: RunSettings) -> None:
    from automp.data import sources

    for name in ("verify_windows", "eval_windows"):
        if getattr(settings, name) < 1:
            raise AutompError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    for name in ("max_evals", "bootstrap"):
        if getattr(settings, name) < 0:
            raise AutompError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(settings, name)}")
    if settings.verify_text is not None:
        chosen_on = set(sources(settings.verify_text))
        if settings.eval is not None and chosen_on & set(sources(settings.eval)):
            raise AutompError(
                "--verify-text must differ from --eval: the delivered allocation would be chosen on the text "
                "its perplexity is reported on"
            )
        if chosen_on & set(sources(settings.calib)):
            raise AutompError("--verify-text must differ from --calib (give no --verify-text to use held-out windows)")


def _verification_windows(settings: RunSettings, tokenizer, seqlen: int) -> tuple[torch.Tensor, str]:
    """(windows, where they came from): ``--verify-text``'s windows spread over the text, or windows of
    the calibration text that no calibration window touches (drawn under seed + 2)."""
    from automp.data import load_heldout_windows

    count = settings.verify_windows
    if settings.verify_text is not None:
        windows = load_windows(settings.verify_text, tokenizer, seqlen)
        picks = torch.linspace(0, len(windows) - 1, min(count, len(windows))).round().long().unique()
        return windows[picks], f"{settings.verify_text} ({len(picks)} windows spread over the text)"
    windows = load_heldout_windows(
        settings.calib, tokenizer, seqlen, count, settings.nsamples, settings.seed, settings.seed + 2
    )
    return windows, f"{settings.calib}, {len(windows)} windows no calibration window touches (seed {settings.seed + 2})"


def _check_reachable(settings: RunSettings, budget: Budget, formats: list[str]) -> None:
    """Refuse a budget below what the cheapest allowed formats can store before spending a profile on it.

    The layer shapes come from the model built on the ``meta`` device (no weights are read). When that
    cannot be built here, the check is left to the search, which makes the exact one after profiling.
    """
    from transformers import AutoModelForCausalLM

    try:
        config = _config(settings.model, settings.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)
    except Exception:  # a hub id offline, a broken config: loading the model reports it properly
        return
    layers = inventory(skeleton, include_lm_head=settings.lm_head, include_embeddings=settings.embeddings).layers
    names = {layer.name + ".weight" for layer in layers}
    dense, seen = 0, set()
    for name, tensor in skeleton.state_dict(keep_vars=True).items():  # tied tensors are one object: counted once
        if name not in names and id(tensor) not in seen:
            seen.add(id(tensor))
            dense += tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())
    weights = sum(layer.numel for layer in layers)
    target = budget.average_bits(weights, dense, len(layers), config)
    cheapest = 0
    for layer in layers:
        bits = []
        for fmt in map(get_format, formats):
            with contextlib.suppress(AutompError):  # groups that do not divide: the profile reports it
                fmt.check_shape(layer.out_features, layer.in_features)
                bits.append(fmt.storage_bits(layer.out_features, layer.in_features))
        cheapest += min(bits, default=0)
    minimum = math.ceil(cheapest / weights * 1e4) / 1e4
    if target < minimum:
        stated = "" if budget.target_bits is not None else f" (what the budget leaves: {budget.describe(config)})"
        raise AutompError(
            f"target {target:g} avg bits{stated} is below the minimum achievable {minimum:.4f} avg bits "
            f"with the formats {','.join(formats)}"
        )
