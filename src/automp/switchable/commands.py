"""``automp switchable train / eval / greedy / export``: the switchable model's commands, with their file I/O.

``train`` is resumable: the built model (every format's codes and the adapters' start) is saved to
``.<out>.switchable/built`` once quantized, and the training's state every few steps beside it; a
killed run started again with the same settings continues from there. ``export`` delivers one bitmap
as an ordinary automp run directory (packed codes, adapters as ``+rN`` corrections, exact bytes), which
``automp eval`` loads and ``automp export --format compressed-tensors`` turns into a base plus a PEFT
adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from automp.checkpoint import model_bytes, save_quantized
from automp.data import load_heldout_windows, load_windows
from automp.errors import AutompError
from automp.evaluate import perplexity
from automp.execution.offload import load_planned
from automp.export.run_dir import SETTINGS_FILE
from automp.io import check_output, staged_output, write_file_atomic
from automp.model import linear_weight, load_model, set_linear_weight
from automp.quantize import GPTQConfig, round_to_storage
from automp.settings import SwitchableSettings, SwitchableTrainSettings
from automp.switchable.evaluator import SwitchableEvaluator
from automp.switchable.greedy import measured_greedy
from automp.switchable.model import (
    MANIFEST,
    SwitchableModel,
    SwitchableSpec,
    build_switchable,
    load_switchable,
    read_spec,
)
from automp.switchable.train import TrainConfig, train_adapters
from automp.timing import Stopwatch

BUILT_DIR = "built"  # in the resumable state directory: the switchable model before training
STATE_SETTINGS = "settings.json"


def train(settings: SwitchableTrainSettings, progress: bool = True) -> dict:
    from automp.pipeline import window_length

    check_output(settings.out)
    config = TrainConfig(style=settings.style, steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size,
                         loss=settings.loss, mixes=settings.mixes, seed=settings.seed)  # fmt: skip
    formats = [name.strip() for name in settings.formats.split(",") if name.strip()]
    clock = Stopwatch()
    with clock.stage("load"):
        model, tokenizer = load_planned(settings, ("load", "repair"), "switchable training")
        seqlen = window_length(model, settings.seqlen)
        spec = SwitchableSpec(model=settings.model, formats=formats, method=settings.method, rank=settings.rank,
                              init=settings.init, calib=settings.calib, nsamples=settings.nsamples, seqlen=seqlen,
                              seed=settings.seed)  # fmt: skip
        if settings.calib is None:
            raise AutompError("automp switchable train needs calibration text (--calib) to quantize and train on")
        calib = load_windows(settings.calib, tokenizer, seqlen, settings.nsamples, settings.seed)
        state = _state_dir(settings.out, settings)
    built = state / BUILT_DIR
    with clock.stage("build"):
        if (built / MANIFEST).is_file():
            sw = load_switchable(built, model)
        else:
            gptq = GPTQConfig(damp=settings.damp, act_order=settings.act_order)
            sw = build_switchable(model, spec, calib if settings.method == "gptq" else None, gptq=gptq,
                                  progress=progress)  # fmt: skip
            with staged_output(built) as staging:
                sw.save(staging)
    windows = calib
    if settings.train_data == "self-generated":
        from automp.repair.selfgen import cached_windows

        with clock.stage("self-generate"):
            sw.set_config("fp16", adapters=False)
            windows = cached_windows(sw.model, state, settings.nsamples, seqlen, settings.seed, progress=progress)
    with clock.stage("train"):
        sw.spec.training = train_adapters(sw, windows, config, state, progress)
    with staged_output(settings.out) as staging:
        sw.save(staging)
        (staging / SETTINGS_FILE).write_text(settings.model_dump_json(indent=1))
    shutil.rmtree(state, ignore_errors=True)
    return {**_summary(sw), "out": str(settings.out), "seconds": clock.total, "stage_seconds": clock.seconds}


def _state_dir(out: Path, settings: SwitchableTrainSettings) -> Path:
    """The resumable state beside ``out``; refuses one that other settings made."""
    state = Path(out).parent / f".{Path(out).name}.switchable"
    made = settings.model_dump_json(indent=1)
    file = state / STATE_SETTINGS
    if file.is_file() and file.read_text() != made:
        raise AutompError(f"{state} holds an unfinished run with other settings: delete it or use the same settings")
    state.mkdir(parents=True, exist_ok=True)
    file.write_text(made)
    return state


def _summary(sw: SwitchableModel) -> dict:
    training = sw.spec.training
    return {
        "formats": sw.spec.formats,
        "rank": sw.spec.rank,
        "avg_bits": {fmt: sw.avg_bits(fmt) for fmt in sw.spec.formats},
        "heldout_kl": {fmt: [training["before"][fmt]["kl"], training["after"][fmt]["kl"]] for fmt in sw.spec.formats}
        if training
        else {},
    }


def open_switchable(path: Path, dtype: str = "auto", device: str = "auto") -> tuple[SwitchableModel, object]:
    """The switchable model saved in ``path`` on its full-precision model, and that model's tokenizer."""
    model, tokenizer = load_model(read_spec(path).model, dtype=dtype, device=device)
    return load_switchable(path, model), tokenizer


def _open(settings: SwitchableSettings) -> tuple[SwitchableModel, object]:
    return open_switchable(settings.dir, settings.dtype, settings.device)


