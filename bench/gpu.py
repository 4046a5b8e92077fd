"""The prepared GPU benchmark: wall time and peak memory of every stage on random-weight Llama models built from
configs, each beside the memory plan's prediction, and llmcompressor's GPTQ on the same model.

    python3 bench/gpu.py --out DIR [--shapes 1b,8b] [--stages ...] [--time-limit 540] [--skip-llmcompressor]
    python bench/gpu.py --tiny --device cpu --out DIR        # the same stages end to end on a tiny config

Shapes: ``1b`` is Llama-3.2-1B's config, ``8b`` Llama-3-8B's (``tests/configs``); ``--tiny`` a 2-block Llama.
Each model is built from its config on the device with seed 0 (``from_config``: random weights, identical on
every rebuild, so every stage sees the same model) in ``--dtype``. Calibration is ``--nsamples`` random
token windows of ``--seqlen`` (128 x 2048), perplexity ``--eval-windows`` others (128 x 2048). Stages:

* ``load``: building the model on the device (the plan's ``load``);
* ``gptq``: ``quantize_`` with GPTQ in w4g128 on every decoder linear, the whole model on the device;
* ``export``: the GPTQ result saved as an automp run directory, then exported as compressed-tensors (timed:
  the export; the note gives the save);
* ``streaming-gptq``: the same GPTQ with the decoder blocks streamed from host memory
  (``execution.offload.stream_blocks``): one block on the device at a time (the plan's streaming ``gptq``);
* ``llmcompressor-gptq``: llmcompressor's ``oneshot`` with a GPTQModifier in the same format (W4A16, groups of
  128, static act-order, 1 % damping: ``baselines.llmcompressor_recipe``) on the same model in host memory,
  its sequential pipeline onloading one block at a time; compared with the streaming row's plan figure;
* ``profile``: ``profile_model`` over 4 formats (w2g64, w3g128, w4g128, fp16): one pre-pass gathers every
  proxy's statistics (hessian, fisher, grad, outgrad), then GPTQ per layer x format (the plan's ``profile``;
  skipped when the plan says it does not fit the device or the disk its work directory writes);
* ``knapsack``: the exact knapsack at 3.5 bits on that table;
* ``perplexity``: ``automp.evaluate.perplexity`` on the full-precision model.

Per stage: wall seconds (the device synchronised), ``torch.cuda.max_memory_allocated`` (reset before the
stage; it counts what the stage found on the device too, as the plan does), and the process's peak resident
set (reset through ``/proc/self/clear_refs``; where the kernel refuses that, the lifetime peak, marked so).
The plan's figures are ``automp plan``'s for the same shape, workload and device (``memory_plan``): in-memory
for the in-memory stages, streaming for the streamed and llmcompressor ones.

``--stages`` picks groups: ``streaming``, ``llmcompressor``, ``gptq`` (load, GPTQ, export), ``profile`` (profile,
knapsack) and ``perplexity``; each group builds its own model. Order and time: the groups that the issue's
targets read run first, each for every shape (streaming GPTQ, llmcompressor GPTQ, profile and knapsack), then
each shape's in-memory GPTQ and export, and perplexity. ``--time-limit`` bounds the
whole run: a stage is skipped once a GPTQ time of its shape predicts it would not finish in the time left, and
one still running when the limit comes is stopped (``time limit``). Every stage runs in its own try, so a
failure costs only its row. After every stage ``gpu.json`` (settings, rows, the targets) and ``gpu.md`` (the
tables) are rewritten in ``--out``, so a killed run keeps what it measured.

On a lent GPU (the device tool: one ``run`` with ``carry: [".whl"]``, ``timeout_s: 600``), first fetch the wheels
the device image lacks, here::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
      llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==4.8.4 dill==0.4.1 multiprocess==0.70.19 \
      pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 loguru==0.7.3

then run the gpu test set and this benchmark in one command::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
      export PYTHONPATH=/tmp/site:$PWD/src && timeout 200 python3 -m pytest -m gpu tests/test_gpu.py \
      -p no:cacheprovider | tee $OUT/pytest-gpu.txt | tail -25; python3 bench/gpu.py --out $OUT --time-limit 340
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from automp import Allocation, quantize_
from automp.checkpoint import save_quantized
from automp.evaluate import perplexity
from automp.execution.plan import GIB, MemoryPlan, memory_plan
from automp.export import RunDir, export_run
from automp.formats import parse_formats
from automp.model import inventory
from automp.search.problem import Problem
from automp.search.registry import get_solver
from automp.sensitivity.profile import profile_model
from automp.sensitivity.table import CalibInfo, SensitivityTable
from automp.timing import Stopwatch
from common import markdown_table

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "configs"
SHAPES = {"1b": CONFIGS / "llama-3.2-1b", "8b": CONFIGS / "llama-3-8b"}
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
GPTQ_FORMAT = "w4g128"  # llmcompressor's W4A16: 4-bit symmetric integers in groups of 128
PROFILE_FORMATS = "w2g64,w3g128,w4g128,fp16"
TARGET_BITS = 3.5
# a stage's time in GPTQ passes of its shape, to skip what cannot finish in the time left
IN_GPTQ_PASSES = {"gptq": 1.0, "streaming-gptq": 1.0, "llmcompressor-gptq": 1.5, "profile": 4.0}
STREAMING_LIMIT = 8e9  # the target: 8B-shaped streaming GPTQ at <= 8 GB of device memory


class TimeLimit(BaseException):  # not an Exception: library code that catches those lets it through
    """Raised by the alarm when ``--time-limit`` is reached."""


@dataclass
class Shape:
    """One model shape: its config directory (the plan reads it) and the plans of its two workloads."""

    name: str
    path: Path
    config: object
    gptq_plan: MemoryPlan  # formats: w4g128
    profile_plan: MemoryPlan  # formats: the profile's

    def plan_figures(self, stage: str, mode: str) -> tuple[int | None, int | None]:
        """The plan's device and CPU bytes of ``stage`` (a GPTQ row's: ``gptq``) in ``mode``; the knapsack has none."""
        plan = self.profile_plan if stage == "profile" else self.gptq_plan
        figures = plan.modes[mode].get("gptq" if stage.endswith("gptq") else stage)
        return (figures.device_bytes, figures.cpu_bytes) if figures is not None else (None, None)


class PeakRSS:
    """The process's peak resident set size since the last reset (Linux ``VmHWM``)."""

    def __init__(self) -> None:
        self.scope = "stage"

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self.scope = "lifetime"

    def peak(self) -> int:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    deadline: float
    work: Path
    rows: list[dict] = field(default_factory=list)
    rss: PeakRSS = field(default_factory=PeakRSS)
    started: float = field(default_factory=time.monotonic)

    def stage(self, shape: Shape, name: str, mode: str, run: Callable[[dict], object], skip: str | None = None):
        """Run ``run(row)`` as one measured row; returns its result (None when it was skipped or failed)."""
        plan_device, plan_cpu = shape.plan_figures(name, mode)
        row = {"shape": shape.name, "stage": name, "mode": mode, "plan_device": plan_device, "plan_cpu": plan_cpu}
        self.rows.append(row)
        left = self.deadline - time.monotonic()
        estimate = IN_GPTQ_PASSES.get(name, 0.0) * self.gptq_pass(shape.name)
        if skip is None and left <= 0:
            skip = "time limit"
        elif skip is None and estimate > left:
            skip = f"time limit: about {estimate:.0f} s needed, {left:.0f} s left"
        if skip is not None:
            row["status"] = f"skipped: {skip}"
            self.save()
            return None
        print(f"[{time.monotonic() - self.started:6.0f} s] {shape.name} {name} ...", file=sys.stderr, flush=True)
        result = None
        try:
            with _alarm(left), self.measured(row):
                result = run(row)
            row["status"] = "ok"
        except TimeLimit:
            row["status"] = "time limit"
        except Exception as err:  # one stage's failure costs its row only
            traceback.print_exc()
            row["status"] = f"failed: {type(err).__name__}: {' '.join(str(err).split())[:240]}"
        self.save()
        return result

    def gptq_pass(self, shape: str) -> float:
        """Seconds of one GPTQ pass on ``shape``, from its first finished GPTQ row (0 before there is one)."""
        for row in self.rows:
            if row["shape"] == shape and row["stage"].endswith("gptq") and row.get("status") == "ok":
                return row["seconds"] / IN_GPTQ_PASSES[row["stage"]]
        return 0.0

    @contextlib.contextmanager
    def measured(self, row: dict) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        _settle(self.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            row["device_start"] = torch.cuda.memory_allocated(self.device)
        self.rss.reset()
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                row["device_peak"] = torch.cuda.max_memory_allocated(self.device)
            row["seconds"] = round(time.perf_counter() - start, 2)
            row["rss_peak"] = self.rss.peak()

    def save(self) -> None:
        payload = {
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "dtype": str(self.dtype).removeprefix("torch."),
            **{key: getattr(self.args, key) for key in ("nsamples", "seqlen", "eval_windows", "batch_size")},
            "seconds": round(time.monotonic() - self.started, 1),
            "rss": self.rss.scope,
            "rows": self.rows,
            "targets": targets(self.rows),
        }
        out = Path(self.args.out)
        (out / "gpu.json").write_text(json.dumps(payload, indent=1))
        (out / "gpu.md").write_text(tables(payload))


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise ``TimeLimit`` in the body after ``seconds`` (between Python bytecodes: a running kernel finishes)."""

    def expire(_signum, _frame):
        raise TimeLimit

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _settle(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---- the models and their data ----------------------------------------------------------------------


def build(shape: Shape, bench: Bench, device: torch.device | str) -> torch.nn.Module:
    """The shape's model with seed-0 random weights on ``device`` (built on the benchmark's device, which is
    fast and gives the same weights every time, then moved)."""
    torch.manual_seed(0)
    with torch.device(bench.device):
        model = AutoModelForCausalLM.from_config(shape.config, dtype=bench.dtype)
    return model.to(device).eval()


def windows(shape: Shape, count: int, seqlen: int, seed: int) -> torch.Tensor:
    """(count, seqlen) random token windows."""
    return torch.randint(shape.config.vocab_size, (count, seqlen), generator=torch.Generator().manual_seed(seed))


def tokenizer() -> PreTrainedTokenizerFast:
    """A one-word tokenizer: the windows are token ids already; run directories and llmcompressor need one."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))


