"""Block-by-block execution of a decoder: capture the first block's inputs, run a block, propagate.

Every stage that works one decoder block at a time (GPTQ/AWQ quantization, the search's cached-weight
evaluator, block reconstruction) uses these: the inputs of block ``i`` are kept as the ``(args,
kwargs)`` the block received (attention masks, rotary embeddings, ...) with the hidden states swapped
for the previous block's outputs by :func:`with_hidden`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from automp.model import linear_weight
from automp.quantizers.gptq import HessianAccumulator

BlockInputs = list[tuple[tuple, dict]]  # one (args, kwargs) per calibration batch


class _StopForward(Exception):
    """Raised by a hook to stop the model's forward once the first block's inputs are captured."""


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, windows: torch.Tensor, batch_size: int
) -> BlockInputs:
    """The (args, kwargs) the first decoder block receives for each batch of ``windows``."""
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch.to(model_device(model)), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: BlockInputs) -> Iterator[torch.Tensor]:
    """The block's output hidden states, batch by batch."""
    for args, kwargs in inputs:
        output = block(*args, **kwargs)
        yield output[0] if isinstance(output, tuple) else output


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A block input with its hidden states replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def propagate(inputs: BlockInputs, outputs: list[torch.Tensor]) -> BlockInputs:
    """The next block's inputs: each batch's input with the hidden states replaced by ``outputs``."""
    return [with_hidden(args, kwargs, hidden) for (args, kwargs), hidden in zip(inputs, outputs, strict=True)]


def to_device(inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """Every batch's input, its tensors (nested in tuples, lists and dicts too) moved to ``device``."""
    return list(batches_on(inputs, device))


def batches_on(inputs: BlockInputs, device: torch.device) -> Iterator[tuple[tuple, dict]]:
    """Each batch's input moved to ``device`` as it is used (a streamed run keeps the inputs on the host)."""
    from compressed_tensors.offload.utils import send_tensors  # streaming's library, imported only there

    for args, kwargs in inputs:
        yield send_tensors(args, device), send_tensors(kwargs, device)


def hidden_of(inputs: BlockInputs) -> list[torch.Tensor]:
    """The hidden states of each batch's input."""
    return [args[0] if args else kwargs["hidden_states"] for args, kwargs in inputs]


@contextlib.contextmanager
def hessian_hooks(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Accumulate each module's input Hessian while the ``with`` body runs forwards; filled on exit."""
    accumulators = {}
    for name, module in modules.items():
        weight = linear_weight(module)
        accumulators[name] = HessianAccumulator(weight.shape[1], weight.device)
    hooks = [
        module.register_forward_hook(lambda _m, inp, _out, acc=accumulators[name]: acc.add(inp[0]))
        for name, module in modules.items()
    ]
    hessians: dict[str, torch.Tensor] = {}
    try:
        yield hessians
    finally:
        for hook in hooks:
            hook.remove()
    hessians.update({name: acc.hessian for name, acc in accumulators.items()})
