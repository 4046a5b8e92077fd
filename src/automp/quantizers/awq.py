"""AWQ (Lin et al., 2023): activation-aware per-input-channel scaling before round-to-nearest.

A linear layer computes ``W x = (W diag(s)) (x / s)``. Scaling the weight's input channels by ``s``
before quantizing protects the channels whose activations are large, and the ``1 / s`` is folded
into the op that produces ``x`` (a norm's weight, or the output rows of the previous linear), so
the full-precision model computes exactly what it computed before. For each group of linears that
share an input, ``s = mean|x| ** alpha`` is searched over a grid of ``alpha`` for the smallest
output error of the module the group lives in (attention, MLP, or the layer itself), with every
layer quantized in its own allocated format. Then, as in the reference implementation, each
layer's range is clipped where that lowers its output error (``awq_clip.py``; query and key are
left unclipped). The caller quantizes the scaled, clipped weights with RTN.

Scales are found for Llama-family blocks (Llama, Mistral, Qwen2, ...) and pre-norm ReLU OPT blocks.
Where no previous op can absorb ``1 / s`` (other architectures, Gemma's ``1 + weight`` norms) the
layers are left unscaled, which is plain RTN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from automp.formats import Format
from automp.model import linear_weight, role_of, set_linear_weight, set_parameter
from automp.quantizers.awq_clip import clip_weight, run_with_hooks, sample_inputs
from automp.quantizers.rtn import rtn_quantize

GRID = 20  # alpha = 0, 1/20, ..., 19/20 (the reference implementation's grid; alpha = 0 is plain RTN)

# (op whose output feeds the linears, the linears sharing that input, module whose output is compared)
LLAMA = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
OPT = (
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
    ("final_layer_norm", ("fc1",), "fc1"),
    ("fc1", ("fc2",), "fc2"),  # ReLU(x / s) = ReLU(x) / s for s > 0
)


@dataclass
class ScaleGroup:
    prev: nn.Module  # absorbs 1 / s: a norm, or a linear whose output rows are the group's inputs
    linears: list[nn.Module]
    inspect: nn.Module
    repeat: int = 1  # > 1: prev is a GQA v_proj, each of its rows feeds ``repeat`` attention heads
    head_dim: int = 0


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The block's groups of linears whose input scaling a previous op can absorb exactly."""
    names = dict(block.named_modules())
    spec = LLAMA if "mlp.gate_proj" in names else OPT if _pre_norm_relu_opt(block) else ()
    groups = []
    for prev, linears, inspect in spec:
        if not all(name in names for name in (prev, *linears, inspect)) or not _absorbs(names[prev]):
            continue
        group = ScaleGroup(names[prev], [names[name] for name in linears], names[inspect])
        rows, inputs = linear_weight(group.prev).shape[0], group.linears[0].in_features
        if isinstance(group.prev, nn.Linear) and rows != inputs:  # grouped-query attention
            group.head_dim = getattr(names[prev.rpartition(".")[0]], "head_dim", 0)
            if not group.head_dim or inputs % rows or rows % group.head_dim:
                continue
            group.repeat = inputs // rows
        groups.append(group)
    return groups


def _pre_norm_relu_opt(block: nn.Module) -> bool:
    # post-norm OPT (350m): the norms do not produce the linears' inputs; GELU would not commute with 1 / s
    return getattr(block, "do_layer_norm_before", False) and isinstance(getattr(block, "activation_fn", None), nn.ReLU)


def _absorbs(op: nn.Module) -> bool:
    if isinstance(op, (nn.Linear, nn.LayerNorm)):
        return getattr(op, "weight", None) is not None
    # RMSNorm multiplies by its weight; Gemma's multiplies by (1 + weight), which a division cannot fold into
    name = type(op).__name__
    return name.endswith("RMSNorm") and "Gemma" not in name and getattr(op, "weight", None) is not None


@torch.no_grad()
def awq_scale_block(
    block: nn.Module, inputs: list, formats: dict[nn.Module, Format], clip: bool = True
) -> list[torch.Tensor]:
    """Search and apply AWQ scales (then clipping) in ``block``, in place; returns the scales applied.

    ``inputs`` are the block's (args, kwargs) per calibration batch; ``formats`` maps each linear to
    quantize to its format (other linears are left in full precision during the search). Scaling
    alone leaves the block's function unchanged; clipping changes the weights (it anticipates RTN).
    """
    groups = scale_groups(block)
    captured = _capture(block, inputs, groups)
    chosen = [search_scales(group, *captured[i], formats) for i, group in enumerate(groups)]
    for group, scales in zip(groups, chosen, strict=True):  # searched on the unscaled block, then applied
        apply_scales(group, scales)
    if clip:
        names = {module: name for name, module in block.named_modules()}
        # attention scores amplify query/key errors in ways the layer-output error does not see
        targets = [m for m, fmt in formats.items() if fmt.quantized and role_of(names[m]) not in ("q", "k", "qkv")]
        samples = sample_inputs(block, inputs, targets)
        for layer in targets:
            set_linear_weight(layer, clip_weight(linear_weight(layer), samples[layer], formats[layer]))
    return chosen