def _shape(name: str, args: argparse.Namespace, work: Path) -> Shape:
    if name == "tiny":
        path = work / "configs" / "tiny"
        LlamaConfig(**TINY).save_pretrained(path)
    else:
        path = SHAPES[name]
    workload = dict(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, device=args.device,
                    dtype=args.dtype, stages="load,profile,gptq,perplexity,export")  # fmt: skip
    plans = (memory_plan(str(path), formats=formats, **workload) for formats in (GPTQ_FORMAT, PROFILE_FORMATS))
    return Shape(name, path, AutoConfig.from_pretrained(path), *plans)


# ---- the stage groups (each builds its own model: building on the device takes seconds) ---------------------


def streaming_gptq(bench: Bench, shape: Shape) -> None:
    """GPTQ with the decoder blocks in host memory, one block on the device at a time."""
    try:
        from automp.execution.offload import stream_blocks
    except ImportError as err:
        bench.stage(shape, "streaming-gptq", "streaming", None, skip=f"streaming not available ({err})")
        return
    model = build(shape, bench, "cpu")
    began = time.perf_counter()
    stream_blocks(model, "cpu", bench.device)
    setup = time.perf_counter() - began
    calib = windows(shape, bench.args.nsamples, bench.args.seqlen, seed=0)

    def run(row: dict) -> None:
        row["note"] = f"blocks offloaded to host memory in {setup:.1f} s before the stage"
        quantize_(model, _allocation(model), "gptq", calib, batch_size=bench.args.batch_size, progress=False)

    bench.stage(shape, "streaming-gptq", "streaming", run)


