"""Streaming execution: the decoder blocks' weights live off the device and come onto it only while they run.

``--offload cpu`` keeps the blocks in host memory, ``--offload disk`` in safetensors files under an offload
directory; everything outside the blocks (embedding, final norm, head, rotary tables) waits in host memory. So
the device holds one block at a time (or the embedding, or the head), the memory plan's ``streaming`` mode
(``execution/plan.py``).

The mechanism is compressed-tensors' offloading, the one llm-compressor's sequential pipeline runs on: every
module inside a block gets an ``OffloadCache`` as its parameters and buffers. Reading ``module.weight``
onloads it to the device; ``automp.model.set_parameter`` (``update_offload_parameter``) writes a new value through to
where it lives. A whole-model forward (perplexity, tasks, the KL probe) therefore streams by itself, and the
block-by-block stages (GPTQ, AWQ, the profile's gradient pass) wrap each block's work in :func:`keep_onloaded`,
so its weights are read from the offload once rather than once per batch. Training (block reconstruction) needs
autograd through swapped weights, which an offloaded module would write through, so it trains a plain copy of the
block (:func:`materialized`) and sets the results back. A model is loaded this way with
accelerate's ``device_map`` (the blocks on ``cpu`` or ``disk``), which compressed-tensors'
``load_offloaded_model`` converts; nothing is read into host memory beyond one tensor at a time on the way.

On a CPU, ``--offload disk`` is the mode that saves memory (the device *is* the host); ``cpu`` only changes
where the weights are read from, and the outputs of every mode are identical.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from automp.errors import AutompError
from automp.model import decoder_blocks

if TYPE_CHECKING:
    from automp.settings import ModelSettings

Offload = Literal["none", "cpu", "disk"]
OFFLOAD_MODES = ("auto", "none", "cpu", "disk")


def load_planned(
    settings: ModelSettings, stages: tuple[str, ...], in_memory_only: str | None = None, offload_dir: Path | None = None
):
    """The model and tokenizer, in memory or streamed as the memory plan of ``stages`` says (or refused).
    ``in_memory_only``: what of the command does not stream, refused when the plan streams. ``offload_dir``: another
    one than ``settings.offload_dir`` (a second streamed model beside the first)."""
    torch.manual_seed(settings.seed)
    formats = getattr(settings, "formats", None) or getattr(settings, "scheme", None) or "w4g128"
    offload = plan_offload(
        settings.model, settings.offload, stages, formats=formats, nsamples=getattr(settings, "nsamples", 128),
        seqlen=settings.seqlen, batch_size=settings.batch_size, device=settings.device, dtype=settings.dtype,
        device_memory=settings.device_memory, cpu_memory=settings.cpu_memory,
    )  # fmt: skip
    if offload != "none" and in_memory_only:
        asked = "the memory plan needs" if settings.offload == "auto" else "you asked for"
        raise AutompError(
            f"{in_memory_only} runs in memory only, but {asked} --offload {offload}: run it on a machine whose "
            "memory holds the model (or give its --device-memory / --cpu-memory), or leave it out"
        )
    from automp.model import load_model

    return load_model(
        settings.model, dtype=settings.dtype, device=settings.device, trust_remote_code=settings.trust_remote_code,
        offload=offload, offload_dir=offload_dir or settings.offload_dir,
    )  # fmt: skip


def plan_offload(model: str, requested: str, stages: tuple[str, ...], **workload) -> Offload:
    """The offload a command runs with, from its memory plan (``execution/plan.py``) over ``stages``; ``workload``
    is ``memory_plan``'s keywords (formats, nsamples, seqlen, batch_size, device, dtype, device and CPU memory).

    ``auto`` streams when only streaming fits: from host memory when it holds the model beside the stages' own
    host use, else from disk (on a CPU the device is the host, so always disk). The command is refused, up front,
    when its stages fit no mode, or not the one asked for. A model whose plan cannot be made (an architecture the
    plan does not know) runs as asked, ``auto`` in memory."""
    from automp.execution.plan import DTYPE_BYTES, check_mode, check_plan, plan_if_known, plan_refusal

    if requested not in OFFLOAD_MODES:
        raise AutompError(f"unknown --offload {requested!r}: use one of {', '.join(OFFLOAD_MODES)}")
    plan = plan_if_known(model, stages=",".join(stages), **workload)
    if plan is None:
        return "none" if requested == "auto" else requested
    for stage in stages:
        check_plan(plan, stage)
    mode = {"none": "in-memory", "cpu": "streaming", "disk": "streaming"}.get(requested, plan.mode)
    if mode is None:
        raise AutompError(plan_refusal(plan))
    check_mode(plan, mode, "choose another --offload, or leave it auto")
    if requested != "auto":
        return requested
    if mode == "in-memory":
        return "none"
    weights = plan.params * DTYPE_BYTES[plan.dtype]
    host_use = max(plan.stages[stage].cpu_bytes for stage in stages)
    return "cpu" if plan.device == "cuda" and weights + host_use <= plan.cpu_memory else "disk"


def is_streamed(model: nn.Module) -> bool:
    """Whether the model's decoder blocks are offloaded (their weights onload on access)."""
    # an offloaded module's tensors are a compressed-tensors OffloadCache (imported only when streaming: slow)
    return any(not isinstance(module._parameters, dict) for module in decoder_blocks(model).modules())


