"""AWQ's clipping search: shrink each group's range before round-to-nearest when that lowers the error.

An absmax grid spends its levels on the group's largest weight. Clipping the group to a smaller
``max|w|`` gives the other weights finer steps at the price of that one. For every output row and
input group, the range ``max|w| * (1 - i/20)``, ``i = 0..9``, with the smallest error of that group's
contribution to the layer's output on sampled calibration inputs is kept. The weight is clamped to
it, so the later RTN fits exactly the range that was chosen. ``i = 0`` is no clipping: never worse.

GGUF formats run the same search per sub-block with llama.cpp's quantizer as the RTN. K-quant blocks
couple their sub-blocks (one super-block scale), so each candidate clips every sub-block at once, each
(row, sub-block) keeps its best step, and the combined result is kept only if the layer's output
error is lower than without clipping.
"""

from __future__ import annotations

import torch
from torch import nn

from automp.formats import Format, fit_params, quantize_dequantize
from automp.quantizers.rtn import rtn_quantize

STEPS = 10  # down to 55 % of the range, in 5 % steps (the reference implementation's search)
TOKENS = 512  # input rows sampled per layer


@torch.no_grad()
def clip_weight(weight: torch.Tensor, x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``weight`` (out, in) clamped per (row, group) to the range minimising ``|x (Q(w) - w)^T|^2``."""
    if fmt.kind == "gguf":
        return _clip_gguf(weight, x, fmt)
    rows, cols = weight.shape
    g = fmt.group(cols)
    w, x = weight.float(), x.float().to(weight.device)
    clipped = w.clone()
    for start in range(0, cols, g):
        wg, xg = w[:, start : start + g], x[:, start : start + g]
        absmax = wg.abs().amax(dim=1, keepdim=True)
        best, best_err = wg, torch.full((rows,), float("inf"), device=w.device)
        for step in range(STEPS):
            limit = absmax * (1 - step / 20)
            candidate = torch.clamp(wg, -limit, limit)
            quantized = quantize_dequantize(fmt, candidate, fit_params(fmt, candidate))
            err = (xg @ (quantized - wg).T).pow(2).mean(dim=0)  # per output row
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better.unsqueeze(1), candidate, best)
        clipped[:, start : start + g] = best
    return clipped


def _clip_gguf(weight: torch.Tensor, x: torch.Tensor, fmt: Format) -> torch.Tensor:
    rows, cols = weight.shape
    g = fmt.group_size
    w, x = weight.float(), x.float().to(weight.device)
    xg = x.reshape(-1, cols // g, g)
    gram = torch.einsum("tgk,tgl->gkl", xg, xg)  # (groups, g, g): each sub-block's input Gram matrix

    def sub_block_error(candidate: torch.Tensor) -> torch.Tensor:  # (rows, groups)
        D = (rtn_quantize(candidate.reshape(rows, cols), fmt).dequantize() - w).reshape(rows, -1, g)
        return torch.einsum("rgk,gkl,rgl->rg", D, gram, D)

    wg = w.reshape(rows, -1, g)
    absmax = wg.abs().amax(dim=2, keepdim=True)
    best, best_err = wg, sub_block_error(wg)
    for step in range(1, STEPS):
        limit = absmax * (1 - step / 20)
        candidate = torch.clamp(wg, -limit, limit)
        err = sub_block_error(candidate)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(2), candidate, best)
    clipped = best.reshape(rows, cols)
    output_error = [(x @ (rtn_quantize(c, fmt).dequantize() - w).T).pow(2).sum() for c in (clipped, w)]
    return clipped if output_error[0] < output_error[1] else w


@torch.no_grad()
def sample_inputs(block: nn.Module, inputs: list, layers: list[nn.Module]) -> dict[nn.Module, torch.Tensor]:
    """About ``TOKENS`` evenly strided input rows of each layer, from one pass of ``block`` over ``inputs``."""
    rows: dict[nn.Module, list[torch.Tensor]] = {layer: [] for layer in layers}

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        stride = max(1, len(x) * len(inputs) // TOKENS)  # every batch holds about as many rows
        rows[module].append(x[::stride].float())

    run_with_hooks(block, inputs, [layer.register_forward_pre_hook(hook) for layer in layers])
    return {layer: torch.cat(chunks) for layer, chunks in rows.items()}


def run_with_hooks(block: nn.Module, inputs: list, handles: list) -> None:
    """Run ``block`` on every captured (args, kwargs) input, then remove the hooks behind ``handles``."""
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