def llmcompressor_gptq(bench: Bench, shape: Shape) -> None:
    """llmcompressor's GPTQ on the same model in host memory: its sequential pipeline onloads one block at a time."""
    if bench.args.skip_llmcompressor:
        bench.stage(shape, "llmcompressor-gptq", "streaming", None, skip="--skip-llmcompressor")
        return
    try:
        from llmcompressor import oneshot

        from baselines import llmcompressor_recipe
    except ImportError as err:
        bench.stage(shape, "llmcompressor-gptq", "streaming", None, skip=f"llmcompressor not installed ({err})")
        return
    model = build(shape, bench, "cpu")
    calib = windows(shape, bench.args.nsamples, bench.args.seqlen, seed=0)
    batches = [{"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]} for ids in calib]  # (1, T)

    def run(row: dict) -> None:
        oneshot(
            model=model, processor=tokenizer(), recipe=llmcompressor_recipe(GPTQ_FORMAT),
            dataset=torch.utils.data.DataLoader(batches, batch_size=None), num_calibration_samples=len(calib),
            shuffle_calibration_samples=False, max_seq_length=calib.shape[1], pipeline="sequential",
        )  # fmt: skip

    bench.stage(shape, "llmcompressor-gptq", "streaming", run)


def in_memory_gptq(bench: Bench, shape: Shape) -> None:
    """Load, GPTQ with the whole model on the device, then export its result."""
    model = bench.stage(shape, "load", "in-memory", lambda row: build(shape, bench, bench.device))
    if model is None:
        return
    calib = windows(shape, bench.args.nsamples, bench.args.seqlen, seed=0)
    allocation = _allocation(model)

    def gptq(row: dict) -> dict:
        return quantize_(model, allocation, "gptq", calib, batch_size=bench.args.batch_size, progress=False)

    qweights = bench.stage(shape, "gptq", "in-memory", gptq)
    if qweights is None:
        bench.stage(shape, "export", "in-memory", None, skip="no GPTQ result")
        return
    began = time.perf_counter()
    run_dir, out = bench.work / f"{shape.name}-run", bench.work / f"{shape.name}-compressed-tensors"
    save_quantized(run_dir, model, tokenizer(), allocation, qweights)
    out.mkdir(parents=True)
    saved = time.perf_counter() - began
    model = qweights = None  # the export runs on the host: nothing of GPTQ's stays on the device

    def export(row: dict) -> None:
        row["note"] = f"run directory saved in {saved:.1f} s before the stage"
        export_run(RunDir.open(run_dir), "compressed-tensors", out, "vllm")

    bench.stage(shape, "export", "in-memory", export)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)


def profile_and_knapsack(bench: Bench, shape: Shape) -> None:
    """The 4-format profile of the full-precision model, then the knapsack on its table."""
    work = bench.work / f"{shape.name}-profile"
    misfit = _profile_misfit(shape, work)
    if misfit is not None:
        bench.stage(shape, "profile", "in-memory", None, skip=misfit)
        bench.stage(shape, "knapsack", "in-memory", None, skip="no sensitivity table")
        return
    model = build(shape, bench, bench.device)
    calib = windows(shape, bench.args.nsamples, bench.args.seqlen, seed=0)

    def profile(row: dict) -> SensitivityTable:
        clock = Stopwatch()
        info = CalibInfo(spec="random tokens", nsamples=len(calib), seqlen=calib.shape[1], seed=0)
        table = profile_model(
            model, parse_formats(PROFILE_FORMATS), calib, model_name=shape.name, calib_info=info, work_dir=work,
            batch_size=bench.args.batch_size, progress=False, clock=clock,
        )  # fmt: skip
        row["note"] = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in clock.seconds.items())
        return table

    table = bench.stage(shape, "profile", "in-memory", profile)
    shutil.rmtree(work, ignore_errors=True)
    model = None  # freed before the knapsack

    def knapsack(row: dict) -> None:
        solution = get_solver("knapsack").solve(Problem(table=table, proxy="outgrad", target_bits=TARGET_BITS))
        row["note"] = f"{len(table.layers)} layers x {len(table.formats)} formats: {solution.avg_bits:.3f} bits"

    bench.stage(shape, "knapsack", "in-memory", knapsack, skip=None if table is not None else "no sensitivity table")


