"""The ``automp`` command line. Each command builds its typed settings and calls the pipeline.

With ``--json`` a command prints exactly one JSON object as the last line of stdout; progress bars
and logs go to stderr. Errors print one line, ``error: ...``, and exit with status 2.

Each option takes its default from its settings class (``_defaults_from``), so ``--help`` shows the
value that applies; only the options given on the command line are passed on (``_flags``), so a
``--config`` file still fills the rest.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
from pydantic import BaseModel

from automp.errors import AutompError
from automp.settings import (
    EvalSettings,
    ExportSettings,
    PlanSettings,
    ProfileSettings,
    QuantizeSettings,
    RepairSettings,
    RunSettings,
    SearchSettings,
    SwitchableSettings,
    SwitchableTrainSettings,
    load_settings,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Automated mixed-precision quantization of LLMs.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of settings; flags override it.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Local model directory or hub id.")]
SeqlenOpt = Annotated[int | None, typer.Option("--seqlen", help="Window length (default 2048, capped at the model's).")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto, float32, float16 or bfloat16.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")]
OffloadOpt = Annotated[
    str | None, typer.Option("--offload", help="Decoder blocks: auto (the memory plan), none, cpu or disk (streamed).")
]
OffloadDirOpt = Annotated[Path | None, typer.Option("--offload-dir", help="--offload disk: where blocks are written.")]
DeviceMemoryOpt = Annotated[
    str | None, typer.Option("--device-memory", help="Device memory to plan for, e.g. 24GiB (default: the device's).")
]
CpuMemoryOpt = Annotated[
    str | None, typer.Option("--cpu-memory", help="Host memory to plan for, e.g. 64GiB (default: the host's).")
]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Windows per forward pass.")]
RemoteOpt = Annotated[bool | None, typer.Option("--trust-remote-code", help="Run the model repo's own code.")]
CalibOpt = Annotated[str | None, typer.Option(help="Calibration text: .txt, .jsonl, wikitext2 or c4.")]
NsamplesOpt = Annotated[int | None, typer.Option(help="Calibration windows.")]
DampOpt = Annotated[float | None, typer.Option(help="GPTQ relative damping.")]
ActOrderOpt = Annotated[bool | None, typer.Option("--act-order/--no-act-order", help="GPTQ column order.")]
RanksOpt = Annotated[
    str | None,
    typer.Option(help="Low-rank corrections to weigh against bits, e.g. 0,4,8,16: each quantized format also as +rN."),
]
CorrectionOpt = Annotated[
    str | None, typer.Option(help="+rN formats' estimator: exact (activation-aware), diag or svd (data-free).")
]
SolverOpt = Annotated[str | None, typer.Option(help="knapsack (exact), greedy, quantile, or a learned one.")]
ProxyOpt = Annotated[str | None, typer.Option(help="Predicted loss: outgrad, hessian, fisher, grad, weight or kl.")]
PinOpt = Annotated[list[str] | None, typer.Option("--pin", help="layer=format; repeatable.")]
TieOpt = Annotated[bool | None, typer.Option("--tie-fused", help="q/k/v and gate/up share a format.")]
ScheduleOpt = Annotated[
    str | None, typer.Option(help="Training per block: uniform, sgra (by sensitivity) or joint (and bits).")
]
EqualStepsOpt = Annotated[bool | None, typer.Option("--equal-steps", help="sgra/joint at uniform's total steps.")]
TrainDataOpt = Annotated[
    str | None, typer.Option("--train-data", help="calib, or self-generated (sampled from the FP model, cached).")
]
RepairEpochsOpt = Annotated[float | None, typer.Option(help="block-ap: epochs per block before the schedule.")]
RepairItersOpt = Annotated[int | None, typer.Option(help="sign-round: steps per block.")]
E2EEpochsOpt = Annotated[float | None, typer.Option("--e2e-epochs", help="e2e-qp: epochs over the windows.")]
E2ELossOpt = Annotated[str | None, typer.Option("--e2e-loss", help="e2e-qp: kl (to the FP model) or lm.")]
RepairOpt = Annotated[
    str | None,
    typer.Option(
        "--repair", help="Train: seq-finetune (while quantizing), block-ap or sign-round, e2e-qp; comma-separated."
    ),
]
EpisodesOpt = Annotated[int | None, typer.Option(help="reinforce / ppo: training episodes.")]
TargetBitsOpt = Annotated[
    float | None, typer.Option("--target-bits", help="Average stored bits per weight (scales, zeros counted).")
]
TargetSizeOpt = Annotated[
    str | None, typer.Option("--target-size", help="Budget: the whole stored model at most this size, e.g. 3.2GB.")
]
FitMemoryOpt = Annotated[
    str | None, typer.Option("--fit-memory", help="Budget: weights + KV cache + overhead fit this memory, e.g. 24GB.")
]
ContextOpt = Annotated[
    int | None, typer.Option("--context", help="--fit-memory: tokens per sequence (default: the model's maximum).")
]
BatchSeqOpt = Annotated[int | None, typer.Option("--batch", help="--fit-memory: sequences in the KV cache.")]
OverheadOpt = Annotated[
    str | None, typer.Option("--overhead", help="--fit-memory: runtime memory besides weights and KV cache.")
]
LmHeadOpt = Annotated[bool | None, typer.Option("--lm-head", help="Allocate the output head too.")]
EmbeddingsOpt = Annotated[
    bool | None, typer.Option("--embeddings", help="Allocate the token embedding too (RTN; llama.cpp's token_embd).")
]
EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="transformers (any format), vllm (only formats its kernels serve; fused tied) or llama.cpp (GGUF types).",
    ),
]
ExecutorOpt = Annotated[
    str | None,
    typer.Option(
        "--executor",
        help="serial, or ray: an actor pool (one actor per GPU, else CPU workers) measures in parallel "
        "(pip install 'automp[ray]').",
    ),
]
RayAddressOpt = Annotated[
    str | None, typer.Option("--ray-address", help="--executor ray: the cluster to join (default: a local one).")
]
MaxEvalsOpt = Annotated[
    int | None, typer.Option("--max-evals", help="Evaluations for --refine, anneal and verification's refinement.")
]


def _command(func):
    """Turn AutompError into one clear line on stderr and exit status 2, with no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return func(*args, **kwargs)
        except AutompError as err:
            typer.echo("error: " + " ".join(str(err).split()), err=True)  # always one line
            raise typer.Exit(2) from None

    return wrapper


