"""``quantize_(model, allocation, method)``: quantize a model in place, layer formats from an allocation.

RTN needs no data. GPTQ and AWQ run block by block over the decoder: the inputs of block ``i`` are
the outputs of blocks ``0..i-1`` *already quantized*, so each block corrects for the error upstream.
Only one block's calibration activations are held at a time. AWQ scales and clips each block's
weights (``quantizers/awq.py``), then rounds them with RTN; an ``lm_head`` gets plain RTN.

The token embedding (an allocated ``embed`` layer) has no Hessian: its rows are looked up, not
multiplied. Every method quantizes it with RTN, first, so the blocks see the quantized embedding; for
GGUF formats that is llama.cpp's reference quantizer without an importance matrix, as llama-quantize
quantizes ``token_embd`` (llama-imatrix collects matrix-multiplication inputs only).

A ``+rN`` format adds its low-rank correction (``quantizers/lowrank.py``, ``GPTQConfig.correction``)
fitted on the same block inputs, so the blocks downstream see the quantized *and corrected* outputs.
AWQ collects the scaled layers' Hessians for it; RTN, having no data, uses the data-free ``svd``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.execution.blocks import (
    batches_on,
    capture_block_inputs,
    hessian_hooks,
    model_device,
    propagate,
    run_block,
    to_device,
)
from automp.execution.offload import is_streamed, keep_onloaded
from automp.model import decoder_blocks, inventory_for, linear_weight, set_linear_weight, set_parameter
from automp.quantizers.awq import awq_scale_block
from automp.quantizers.gptq import gptq_quantize
from automp.quantizers.lowrank import METHODS as CORRECTIONS
from automp.quantizers.qweight import QWeight
from automp.quantizers.rtn import rtn_quantize

METHODS = ("rtn", "gptq", "awq")


@dataclass
class GPTQConfig:
    damp: float = 0.01
    act_order: bool = True
    blocksize: int = 128
    correction: str = "exact"  # +rN formats' low-rank estimator (quantizers/lowrank.py), for every method

    @classmethod
    def of(cls, settings) -> GPTQConfig:
        """The config a command's settings (``damp``, ``act_order``, ``correction``) ask for."""
        return cls(damp=settings.damp, act_order=settings.act_order, correction=settings.correction)

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise AutompError(f"unknown correction {self.correction!r}: use one of {', '.join(CORRECTIONS)}")


@dataclass
class AWQConfig:
    clip: bool = True  # the clipping search after scaling (part of the reference AWQ)


@torch.no_grad()
def quantize_(
    model: nn.Module,
    allocation: Allocation,
    method: str = "rtn",
    calib: torch.Tensor | None = None,
    *,
    gptq: GPTQConfig | None = None,
    awq: AWQConfig | None = None,
    batch_size: int = 8,
    progress: bool = True,
    after_block: Callable[[int], object] | None = None,
    codes: MutableMapping[str, QWeight] | None = None,
) -> MutableMapping[str, QWeight]:
    """Quantize every layer whose allocated format is quantized; returns the stored weights by name.

    The model's weights are replaced by their dequantized values and every other float32 tensor is
    rounded to fp16, so the model in memory computes exactly what the stored checkpoint computes.
    ``after_block(i)`` (GPTQ and AWQ) runs once block ``i`` is quantized, before block ``i + 1`` is
    calibrated: sequential fine-tuning (``repair/seq_finetune.py``) trains the blocks downstream there.
    ``codes`` receives the stored weights as each layer is done (default: a dict; a streamed run gives
    ``checkpoint.SpilledWeights``, so that they wait on disk) and is returned.
    """
    gptq, awq = gptq or GPTQConfig(), awq or AWQConfig()
    if after_block is not None and method == "rtn":
        raise AutompError("fine-tuning between blocks needs a block-by-block method: --method gptq or awq")
    out = {} if codes is None else codes
    _quantize_layers(model, allocation, method, calib, gptq, awq, batch_size, progress, after_block, out)
    round_to_storage(model, skip=set(out))
    return out


