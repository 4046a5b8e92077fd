"""Typed settings for each command. Values come from defaults, then a YAML file (``--config``),
then command-line flags, each overriding the one before."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from automp.errors import AutompError
from automp.formats import get_format, parse_formats, with_ranks

Engine = Literal["transformers", "vllm", "llama.cpp"]
Correction = Literal["exact", "diag", "svd"]  # +rN formats' low-rank estimator (quantizers/lowrank.py)
DEFAULT_FORMATS = {  # what profile and run measure when --formats is not given
    "transformers": "w2g64,w3g128,w4g128,w8,fp16",
    "vllm": "w2g64,w3g128,w4g128,w8,fp16",
    "llama.cpp": "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0,fp16",
}


def _with_engine_formats(settings):
    """Fill in the engine's default formats (llama.cpp runs GGUF types and 16-bit only), then add every
    quantized one's ``+rN`` options for ``--ranks``."""
    if settings.formats is None:
        settings.formats = DEFAULT_FORMATS[settings.engine]
    elif settings.engine == "llama.cpp":
        foreign = [fmt.name for fmt in parse_formats(settings.formats) if fmt.ggml_type is None]
        if foreign:
            raise ValueError(
                f"--engine llama.cpp stores GGUF types only; {', '.join(foreign)} is not one: use q2_k, q3_k, "
                "q4_k, q5_k, q6_k, q8_0, q4_0, iq4_nl, fp16 or bf16"
            )
    if settings.ranks and settings.engine == "llama.cpp":
        raise ValueError("--engine llama.cpp has no route for automp's low-rank corrections yet: drop --ranks")
    if settings.ranks:
        ranks = [int(r) if r.strip().isdigit() else r.strip() for r in settings.ranks.split(",") if r.strip()]
        settings.formats = ",".join(fmt.name for fmt in with_ranks(parse_formats(settings.formats), ranks))
    return settings


class ExecutorOptions(BaseModel):
    """Where independent measurements run (``execution/executor.py``): here, one after the other, or on a Ray
    actor pool (``--executor ray``: profile layers, search evaluations, verification candidates, seeds)."""

    executor: Literal["serial", "ray"] = "serial"
    ray_address: str | None = None  # --executor ray: the cluster to join (default: start a local one)

    @model_validator(mode="after")
    def _executor_available(self):
        from automp.execution.executor import get_executor

        get_executor(self.executor, self.ray_address)  # before any work: --ray-address alone, Ray not installed
        return self


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    seqlen: int | None = None  # default: 2048 capped at the model's maximum positions
    batch_size: int = 8
    seed: int = 0
    # the memory plan (execution/plan.py) every command consults, and where the decoder blocks wait when streamed
    offload: Literal["auto", "none", "cpu", "disk"] = "auto"  # auto: in memory when the plan says it fits
    offload_dir: Path | None = None  # --offload disk: where the blocks are written (default: a temporary directory)
    device_memory: str | None = None  # e.g. 24GiB; default: the CUDA device's total, else the host's memory
    cpu_memory: str | None = None  # default: the host's physical memory


class EvalSettings(ModelSettings):
    ppl: str | None = None
    tasks: str | None = None  # comma-separated task names, e.g. piqa,arc_easy,winogrande
    tasks_dir: Path | None = None  # default: ./data/eval
    limit: int | None = None  # the first N items of each task
    backend: Literal["automp", "lm-eval"] = "automp"
    log_samples: Path | None = None  # every task item's log-likelihoods, picks and gold, as JSON lines


class RepairOptions(BaseModel):
    """Training repair after quantization (``repair/``): ``--repair`` on quantize and run, ``automp repair``."""

    repair: str | None = None  # seq-finetune (while quantizing), block-ap or sign-round, e2e-qp: "block-ap,e2e-qp"
    schedule: Literal["uniform", "sgra", "joint"] = "uniform"  # sgra/joint need the sensitivity table
    equal_steps: bool = False  # sgra/joint rescaled to uniform's total steps
    train_data: Literal["calib", "self-generated"] = "calib"  # self-generated: sampled from the FP model
    repair_epochs: float = 8.0  # block-ap: passes over the training windows per block (before the schedule)
    repair_iters: int = 200  # sign-round: steps per block (AutoRound's default)
    e2e_epochs: float = 1.0
    e2e_loss: Literal["kl", "lm"] = "kl"

    @field_validator("repair")
    @classmethod
    def _known_methods(cls, value: str | None) -> str | None:
        from automp.repair.methods import parse_methods

        return None if value is None else ",".join(parse_methods(value))

    @field_validator("repair_epochs", "repair_iters", "e2e_epochs")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be positive")
        return value