def perplexity_of(bench: Bench, shape: Shape) -> None:
    """Perplexity of the full-precision model on ``--eval-windows`` windows."""
    model = build(shape, bench, bench.device)
    eval_windows = windows(shape, bench.args.eval_windows, bench.args.seqlen, seed=1)

    def ppl(row: dict) -> None:
        result = perplexity(model, eval_windows, bench.args.batch_size, progress=False)
        row["note"] = f"ppl {result.ppl:.1f} over {result.windows} x {result.seqlen} tokens"

    bench.stage(shape, "perplexity", "in-memory", ppl)


def _profile_misfit(shape: Shape, work: Path) -> str | None:
    """Why the plan says the in-memory profile cannot run here (device memory, or the disk its work directory
    fills), or None."""
    plan = shape.profile_plan
    figures = plan.modes["in-memory"]["profile"]
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if not plan.fits("in-memory", "profile"):
        return f"the plan's profile needs {figures.device_bytes / GIB:.1f} GiB, {plan.device_memory / GIB:.1f} GiB here"
    if figures.disk_bytes > free:
        return f"the plan's profile writes {figures.disk_bytes / GIB:.1f} GiB to disk, {free / GIB:.1f} GiB free"
    return None


def _allocation(model: torch.nn.Module) -> Allocation:
    return Allocation.uniform(inventory(model), GPTQ_FORMAT)