_written: dict[tuple[int, str], tuple[nn.Module, str]] | None = None  # inside keep_onloaded: what to write back


@contextlib.contextmanager
def keep_onloaded() -> Iterator[None]:
    """Within the body, every weight read stays onloaded, and a weight set (``set_parameter``) changes the onloaded
    copy only; on exit the changed ones are written back to their offload once, and all are released. (AWQ's grid
    search sets a block's weights dozens of times: each would otherwise be a write to disk.)"""
    from compressed_tensors.offload import disable_offloading, update_offload_parameter

    global _written
    if _written is not None:  # nested: the outer one writes back
        yield
        return
    _written = {}
    try:
        with disable_offloading():
            try:
                yield
            finally:
                for module, name in _written.values():
                    update_offload_parameter(module, name, getattr(module, name))
    finally:
        _written = None


def write_through(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set an offloaded module's tensor: in its onloaded copy until ``keep_onloaded`` ends, else in its offload."""
    from compressed_tensors.offload import update_offload_parameter

    if _written is None:
        update_offload_parameter(module, name, value)
        return
    getattr(module, name).data.copy_(value)
    _written[id(module), name] = (module, name)


def materialized(module: nn.Module) -> nn.Module:
    """A plain copy of a streamed ``module`` on its onload device: no offloading, its own tensors."""
    from compressed_tensors.offload import OffloadCache
    from compressed_tensors.offload.module import remove_module_offload

    onloaded = {}  # deepcopy's memo: each offloaded tensor is copied as its onloaded value
    for sub in module.modules():
        for cache in (sub._parameters, sub._buffers):
            if isinstance(cache, OffloadCache):
                for value in cache.offloaded_values.values():
                    if value is not None:
                        loaded = cache.onload(value)
                        onloaded[id(value)] = loaded.clone() if loaded is value else loaded
    copied = copy.deepcopy(module, onloaded)
    for sub in copied.modules():
        remove_module_offload(sub)  # what it offloaded is now the onloaded copies
    return copied


def stream_blocks(model: nn.Module, mode: Offload, device: torch.device, offload_dir: Path | None = None) -> nn.Module:
    """Offload an already loaded model: its decoder blocks to ``mode`` (``cpu`` or ``disk``), every other module
    to host memory, all onloading to ``device`` when used. ``disk`` writes the block tensors under ``offload_dir``
    (default: a temporary directory removed at exit)."""
    from compressed_tensors.offload.module import offload_module

    if mode not in ("cpu", "disk"):
        raise AutompError(f"unknown offload {mode!r}: stream the blocks to cpu or disk")
    inside = {id(module) for module in decoder_blocks(model).modules()}
    kwargs = {}
    if mode == "disk":
        folder = Path(offload_dir or _temporary_dir())
        folder.mkdir(parents=True, exist_ok=True)
        kwargs = {"offload_dir": str(folder)}
    for module in model.modules():
        if id(module) in inside:
            offload_module(module, onload_device=device, offload_device=mode, **kwargs)
        else:
            offload_module(module._apply(lambda t: t.cpu(), recurse=False), onload_device=device, offload_device="cpu")
    return model


def load_streamed(
    source: str,
    mode: Offload,
    device: torch.device,
    dtype: torch.dtype,
    *,
    offload_dir: Path | None = None,
    local_only: bool = True,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a Hugging Face checkpoint with its decoder blocks on ``mode`` (``cpu`` or ``disk``) and the rest in host
    memory, onloading to ``device`` when used, without ever holding the whole model anywhere."""
    from accelerate import init_empty_weights
    from compressed_tensors.offload import load_offloaded_model, set_onload_device
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, local_files_only=local_only, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    placement, folder = device_map(skeleton, mode), str(offload_dir or _temporary_dir())
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=placement, offload_folder=folder, local_files_only=local_only,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
    set_onload_device(model, device)  # every module, offloaded by accelerate or not, computes on the device
    return model.eval()


def device_map(skeleton: nn.Module, mode: Offload) -> dict[str, str]:
    """accelerate's placement: each decoder block on ``mode``, every module outside them with tensors of its own
    in host memory (the memory plan's streaming mode keeps them there)."""
    names = {id(module): name for name, module in skeleton.named_modules()}
    blocks = decoder_blocks(skeleton)
    inside = {id(module) for module in blocks.modules()}
    placement = {}
    for name, module in skeleton.named_modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if id(module) not in inside and own:
            placement[name] = "cpu"
    placement.update({names[id(block)]: mode for block in blocks})
    return placement


def _temporary_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="automp-offload-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