class QuantizeSettings(ModelSettings, RepairOptions):
    out: Path
    scheme: str = "w4g128"
    allocation: Path | None = None  # one format per layer, as `automp search` saved it; excludes `scheme`
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    calib: str | None = None
    nsamples: int = 128
    eval: str | None = None
    damp: float = 0.01
    act_order: bool = True
    correction: Correction = "exact"
    lm_head: bool = False  # quantize lm_head too (left in 16-bit by default)
    embeddings: bool = False  # quantize the token embedding too (RTN; left in 16-bit by default)

    @field_validator("scheme")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return get_format(value).name


class ProfileSettings(ModelSettings, ExecutorOptions):
    """``automp profile``: the sensitivity table of every layer x format, written to ``out``."""

    out: Path
    engine: Engine = "transformers"  # llama.cpp: GGUF types by default
    formats: str | None = None  # default: DEFAULT_FORMATS[engine]
    ranks: str | None = None  # e.g. 0,4,8,16: every quantized format also with each positive rank (+rN)
    correction: Correction = "exact"
    calib: str | None = None
    nsamples: int = 128
    kl: bool = False  # also measure KL(full || one layer quantized): a forward per layer x format
    kl_windows: int = 8
    kl_text: str | None = None  # default: the calibration text, windows drawn with seed + 1
    damp: float = 0.01
    act_order: bool = True
    per_window: bool = False  # also the per-window proxy terms (sensitivity.windows.safetensors), for --bootstrap
    lm_head: bool = False  # also profile the output head as a layer
    embeddings: bool = False  # also profile the token embedding as a layer (RTN, its own proxies)

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: str | None) -> str | None:
        return None if value is None else ",".join(fmt.name for fmt in parse_formats(value))

    @model_validator(mode="after")
    def _engine_formats(self):
        return _with_engine_formats(self)


class BudgetSettings(BaseModel):
    """The budget of a search: exactly one of average bits, a file size, or memory at a context (``budget.py``)."""

    target_bits: float | None = None  # average stored bits per weight of the allocated layers
    target_size: str | None = None  # the whole stored model, e.g. 3.2GB or 3GiB
    fit_memory: str | None = None  # weights + KV cache + overhead fit this memory, e.g. 24GB
    context: int | None = None  # --fit-memory: tokens per sequence (default: the model's maximum positions)
    batch: int = 1  # --fit-memory: sequences
    overhead: str = "1GiB"  # --fit-memory: runtime memory besides weights and KV cache (CUDA context, workspace)
    engine: Engine = "transformers"  # vllm: only what its kernels serve, fused tied; llama.cpp: GGUF types