def _defaults_from(settings: type[BaseModel]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give each option of a command the default of its ``settings`` field, so ``--help`` shows it.

    Fields that default to None or to an empty collection keep the option's None (nothing to show; the
    help text says what happens). A boolean field given as a single flag (``--kl``) also gets its
    negation (``--no-kl``), so its default shows and a flag can override a config file either way.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(func, eval_str=True)
        params = [_with_default(param, settings) for param in signature.parameters.values()]
        func.__signature__ = signature.replace(parameters=params)
        return func

    return decorate


def _with_default(param: inspect.Parameter, settings: type[BaseModel]) -> inspect.Parameter:
    field = settings.model_fields.get(param.name)
    if field is None or field.is_required() or field.default is None or field.default in ({}, []):
        return param
    if isinstance(field.default, bool) and get_origin(param.annotation) is Annotated:
        kind, info, *rest = get_args(param.annotation)
        # typer keeps the first name given inside Annotated in `default` (see typer.utils)
        names = [info.default] if isinstance(info.default, str) else list(info.param_decls or ())
        if len(names) == 1 and "/" not in names[0]:
            info = copy.copy(info)  # the Annotated aliases above are shared between commands
            info.default, info.param_decls = ..., (f"{names[0]}/--no-{names[0].removeprefix('--')}",)
            param = param.replace(annotation=Annotated[(kind, info, *rest)])
    return param.replace(default=field.default)


def _quiet_libraries() -> None:
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)


def _flags(ctx: typer.Context, params: dict) -> dict:
    """The options given on the command line, without the ones that steer the CLI itself. Options left
    at their defaults are dropped, so a ``--config`` file can still set them."""
    return {
        k: v
        for k, v in params.items()
        if k not in ("ctx", "config", "json_out") and ctx.get_parameter_source(k).name != "DEFAULT"
    }


def _emit(result: dict | list, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(result, default=str), flush=True)
    else:
        print(human, flush=True)