def round_to_storage(model: nn.Module, skip: set[str] = frozenset()) -> None:
    """Round float32 parameters to their 16-bit stored values (the quantized layers in ``skip`` excepted)."""
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dtype == torch.float32 and f"{prefix}.{name}".lstrip(".").removesuffix(".weight") not in skip:
                set_parameter(module, name, param.half().float())


def _quantize_layers(model, allocation, method, calib, gptq, awq, batch_size, progress, after_block, out) -> None:
    if method not in METHODS:
        raise AutompError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    inv = inventory_for(model, allocation.formats)
    allocation.check(inv)
    todo = [layer.name for layer in inv.layers if allocation.format_of(layer.name).quantized]
    modules = {name: model.get_submodule(name) for name in todo}
    block_of = {layer.name: layer.block for layer in inv.layers}
    streamed, device = is_streamed(model), model_device(model)

    def quantize_layer(name: str, hessian: torch.Tensor | None) -> None:
        module, fmt = modules[name], allocation.format_of(name)
        if method == "gptq" and block_of[name] >= 0:  # the embedding (block -1) has no Hessian: RTN
            qweight = gptq_quantize(linear_weight(module), hessian, fmt, **vars(gptq))
        else:  # the Hessian (AWQ) only feeds a +rN format's correction
            qweight = rtn_quantize(linear_weight(module), fmt, hessian=hessian, correction=gptq.correction)
        set_linear_weight(module, qweight.dequantize())
        out[name] = qweight.to("cpu") if streamed else qweight  # streamed: the codes wait on the host, not the device

    if method == "rtn":
        for name in tqdm(todo, desc="rtn", disable=not progress, leave=False):
            quantize_layer(name, None)
        return
    if calib is None or len(calib) == 0:
        raise AutompError(f"{method.upper()} needs calibration data (--calib)")
    for name in [name for name in todo if block_of[name] < 0]:  # the token embedding, before the blocks see it
        quantize_layer(name, None)
    blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], calib, batch_size)
    if streamed:  # the plan's streaming mode: every window's block inputs wait on the host, a batch at a time goes over
        inputs = to_device(inputs, torch.device("cpu"))
    for index, block in enumerate(tqdm(blocks, desc=f"{method} blocks", disable=not progress, leave=False)):
        names = [name for name in todo if block_of[name] == index]
        with keep_onloaded() if streamed else contextlib.nullcontext():  # a streamed block is read once
            if method == "awq":  # its scale search holds every window's inputs on the device, streamed or not
                formats = {modules[name]: allocation.format_of(name) for name in names}
                awq_scale_block(block, to_device(inputs, device) if streamed else inputs, formats, awq.clip)
            hessians = dict.fromkeys(names)
            # AWQ rounds with RTN: it needs Hessians for the +rN corrections only
            hooked = [name for name in names if method == "gptq" or allocation.format_of(name).rank]
            if hooked:
                with hessian_hooks({name: modules[name] for name in hooked}) as found:
                    for _ in run_block(block, batches_on(inputs, device) if streamed else inputs):
                        pass
                hessians |= found
            for name in names:
                quantize_layer(name, hessians[name])
            outputs = run_block(block, batches_on(inputs, device) if streamed else inputs)
            inputs = propagate(inputs, [output.cpu() if streamed else output for output in outputs])
        if after_block is not None:  # block i's outputs are fixed now; the blocks after it may still change
            after_block(index)
    for name in [name for name in todo if block_of[name] == len(blocks)]:  # lm_head, after the final norm
        if method == "awq":
            quantize_layer(name, None)
            continue
        with hessian_hooks({name: modules[name]}) as hessians:
            for batch in calib.split(batch_size):
                model(input_ids=batch.to(model_device(model)), use_cache=False)
        quantize_layer(name, hessians[name])
