"""AWQ's clipping search: shrink each group's range before round-to-nearest when that lowers the error.

An absmax grid spends its levels on the group's largest weight. Clipping the group to a smaller
``max|w|`` gives the other weights finer steps at the price of that one. For every output row and
input group, the range ``max|w| * (1 - i/20)``, ``i = 0..9``, with the smallest error of that group's
contribution to the layer's output on sampled calibration inputs is kept. The weight is clamped to
it, so the later RTN fits exactly the range that was chosen. ``i = 0`` is no clipping: never worse.
"""

from __future__ import annotations

import torch
from torch import nn

from automp.formats import Format, fit_params, quantize_dequantize

STEPS = 10  # down to 55 % of the range, in 5 % steps (the reference implementation's search)
TOKENS = 512  # input rows sampled per layer


@torch.no_grad()
def clip_weight(weight: torch.Tensor, x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``weight`` (out, in) clamped per (row, group) to the range minimising ``|x (Q(w) - w)^T|^2``."""
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