@app.command()
@_command
@_defaults_from(QuantizeSettings)
def quantize(
    ctx: typer.Context,
    model: ModelOpt = None,
    scheme: Annotated[str | None, typer.Option(help="Format for every layer, e.g. w4g128, w3g128a, nf4g64.")] = None,
    allocation: Annotated[
        Path | None, typer.Option(help="One format per layer instead: an allocation `automp search` saved.")
    ] = None,
    method: Annotated[str | None, typer.Option(help="rtn, gptq or awq.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    calib: CalibOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: SeqlenOpt = None,
    eval: Annotated[str | None, typer.Option("--eval", help="Evaluation text for perplexity.")] = None,
    damp: DampOpt = None,
    act_order: ActOrderOpt = None,
    correction: CorrectionOpt = None,
    lm_head: Annotated[bool | None, typer.Option("--lm-head", help="Quantize lm_head too.")] = None,
    embeddings: Annotated[
        bool | None, typer.Option("--embeddings", help="Quantize the token embedding too (RTN whatever --method).")
    ] = None,
    repair: RepairOpt = None,
    schedule: ScheduleOpt = None,
    equal_steps: EqualStepsOpt = None,
    train_data: TrainDataOpt = None,
    repair_epochs: RepairEpochsOpt = None,
    repair_iters: RepairItersOpt = None,
    e2e_epochs: E2EEpochsOpt = None,
    e2e_loss: E2ELossOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    offload: OffloadOpt = None,
    offload_dir: OffloadDirOpt = None,
    device_memory: DeviceMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    batch_size: BatchOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the calibration windows.")] = None,
    trust_remote_code: RemoteOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Quantize every layer with RTN, GPTQ or AWQ (one format, or a saved allocation) and save the packed model."""
    flags = _flags(ctx, locals())
    from automp.pipeline import quantize as run

    metrics = run(load_settings(QuantizeSettings, config, flags))
    human = f"{metrics['scheme']} ({metrics['method']}): {metrics['avg_bits']:.4f} bits/weight, "
    human += f"{metrics['bytes'] / 1e6:.3f} MB" + (f", ppl {metrics['ppl']:.3f}" if "ppl" in metrics else "")
    _emit(metrics, json_out, human)


@app.command("eval")
@_command
@_defaults_from(EvalSettings)
def eval_(
    ctx: typer.Context,
    model: ModelOpt = None,
    ppl: Annotated[str | None, typer.Option("--ppl", help="Perplexity text: .txt, .jsonl, wikitext2, c4.")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="Zero-shot tasks: piqa,arc_easy,winogrande,...")] = None,
    tasks_dir: Annotated[Path | None, typer.Option("--tasks-dir", help="Task .jsonl files (./data/eval).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Score only the first N items of each task.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="automp (local files) or lm-eval.")] = None,
    log_samples: Annotated[
        Path | None, typer.Option("--log-samples", help="Write every task item's log-likelihoods and picks (JSONL).")
    ] = None,
    seqlen: SeqlenOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    offload: OffloadOpt = None,
    offload_dir: OffloadDirOpt = None,
    device_memory: DeviceMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    batch_size: BatchOpt = None,
    trust_remote_code: RemoteOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a model (or an automp output directory): perplexity and/or zero-shot tasks, memory, speed."""
    flags = _flags(ctx, locals())
    from automp.pipeline import evaluate

    result = evaluate(load_settings(EvalSettings, config, flags))
    _emit(result, json_out, _eval_summary(result))


def _eval_summary(result: dict) -> str:
    lines = []
    if "ppl" in result:
        lines.append(f"perplexity {result['ppl']:.3f} over {result['windows']} windows ({result['tokens']} tokens)")
    for name, task in result.get("tasks", {}).items():
        lines.append(
            f"{name:<14} acc {task['acc']:.4f}"
            + (f"  acc_norm {task['acc_norm']:.4f}" if "acc_norm" in task else "")
            + f"  ± {task['stderr']:.4f}  n {task['count']}"
            + (f"  chance {task['chance']:.3f}" if "chance" in task else "")
        )
    speed = f", {result['tokens_per_s']:.0f} tokens/s" if result.get("tokens_per_s") else ""
    lines.append(f"peak memory {result['peak_memory_mb']:.0f} MB ({result['memory_kind']}){speed}")
    return "\n".join(lines)


@app.command()
@_command
@_defaults_from(ProfileSettings)
def profile(
    ctx: typer.Context,
    model: ModelOpt = None,
    formats: Annotated[
        str | None, typer.Option(help="Formats to measure, e.g. w2g64,w3g128,w4g128,w8,fp16 or q2_k,q4_k,q6_k,fp16.")
    ] = None,
    ranks: RanksOpt = None,
    engine: EngineOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output directory for sensitivity.json.")] = None,
    calib: CalibOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: SeqlenOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the calibration windows.")] = None,
    kl: Annotated[bool | None, typer.Option("--kl", help="Also measure KL per layer x format (slow).")] = None,
    kl_windows: Annotated[int | None, typer.Option("--kl-windows", help="Windows for the KL measurement.")] = None,
    kl_text: Annotated[str | None, typer.Option("--kl-text", help="Text for KL windows (default: --calib).")] = None,
    per_window: Annotated[
        bool | None,
        typer.Option("--per-window", help="Also save per-window proxy terms (for --bootstrap): one more pass."),
    ] = None,
    lm_head: LmHeadOpt = None,
    embeddings: EmbeddingsOpt = None,
    damp: DampOpt = None,
    act_order: ActOrderOpt = None,
    correction: CorrectionOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    offload: OffloadOpt = None,
    offload_dir: OffloadDirOpt = None,
    device_memory: DeviceMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    batch_size: BatchOpt = None,
    trust_remote_code: RemoteOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure every layer x format (bits, error proxies) into a sensitivity table; resumes if interrupted."""
    flags = _flags(ctx, locals())
    from automp.pipeline import profile as run

    result = run(load_settings(ProfileSettings, config, flags))
    human = f"profiled {result['layers']} layers x {len(result['formats'])} formats in {result['seconds']:.1f} s"
    _emit(result, json_out, f"{human} -> {result['path']}")


@app.command()
@_command
@_defaults_from(SearchSettings)
def search(
    ctx: typer.Context,
    profile: Annotated[Path | None, typer.Option(help="Sensitivity table directory from `automp profile`.")] = None,
    target_bits: TargetBitsOpt = None,
    target_size: TargetSizeOpt = None,
    fit_memory: FitMemoryOpt = None,
    context: ContextOpt = None,
    batch: BatchSeqOpt = None,
    overhead: OverheadOpt = None,
    engine: EngineOpt = None,
    frontier: Annotated[str | None, typer.Option(help="lo:hi:step: print predicted loss vs bits instead.")] = None,
    solver: SolverOpt = None,
    proxy: ProxyOpt = None,
    formats: Annotated[str | None, typer.Option(help="Allowed formats, e.g. w2g64,w3g128,w4g128,w8.")] = None,
    pin: PinOpt = None,
    tie_fused: TieOpt = None,
    lm_head: Annotated[
        bool | None,
        typer.Option(
            "--lm-head/--no-lm-head", help="Allocate a profiled head or keep it 16-bit (default: as profiled)."
        ),
    ] = None,
    embeddings: Annotated[
        bool | None,
        typer.Option(
            "--embeddings/--no-embeddings",
            help="Allocate a profiled embedding or keep it 16-bit (default: as profiled).",
        ),
    ] = None,
    max_loss: Annotated[float | None, typer.Option("--max-loss", help="greedy: a predicted-loss budget too.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of randomized solvers.")] = None,
    out: Annotated[Path | None, typer.Option(help="Allocation JSON to write.")] = None,
    model: Annotated[str | None, typer.Option(help="Model for real evaluations (default: the profiled one).")] = None,
    eval: Annotated[str | None, typer.Option("--eval", help="Held-out text for real evaluations.")] = None,
    eval_windows: Annotated[int | None, typer.Option("--eval-windows", help="Evaluation windows.")] = None,
    seqlen: Annotated[int | None, typer.Option("--seqlen", help="Window length (default: the profile's).")] = None,
    method: Annotated[str | None, typer.Option(help="Evaluator's quantizer: rtn or gptq.")] = None,
    seq_finetune: Annotated[
        bool | None,
        typer.Option("--seq-finetune", help="Each evaluation: GPTQ block by block, downstream blocks fine-tuned."),
    ] = None,
    switchable: Annotated[
        Path | None, typer.Option(help="Measure on this switchable model (automp switchable train): no quantizing.")
    ] = None,
    calib: Annotated[str | None, typer.Option(help="GPTQ calibration text (default: the profile's).")] = None,
    nsamples: Annotated[int | None, typer.Option(help="GPTQ calibration windows.")] = None,
    metric: Annotated[str | None, typer.Option(help="Real loss: ppl or kl (to full precision).")] = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    device_memory: DeviceMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    verify: Annotated[int | None, typer.Option("--verify", help="Evaluate the top K candidates for real.")] = None,
    refine: Annotated[bool | None, typer.Option("--refine", help="Local search on the real loss.")] = None,
    max_evals: MaxEvalsOpt = None,
    episodes: EpisodesOpt = None,
    state: Annotated[Path | None, typer.Option(help="reinforce / ppo: training state file (resumes).")] = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Choose each layer's format under a bits budget from a saved sensitivity table."""
    flags = _flags(ctx, locals())
    from automp.pipeline import search as run

    result = run(load_settings(SearchSettings, config, flags))
    if "frontier" in result:
        curve = result["frontier"]
        lines = ["| target bits | avg bits | predicted loss | MB |", "|---|---|---|---|"]
        lines += [
            f"| {p['target_bits']:g} | {p['avg_bits']:.4f} | {p['predicted_loss']:.6g} | {p['bytes'] / 1e6:.3f} |"
            for p in curve
        ]
        _emit(curve, json_out, "\n".join(lines))
        return
    human = f"{result['solver']}: {result['avg_bits']:.4f} bits/weight, {result['bytes'] / 1e6:.3f} MB, "
    human += f"predicted loss {result['predicted_loss']:.6g} -> {result['path']}"
    if "real_loss" in result:
        metric, total = result["evaluator"]["metric"], result["total_evaluations"]
        human += f"\nreal {metric} {result['real_loss']:.6g} ({total} evaluations in all)"
    _emit(result, json_out, human)


@app.command("run")
@_command
@_defaults_from(RunSettings)
def run_(
    ctx: typer.Context,
    model: ModelOpt = None,
    target_bits: TargetBitsOpt = None,
    target_size: TargetSizeOpt = None,
    fit_memory: FitMemoryOpt = None,
    context: ContextOpt = None,
    batch: BatchSeqOpt = None,
    overhead: OverheadOpt = None,
    engine: EngineOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output directory: checkpoint, table, allocation, metrics.")] = None,
    solver: SolverOpt = None,
    proxy: ProxyOpt = None,
    formats: Annotated[str | None, typer.Option(help="Formats to profile and choose from.")] = None,
    ranks: RanksOpt = None,
    pin: PinOpt = None,
    tie_fused: TieOpt = None,
    method: Annotated[
        str | None, typer.Option(help="Final quantizer (it also quantizes the verified candidates): gptq, rtn or awq.")
    ] = None,
    calib: CalibOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: SeqlenOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the calibration windows and the solver.")] = None,
    eval: Annotated[
        str | None, typer.Option("--eval", help="Text of the reported perplexity (never used to choose).")
    ] = None,
    verify_delivery: Annotated[
        bool | None,
        typer.Option("--verify-delivery/--no-verify", help="Measure candidates against uniform before delivering."),
    ] = None,
    verify_text: Annotated[
        str | None,
        typer.Option("--verify-text", help="Held-out text to verify on (default: calibration text calibration skips)."),
    ] = None,
    verify_windows: Annotated[int | None, typer.Option("--verify-windows", help="Verification windows.")] = None,
    eval_windows: Annotated[
        int | None, typer.Option("--eval-windows", help="Verification windows the search's evaluator uses.")
    ] = None,
    verify: Annotated[
        int | None, typer.Option("--verify", help="Search: screen the top K candidates on cached weights first.")
    ] = None,
    refine: Annotated[bool | None, typer.Option("--refine", help="Search: local search on the measured loss.")] = None,
    max_evals: MaxEvalsOpt = None,
    bootstrap: Annotated[
        int | None, typer.Option("--bootstrap", help="N calibration resamples: each layer's format stability.")
    ] = None,
    episodes: EpisodesOpt = None,
    kl: Annotated[bool | None, typer.Option("--kl", help="Also profile KL (for --proxy kl; slow).")] = None,
    lm_head: LmHeadOpt = None,
    embeddings: EmbeddingsOpt = None,
    damp: DampOpt = None,
    act_order: ActOrderOpt = None,
    correction: CorrectionOpt = None,
    repair: RepairOpt = None,
    schedule: ScheduleOpt = None,
    equal_steps: EqualStepsOpt = None,
    train_data: TrainDataOpt = None,
    repair_epochs: RepairEpochsOpt = None,
    repair_iters: RepairItersOpt = None,
    e2e_epochs: E2EEpochsOpt = None,
    e2e_loss: E2ELossOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    offload: OffloadOpt = None,
    offload_dir: OffloadDirOpt = None,
    device_memory: DeviceMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    batch_size: BatchOpt = None,
    trust_remote_code: RemoteOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Profile, search, verify against uniform, quantize the delivered allocation and evaluate, in one directory."""
    flags = _flags(ctx, locals())
    from automp.pipeline import run

    metrics = run(load_settings(RunSettings, config, flags))
    human = f"{metrics['solver']} at {metrics['target_bits']:g} bits ({metrics['method']}): "
    human += f"{metrics['avg_bits']:.4f} bits/weight, {metrics['bytes'] / 1e6:.3f} MB"
    human += f", ppl {metrics['ppl']:.3f}" if "ppl" in metrics else ""
    if "verification" in metrics:
        check = metrics["verification"]
        human += f"\nverified on {check['windows']} held-out windows: delivered {check['delivered']}"
        if check["delta_nll"] is not None and check["delivered"] != check["best_uniform"]:
            human += f" (NLL {check['delta_nll']:+.5f} ± {check['se']:.5f} vs {check['best_uniform']})"
        human += f"; {check['reason']}"
    _emit(metrics, json_out, human)


@app.command()
@_command
def report(
    run: Annotated[Path, typer.Argument(help="Output directory of `automp run`.")],
    seeds: Annotated[
        int, typer.Option("--seeds", help="Also re-run search + quantize + eval with N seeds (slow).")
    ] = 0,
    executor: Annotated[
        str, typer.Option("--executor", help="--seeds: serial, or ray (the seeds in parallel, one per worker).")
    ] = "serial",
    ray_address: RayAddressOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write an HTML report with plots (sensitivity, allocation, frontier, RL curves) to RUN/report/."""
    from automp.execution.executor import get_executor
    from automp.io import check_output
    from automp.report import REPORT_DIR, write_report

    check_output(run / REPORT_DIR, option="the report")
    with get_executor(executor, ray_address) as pool_executor:
        result = write_report(run, seeds=seeds, executor=pool_executor)
    _emit(result, json_out, f"report written to {result['index']}")


@app.command()
@_command
@_defaults_from(RepairSettings)
def repair(
    ctx: typer.Context,
    run: Annotated[Path | None, typer.Option("--run", help="automp output directory (quantize or run).")] = None,
    method: Annotated[
        str | None, typer.Option("--method", help="block-ap or sign-round, then optionally e2e-qp: block-ap,e2e-qp.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (an automp checkpoint, same formats).")] = None,
    schedule: ScheduleOpt = None,
    equal_steps: EqualStepsOpt = None,
    profile: Annotated[
        Path | None, typer.Option(help="Sensitivity table for sgra/joint (default: the run's sensitivity.json).")
    ] = None,
    proxy: Annotated[str | None, typer.Option(help="The table's proxy that sets sgra/joint's sensitivities.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="The full-precision model (default: the one the run was made from).")
    ] = None,
    calib: Annotated[str | None, typer.Option(help="Training text (default: the run's calibration text).")] = None,
    nsamples: Annotated[int | None, typer.Option(help="Training windows (default: the run's, else 128).")] = None,
    seqlen: SeqlenOpt = None,
    train_data: TrainDataOpt = None,
    repair_epochs: RepairEpochsOpt = None,
    repair_iters: RepairItersOpt = None,
    e2e_epochs: E2EEpochsOpt = None,
    e2e_loss: E2ELossOpt = None,
    eval: Annotated[str | None, typer.Option("--eval", help="Evaluation text for perplexity.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the windows and the batch order.")] = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    offload: OffloadOpt = None,
    offload_dir: OffloadDirOpt = None,
    device_memory: DeviceMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    batch_size: BatchOpt = None,
    trust_remote_code: RemoteOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Repair a quantized run by training (Block-AP, sign rounding, E2E-QP): same formats, same bytes."""
    flags = _flags(ctx, locals())
    if "method" in flags:
        flags["repair"] = flags.pop("method")
    from automp.pipeline import repair as run_repair

    metrics = run_repair(load_settings(RepairSettings, config, flags))
    summary = metrics["repair"]
    human = f"{'+'.join(summary['methods'])} ({summary['schedule']}): {metrics['avg_bits']:.4f} bits/weight, "
    human += f"{metrics['bytes'] / 1e6:.3f} MB" + (f", ppl {metrics['ppl']:.3f}" if "ppl" in metrics else "")
    _emit(metrics, json_out, human)


@app.command()
@_command
@_defaults_from(ExportSettings)
def export(
    ctx: typer.Context,
    run: Annotated[Path | None, typer.Option("--run", help="automp output directory (quantize or run).")] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="compressed-tensors (vLLM/transformers) or gptq (GPTQModel/vLLM): checkpoints of automp's own "
            "weights; gguf (llama.cpp, GGUF-format runs); gguf-map or gptq-dynamic: recipes for llama.cpp/GPTQModel.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    engine: Annotated[
        str | None,
        typer.Option(help="vllm (warn about what it cannot serve) or transformers; compressed-tensors and gptq."),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Export a quantized run for vLLM/transformers (compressed-tensors), GPTQModel/vLLM (gptq), llama.cpp
    (gguf, gguf-map) or a GPTQModel recipe (gptq-dynamic)."""
    flags = _flags(ctx, locals())
    from automp.pipeline import export as run_export

    result = run_export(load_settings(ExportSettings, config, flags))
    for warning in result["warnings"]:
        typer.echo("warning: " + warning, err=True)
    _emit(result, json_out, f"{result['format']} export written to {result['out']}")


@app.command()
@_command
def demo(
    out: Annotated[
        Path | None,
        typer.Option(help="Write demo.json, the mixed run and its export here (default: ~/.cache/automp/demo)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Offline demo on a small model trained here from the standard library's documentation."""
    from automp.demo import run_demo

    result = run_demo(out)
    table = result.pop("table")
    where = [
        f"the mixed model, as an `automp run` directory: {result['run_dir']}",
        f"its report (plots): {result['report']}",
        f"its compressed-tensors export (from_pretrained loads it): {result['export']}",
    ]
    _emit(result, json_out, table + "\n\n" + "\n".join(where))


switchable_app = typer.Typer(
    no_args_is_help=True, help="Switchable precision: one model whose layers switch format, an adapter per format."
)
app.add_typer(switchable_app, name="switchable")
DirOpt = Annotated[Path | None, typer.Option("--dir", help="A switchable model directory (automp switchable train).")]
BitmapOpt = Annotated[
    str | None, typer.Option("--bitmap", help="A format name for every layer, or an allocation / bitmap JSON file.")
]


@switchable_app.command("train")
@_command
@_defaults_from(SwitchableTrainSettings)
def switchable_train(
    ctx: typer.Context,
    model: ModelOpt = None,
    formats: Annotated[str | None, typer.Option(help="Formats every layer can switch to, comma-separated.")] = None,
    style: Annotated[
        str | None, typer.Option(help="spnet (sandwich + random mixes), cyclic (low to high) or instantnet (cascade).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (the switchable model).")] = None,
    method: Annotated[str | None, typer.Option(help="rtn or gptq: how each format's codes are made.")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank of every (layer, format) adapter.")] = None,
    init: Annotated[
        str | None, typer.Option(help="eora (start at the activation-aware correction) or zero (PEFT's B = 0).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (cosine decay).")] = None,
    loss: Annotated[str | None, typer.Option(help="spnet/cyclic: kl (to the full-precision model) or ce.")] = None,
    mixes: Annotated[int | None, typer.Option(help="spnet: random per-layer bitmaps per step.")] = None,
    train_data: TrainDataOpt = None,
    calib: CalibOpt = None,
    nsamples: NsamplesOpt = None,
    seqlen: SeqlenOpt = None,
    damp: DampOpt = None,
    act_order: ActOrderOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the windows, batches and random bitmaps.")] = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    offload: OffloadOpt = None,
    offload_dir: OffloadDirOpt = None,
    device_memory: DeviceMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Windows per training pass.")] = None,
    trust_remote_code: RemoteOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Build the switchable model (every format's codes) and train its adapters."""
    flags = _flags(ctx, locals())
    from automp.switchable.commands import train

    result = train(load_settings(SwitchableTrainSettings, config, flags))
    kl = ", ".join(f"{fmt} KL {a:.4g} -> {b:.4g}" for fmt, (a, b) in result["heldout_kl"].items())
    _emit(result, json_out, f"switchable model written to {result['out']} ({kl})")


@switchable_app.command("eval")
@_command
@_defaults_from(SwitchableSettings)
def switchable_eval(
    ctx: typer.Context,
    dir: DirOpt = None,
    bitmap: BitmapOpt = None,
    ppl: Annotated[str | None, typer.Option(help="Perplexity text: .txt, .jsonl, wikitext2 or c4.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Zero-shot tasks, comma-separated.")] = None,
    tasks_dir: Annotated[Path | None, typer.Option(help="Task data directory (default ./data/eval).")] = None,
    limit: Annotated[int | None, typer.Option(help="The first N items of each task.")] = None,
    seqlen: SeqlenOpt = None,
    batch_size: BatchOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate the switchable model at one bitmap: perplexity, tasks, delivered bits and bytes."""
    flags = _flags(ctx, locals())
    from automp.switchable.commands import evaluate

    result = evaluate(load_settings(SwitchableSettings, config, flags))
    human = f"{result['bitmap']}: {result['avg_bits']:.4f} bits/weight, {result['bytes'] / 1e6:.3f} MB"
    _emit(result, json_out, human + (f", ppl {result['ppl']:.3f}" if "ppl" in result else ""))


@switchable_app.command("greedy")
@_command
@_defaults_from(SwitchableSettings)
def switchable_greedy(
    ctx: typer.Context,
    dir: DirOpt = None,
    max_drop: Annotated[
        float | None, typer.Option("--max-drop", help="Perplexity increase allowed, percent of FP16's.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="The bitmap file (an allocation).")] = None,
    heldout: Annotated[
        str | None, typer.Option(help="Held-out text (default: calibration text no training window touched).")
    ] = None,
    heldout_windows: Annotated[int | None, typer.Option(help="Held-out windows per measurement.")] = None,
    seqlen: SeqlenOpt = None,
    batch_size: BatchOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Lower layers from least to most sensitive while the measured perplexity stays within --max-drop."""
    flags = _flags(ctx, locals())
    from automp.switchable.commands import greedy

    result = greedy(load_settings(SwitchableSettings, config, flags))
    human = f"bitmap written to {result['out']}: {result['avg_bits']:.4f} bits/weight, ppl {result['ppl']:.3f} "
    _emit(result, json_out, human + f"(FP16 {result['fp_ppl']:.3f}, limit {result['limit']:.3f})")


@switchable_app.command("export")
@_command
@_defaults_from(SwitchableSettings)
def switchable_export(
    ctx: typer.Context,
    dir: DirOpt = None,
    bitmap: BitmapOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (an automp run directory).")] = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Deliver one bitmap as an automp run directory (codes + adapters as +rN corrections, exact bytes)."""
    flags = _flags(ctx, locals())
    from automp.switchable.commands import export

    result = export(load_settings(SwitchableSettings, config, flags))
    _emit(result, json_out, f"run directory written to {result['out']}: {result['avg_bits']:.4f} bits/weight")


@app.command()
@_command
@_defaults_from(PlanSettings)
def plan(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option("--model", help="Local model directory (config.json alone is enough) or hub id.")
    ] = None,
    formats: Annotated[
        str | None, typer.Option(help="Formats the run may store; each layer is counted at the largest.")
    ] = None,
    nsamples: NsamplesOpt = None,
    seqlen: SeqlenOpt = None,
    batch_size: BatchOpt = None,
    device_memory: DeviceMemoryOpt = None,
    cpu_memory: CpuMemoryOpt = None,
    dtype: DtypeOpt = None,
    device: Annotated[
        str | None, typer.Option(help="Device planned for: auto (cuda when this machine has one), cpu or cuda.")
    ] = None,
    stages: Annotated[
        str | None, typer.Option(help="Stages the mode must fit, comma-separated; every stage is predicted.")
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Predict each stage's peak device, CPU and disk memory from the config alone; in-memory, streaming, or refuse."""
    flags = _flags(ctx, locals())
    from automp.execution.plan import plan_command, plan_refusal, plan_table

    result = plan_command(load_settings(PlanSettings, config, flags))
    _emit(result.model_dump(), json_out, plan_table(result))
    refusal = plan_refusal(result)
    if refusal is not None:
        raise AutompError(refusal)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