def _capture(block: nn.Module, inputs: list, groups: list[ScaleGroup]) -> list[tuple[list, torch.Tensor]]:
    """Per group: its inspected module's (args, kwargs) per batch, and mean |x| of the linears' input."""
    calls: list[list] = [[] for _ in groups]
    abs_sum = [0.0 for _ in groups]
    count = [0 for _ in groups]

    def record(i: int):
        def hook(_module, args, kwargs):
            calls[i].append((args, kwargs))

        return hook

    def stats(i: int):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            abs_sum[i] = abs_sum[i] + x.abs().sum(dim=0)
            count[i] += x.shape[0]

        return hook

    handles = [g.inspect.register_forward_pre_hook(record(i), with_kwargs=True) for i, g in enumerate(groups)]
    handles += [g.linears[0].register_forward_pre_hook(stats(i)) for i, g in enumerate(groups)]
    run_with_hooks(block, inputs, handles)
    return [(calls[i], abs_sum[i] / max(count[i], 1)) for i in range(len(groups))]


def search_scales(
    group: ScaleGroup, calls: list, x_mean: torch.Tensor, formats: dict[nn.Module, Format]
) -> torch.Tensor:
    """The ``mean|x| ** alpha`` on the grid whose quantized group changes the inspected output least."""
    if not any(layer in formats for layer in group.linears):
        return torch.ones_like(x_mean)
    reference = [_output(group.inspect, args, kwargs) for args, kwargs in calls]
    originals = [linear_weight(layer).detach().clone() for layer in group.linears]
    x_mean = _shared(x_mean, group)
    best, best_loss = torch.ones_like(x_mean), float("inf")
    try:
        for step in range(GRID):
            scales = x_mean.pow(step / GRID).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()  # centre the range around 1
            for layer, weight in zip(group.linears, originals, strict=True):
                set_linear_weight(layer, _fake_quantize(weight.float() * scales, formats.get(layer)) / scales)
            loss = sum(_error(group.inspect, call, ref) for call, ref in zip(calls, reference, strict=True))
            if loss < best_loss:
                best, best_loss = scales, loss
    finally:
        for layer, weight in zip(group.linears, originals, strict=True):
            set_linear_weight(layer, weight)
    return best


def _shared(x_mean: torch.Tensor, group: ScaleGroup) -> torch.Tensor:
    """Under GQA, o_proj input ``(kv, r, d)`` reads v row ``(kv, d)`` for every head ``r`` of the kv group,
    so those channels must share one scale: they get their mean activation."""
    if group.repeat == 1:
        return x_mean
    per_head = x_mean.view(-1, group.repeat, group.head_dim)
    return per_head.mean(dim=1, keepdim=True).expand_as(per_head).reshape(-1)


def _fake_quantize(weight: torch.Tensor, fmt: Format | None) -> torch.Tensor:
    return weight if fmt is None or not fmt.quantized else rtn_quantize(weight, fmt).dequantize()


def _output(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = module(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


def _error(module: nn.Module, call: tuple[tuple, dict], reference: torch.Tensor) -> float:
    return (_output(module, *call) - reference).pow(2).sum().item()


def apply_scales(group: ScaleGroup, scales: torch.Tensor) -> None:
    """``W <- W diag(s)`` for the group's linears and ``1 / s`` folded into the previous op's output."""
    for layer in group.linears:
        set_linear_weight(layer, linear_weight(layer).float() * scales)
    prev = group.prev
    inverse = 1 / scales
    if group.repeat > 1:  # the heads of a kv group share their scales (see _shared): one per v row
        inverse = inverse.view(-1, group.repeat, group.head_dim)[:, 0].reshape(-1)
    if isinstance(prev, nn.Linear):
        set_parameter(prev, "weight", prev.weight.float() * inverse.unsqueeze(1))
    else:
        set_parameter(prev, "weight", prev.weight.float() * inverse)
    if getattr(prev, "bias", None) is not None:
        set_parameter(prev, "bias", prev.bias.float() * inverse)