class SearchSettings(BudgetSettings, ExecutorOptions):
    """``automp search``: one allocation for a budget (saved to ``out``), or a ``frontier`` curve."""

    model_config = ConfigDict(extra="forbid")

    profile: Path  # the directory (or file) `automp profile` wrote the sensitivity table to
    frontier: str | None = None  # "lo:hi:step": the predicted loss at each target instead
    solver: str = "knapsack"
    proxy: str = "outgrad"  # the loss-unit output-gradient proxy: it won on held-out text (README)
    formats: str | None = None  # comma-separated subset of the profiled formats; default all
    pin: dict[str, str] = {}  # layer -> format; on the command line, --pin layer=format
    tie_fused: bool = False
    # the table's optional layers: None = as profiled; False = kept 16-bit (fixed bytes); True = required
    lm_head: bool | None = None
    embeddings: bool | None = None
    max_loss: float | None = None  # greedy: a predicted-loss budget as well
    seed: int = 0
    out: Path | None = None
    # real quality: --verify, --refine and the solvers that measure it (reinforce, ppo, anneal)
    model: str | None = None  # default: the model the table was profiled on
    eval: str | None = None  # held-out evaluation text (never the calibration text)
    eval_windows: int = 8
    seqlen: int | None = None  # default: the profile's
    dtype: str = "auto"  # the evaluator's model, as ModelSettings loads it
    device: str = "auto"
    device_memory: str | None = None  # the memory plan of the evaluator (in memory only), as ModelSettings has it
    cpu_memory: str | None = None
    method: Literal["rtn", "gptq"] = "rtn"  # how the evaluator quantizes each layer
    seq_finetune: bool = False  # every evaluation: GPTQ block by block, the downstream blocks fine-tuned after each
    switchable: Path | None = None  # evaluate on this trained switchable model instead (no quantization per candidate)
    calib: str | None = None  # GPTQ's calibration text; default: the profile's
    nsamples: int = 128
    metric: Literal["ppl", "kl"] = "ppl"
    verify: int | None = None  # evaluate the top K candidates end to end
    refine: bool = False  # swap-move local search on the real loss
    max_evals: int = 100  # evaluations for --refine and the anneal solver
    episodes: int | None = None  # reinforce / ppo
    state: Path | None = None  # reinforce / ppo training state file: resumed when it exists

    @field_validator("pin", mode="before")
    @classmethod
    def _pairs(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        pins = {}
        for item in value:
            layer, sep, fmt = str(item).partition("=")
            if not (sep and layer and fmt):
                raise ValueError(f"pin {item!r} must be layer=format")
            pins[layer.strip()] = get_format(fmt).name
        return pins


class RunSettings(ModelSettings, BudgetSettings, RepairOptions, ExecutorOptions):
    """``automp run``: profile (reused when cached), search, verify, quantize the delivered allocation,
    evaluate, into ``out``."""

    out: Path
    solver: str = "knapsack"
    proxy: str = "outgrad"  # chosen on held-out text (README); verification also measures every other proxy's knapsack
    formats: str | None = None  # profiled, and the formats the search may choose; default DEFAULT_FORMATS[engine]
    ranks: str | None = None  # e.g. 0,4,8,16: bits and low-rank correction chosen jointly (+rN formats)
    correction: Correction = "exact"
    pin: dict[str, str] = {}  # layer -> format; on the command line, --pin layer=format
    tie_fused: bool = False
    method: Literal["rtn", "gptq", "awq"] = "gptq"  # the final quantizer, also used to verify candidates
    calib: str | None = None  # one text, or several comma-separated (windows shared out equally)
    nsamples: int = 128
    eval: str | None = None  # the reported perplexity's text; never used to choose anything
    verify_delivery: bool = True  # measure candidates against uniform before delivering (--no-verify: skip)
    verify_text: str | None = None  # default: windows of the calibration text that calibration does not touch
    verify_windows: int = 32
    eval_windows: int = 8  # verification windows the search's evaluator uses (measuring solvers, --verify K)
    verify: int | None = None  # the search's --verify K: screen the top K candidates on cached weights
    refine: bool = False  # the search's swap-move refinement on the measured loss (before verification)
    max_evals: int = 40  # evaluations for --refine, the anneal solver and verification's refinement
    episodes: int | None = None  # reinforce / ppo
    bootstrap: int = 0  # N resamples of the calibration windows: each layer's format stability (bootstrap.json)
    kl: bool = False  # also profile KL (slow); needed only for --proxy kl
    lm_head: bool = False  # the output head is allocated too (profiled, searched, quantized)
    embeddings: bool = False  # the token embedding is allocated too (RTN, its own proxies)
    damp: float = 0.01
    act_order: bool = True

    _known_formats = field_validator("formats")(ProfileSettings._known_formats.__func__)
    _pairs = field_validator("pin", mode="before")(SearchSettings._pairs.__func__)

    @model_validator(mode="after")
    def _engine_formats(self):
        return _with_engine_formats(self)


class RepairSettings(ModelSettings, RepairOptions):
    """``automp repair``: train the quantized model of a run directory (``run``), saved to ``out``."""

    run: Path
    out: Path
    model: str | None = None  # the full-precision model; default: the one the run was made from
    repair: str | None = "sign-round"  # Block-AP overfits the calibration text more (README, training repair)
    calib: str | None = None  # default: the run's calibration text (and its nsamples, seqlen, seed)
    nsamples: int | None = None
    eval: str | None = None
    profile: Path | None = None  # sgra/joint's sensitivity table; default: the run's sensitivity.json
    proxy: str = "outgrad"


class SwitchableTrainSettings(ModelSettings):
    """``automp switchable train``: build the switchable model of ``model`` and train its adapters into ``out``."""

    out: Path
    formats: str = "w2g64,w3g128,w4g128"  # the formats every layer can switch to
    method: Literal["rtn", "gptq"] = "gptq"
    calib: str | None = None
    nsamples: int = 128
    damp: float = 0.01
    act_order: bool = True
    rank: int = 8  # every adapter's rank (counted in the delivered bits as +rN)
    init: Literal["eora", "zero"] = "eora"  # adapters start at the activation-aware correction, or at B = 0
    style: Literal["spnet", "cyclic", "instantnet"] = "spnet"
    steps: int = 100
    lr: float = 3e-4
    loss: Literal["kl", "ce"] = "kl"
    mixes: int = 2
    train_data: Literal["calib", "self-generated"] = "calib"


class SwitchableSettings(BaseModel):
    """``automp switchable eval / greedy / export``: use a trained switchable model (``dir``)."""

    model_config = ConfigDict(extra="forbid")

    dir: Path
    bitmap: str | None = None  # a format name or an allocation / bitmap JSON file (eval, export)
    ppl: str | None = None  # eval: perplexity text
    tasks: str | None = None
    tasks_dir: Path | None = None
    limit: int | None = None
    max_drop: float | None = None  # greedy: the perplexity increase allowed, percent of FP16's
    heldout: str | None = None  # greedy: held-out text; default: the calibration source under another seed
    heldout_windows: int = 16
    out: Path | None = None  # greedy: the bitmap file; export: the run directory
    seqlen: int | None = None
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0


class ExportSettings(BaseModel):
    """``automp export``: a deployable form of an automp output directory (``run``) written to ``out``."""

    model_config = ConfigDict(extra="forbid")

    run: Path
    format: Literal["compressed-tensors", "gptq", "gguf", "gguf-map", "gptq-dynamic"]
    out: Path
    engine: Literal["vllm", "transformers"] = "vllm"  # which engine's limits to warn about (compressed-tensors, gptq)


class PlanSettings(BaseModel):
    """``automp plan``: each stage's peak device, CPU and disk memory, predicted from the model's config alone
    (``execution/plan.py``), and the execution mode that fits."""

    model_config = ConfigDict(extra="forbid")

    model: str  # a local directory (config.json alone is enough) or a hub id
    formats: str = "w2g64,w3g128,w4g128"  # every layer is counted at the format that takes the most bytes
    nsamples: int = 128
    seqlen: int | None = None  # default: 2048 capped at the model's maximum positions
    batch_size: int = 8
    device_memory: str | None = None  # e.g. 24GiB; default: the CUDA device's total, else the host's memory
    cpu_memory: str | None = None  # default: the host's physical memory
    dtype: str = "auto"  # auto: float16 on cuda, float32 on cpu (as automp loads models)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the device planned for; auto: cuda when this machine has one
    stages: str = "load,profile,gptq,perplexity,export"  # the stages the mode must fit (every stage is predicted)

    _known_formats = field_validator("formats")(ProfileSettings._known_formats.__func__)


def load_settings(cls: type[BaseModel], config: Path | None, flags: dict) -> BaseModel:
    """Defaults < YAML file < flags that were given (not None)."""
    values: dict = {}
    if config is not None:
        try:
            loaded = yaml.safe_load(Path(config).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise AutompError(f"could not read config {config}: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise AutompError(f"config {config} must be a mapping of option names to values")
        values.update({k.replace("-", "_"): v for k, v in (loaded or {}).items()})
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise AutompError(f"invalid settings: {problems}") from err