GROUPS = {  # --stages: a group's name runs its stages
    "streaming": streaming_gptq,
    "llmcompressor": llmcompressor_gptq,
    "gptq": in_memory_gptq,
    "profile": profile_and_knapsack,
    "perplexity": perplexity_of,
}
FIRST = ("streaming", "llmcompressor", "profile")  # the targets read these: every shape's before the rest


def schedule(shapes: list[str], groups: list[str]) -> list[tuple[str, str]]:
    """(shape, group) in running order: the first groups for every shape, then each shape's other groups."""
    first = [(shape, group) for group in FIRST if group in groups for shape in shapes]
    return first + [(shape, group) for shape in shapes for group in GROUPS if group in groups and group not in FIRST]


# ---- the report ---------------------------------------------------------------------------------------


def targets(rows: list[dict]) -> list[dict]:
    """The issue's benchmark targets, read off the rows that finished."""
    found = {(row["shape"], row["stage"]): row for row in rows if row.get("status") == "ok"}
    out = []
    for shape in dict.fromkeys(row["shape"] for row in rows):
        streaming, gptq = found.get((shape, "streaming-gptq")), found.get((shape, "gptq"))
        theirs, profile = found.get((shape, "llmcompressor-gptq")), found.get((shape, "profile"))
        if shape == "8b" and streaming:
            out.append(_target(shape, "streaming GPTQ device peak <= 8 GB", streaming, "device_peak", STREAMING_LIMIT))
        if streaming and streaming.get("device_peak") and streaming.get("plan_device"):
            out.append(_target(shape, "streaming GPTQ device peak <= the plan's", streaming, "device_peak",
                               streaming["plan_device"]))  # fmt: skip
        for mine in (row for row in (gptq, streaming) if row and theirs):
            out.append(
                _target(shape, f"{mine['stage']} seconds <= llmcompressor's", mine, "seconds", theirs["seconds"])
            )
        if profile and (gptq or streaming):
            unit = (gptq or streaming)["seconds"]
            out.append(_target(shape, "4-format profile seconds <= 3 x one GPTQ pass", profile, "seconds", 3 * unit))
    return out