def _bitmap(settings: SwitchableSettings) -> str:
    if settings.bitmap is None:
        raise AutompError("give --bitmap: a format name, or an allocation / bitmap JSON file")
    return settings.bitmap


def evaluate(settings: SwitchableSettings, progress: bool = True) -> dict:
    """Perplexity and/or task accuracy of the switchable model at one bitmap, with its delivered bits and bytes."""
    from automp.pipeline import window_length
    from automp.tasks import evaluate_tasks, resolve_tasks_dir

    if not settings.ppl and not settings.tasks:
        raise AutompError("nothing to evaluate: give --ppl TEXT and/or --tasks NAMES")
    bitmap = _bitmap(settings)
    sw, tokenizer = _open(settings)
    sw.set_config(bitmap)
    out: dict = {"bitmap": bitmap, "avg_bits": sw.avg_bits(bitmap), "bytes": sw.delivered_bytes(bitmap)}
    if settings.ppl:
        windows = load_windows(settings.ppl, tokenizer, window_length(sw.model, settings.seqlen))
        out.update(perplexity(sw.model, windows, settings.batch_size, progress).summary())
    if settings.tasks:
        names = [name.strip() for name in settings.tasks.split(",") if name.strip()]
        tasks_dir = resolve_tasks_dir(settings.tasks_dir)
        out["tasks"], _ = evaluate_tasks(sw.model, tokenizer, names, tasks_dir, settings.limit, settings.batch_size,
                                         progress)  # fmt: skip
    return out


def greedy(settings: SwitchableSettings, progress: bool = True) -> dict:
    """The measured-budget greedy's bitmap, written to ``out`` as an allocation (``F+rR`` per layer)."""
    from automp.pipeline import window_length

    if settings.max_drop is None:
        raise AutompError("automp switchable greedy needs --max-drop PERCENT (the perplexity increase allowed)")
    if settings.out is None:
        raise AutompError("automp switchable greedy needs --out FILE for the bitmap")
    check_output(settings.out, "file")
    sw, tokenizer = _open(settings)
    seqlen = window_length(sw.model, settings.seqlen or sw.spec.seqlen)
    windows, source = _heldout(settings, sw.spec, tokenizer, seqlen)
    evaluator = SwitchableEvaluator(sw, windows, batch_size=settings.batch_size)
    result = measured_greedy(evaluator, settings.max_drop)
    allocation = sw.allocation(result.bitmap)
    write_file_atomic(settings.out, allocation.model_dump_json(indent=1))
    return {
        "out": str(settings.out),
        "avg_bits": allocation.avg_bits(sw.inventory),
        "ppl": result.ppl,
        "fp_ppl": result.fp_ppl,
        "limit": result.limit,
        "evaluations": result.evaluations,
        "heldout": source,
        "formats": {fmt: list(result.bitmap.values()).count(fmt) for fmt in sw.spec.formats},
    }


def _heldout(settings: SwitchableSettings, spec: SwitchableSpec, tokenizer, seqlen: int) -> tuple[torch.Tensor, str]:
    """Windows for measured decisions: ``--heldout`` text, else calibration text no training window touched."""
    count = settings.heldout_windows
    if count < 1:
        raise AutompError("--heldout-windows must be at least 1")
    if settings.heldout is not None:
        windows = load_windows(settings.heldout, tokenizer, seqlen)
        return windows[:count], f"{settings.heldout} (first {min(count, len(windows))} windows)"
    if spec.calib is None:
        raise AutompError("the switchable model does not say its calibration text: give --heldout TEXT")
    windows = load_heldout_windows(spec.calib, tokenizer, seqlen, count, spec.nsamples, spec.seed, spec.seed + 2)
    return windows, f"{spec.calib}, {len(windows)} windows no training window touches (seed {spec.seed + 2})"


def export(settings: SwitchableSettings) -> dict:
    """Deliver one bitmap as an automp run directory: codes, ``+rN`` adapters, the rest in 16-bit."""
    bitmap = _bitmap(settings)
    if settings.out is None:
        raise AutompError("automp switchable export needs --out DIR")
    check_output(settings.out)
    sw, tokenizer = _open(settings)
    allocation = sw.allocation(bitmap)
    qweights = sw.delivered_weights(bitmap)
    plain, _ = load_model(sw.spec.model, dtype=settings.dtype, device=settings.device)
    round_to_storage(plain)
    for name, layer in sw.layers.items():
        weight = qweights[name].dequantize() if name in qweights else linear_weight(layer.base_layer)
        set_linear_weight(plain.get_submodule(name), weight)
    metrics = {"avg_bits": allocation.avg_bits(sw.inventory), "bytes": model_bytes(plain, qweights),
               "switchable": str(settings.dir), "bitmap": bitmap}  # fmt: skip
    made = {"model": sw.spec.model, "method": sw.spec.method, "calib": sw.spec.calib, "nsamples": sw.spec.nsamples,
            "seqlen": sw.spec.seqlen, "seed": sw.spec.seed}  # fmt: skip
    with staged_output(settings.out) as staging:
        save_quantized(staging, plain, tokenizer, allocation, qweights)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (staging / SETTINGS_FILE).write_text(json.dumps(made, indent=1))
    return {**metrics, "out": str(settings.out)}