def _target(shape: str, text: str, row: dict, key: str, limit: float) -> dict:
    return {"shape": shape, "target": text, "value": row[key], "limit": limit, "met": row[key] <= limit}


def _gb(value: int | None) -> float | None:
    return None if value is None else value / 1e9


def tables(payload: dict) -> str:
    """The stage table and the targets' table, in markdown."""
    keys = ("device_peak", "plan_device", "rss_peak", "plan_cpu")
    rows = [{**row, **{f"{key}_gb": _gb(row.get(key)) for key in keys}} for row in payload["rows"]]
    stages = markdown_table(rows, [
        ("shape", "shape", ""), ("stage", "stage", ""), ("status", "status", ""), ("seconds", "s", ".1f"),
        ("device_peak_gb", "device peak GB", ".3g"), ("plan_device_gb", "plan device GB", ".3g"),
        ("rss_peak_gb", "peak RSS GB", ".3g"), ("plan_cpu_gb", "plan CPU GB", ".3g"), ("note", "note", ""),
    ])  # fmt: skip
    goals = markdown_table(payload["targets"], [
        ("shape", "shape", ""), ("target", "target", ""), ("value", "value", ".4g"), ("limit", "limit", ".4g"),
        ("met", "met", ""),
    ])  # fmt: skip
    head = f"{payload['device']}, torch {payload['torch']}, {payload['dtype']}, {payload['nsamples']} x "
    head += f"{payload['seqlen']} calibration tokens, {payload['seconds']:.0f} s in all (peak RSS: {payload['rss']})"
    return f"{head}\n\n{stages}\n\n{goals}\n"


# ---- the command --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu.json and gpu.md")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shapes", default="1b,8b", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--stages", default=",".join(GROUPS), help="comma-separated: " + ", ".join(GROUPS))
    parser.add_argument("--tiny", action="store_true", help="a 2-block Llama and a few short windows instead")
    parser.add_argument("--nsamples", type=int, help="calibration windows (default 128; --tiny 8)")
    parser.add_argument("--seqlen", type=int, help="tokens per window (default 2048; --tiny 64)")
    parser.add_argument("--eval-windows", type=int, help="perplexity windows (default 128; --tiny 4)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=540.0, help="seconds for the whole run")
    parser.add_argument("--skip-llmcompressor", action="store_true")
    parser.add_argument("--work", help="scratch directory (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    args.nsamples = args.nsamples or (8 if args.tiny else 128)
    args.seqlen = args.seqlen or (64 if args.tiny else 2048)
    args.eval_windows = args.eval_windows or (4 if args.tiny else 128)
    unknown = [group for group in args.stages.split(",") if group not in GROUPS]
    if unknown:
        parser.error(f"unknown stages {', '.join(unknown)}: use {', '.join(GROUPS)}")
    if not args.tiny and any(shape not in SHAPES for shape in args.shapes.split(",")):
        parser.error(f"--shapes takes {', '.join(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: give --device cpu (with --tiny on a small machine)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="automp-gpu-bench-"))
    bench = Bench(args, device, getattr(torch, args.dtype), time.monotonic() + args.time_limit, work)
    names = ["tiny"] if args.tiny else args.shapes.split(",")
    try:
        shapes = {name: _shape(name, args, work) for name in names}
        for name, group in schedule(names, args.stages.split(",")):
            GROUPS[group](bench, shapes[name])
            _settle(device)
    finally:
        bench.save()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"rows": bench.rows, "targets": targets(bench.rows)}, indent=1))
    print("\n" + (Path(args.out) / "gpu.md").read_text())
    sys.exit(1 if any(row["status"].startswith("failed") for row in bench.rows) else 0)


if __name__ == "__main__":
    main()
