"""GPTQ (Frantar et al., 2022): quantize columns one at a time, spreading each column's rounding
error onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

Minimises ``tr((W - Q) H (W - Q)^T)`` with ``H = X^T X / n`` from calibration inputs ``X``.
Follows the reference implementation: lazy batch updates in blocks of 128 columns, relative
damping of the diagonal, optional act-order (columns by descending ``diag(H)``). With act-order,
group parameters are fitted up front from the original weights ("static groups"), so groups stay
contiguous in the stored layout and no permutation index has to be shipped.

GGUF formats round on a grid fixed up front too: every block's super-block scales and quantized
sub-block scales and mins are llama.cpp's importance-matrix choice for the original weights, with
``diag(H)`` (the mean squared input per column, llama.cpp's imatrix) as the importance
(``gguf_quantize.GGUFGrid``). GPTQ then only chooses the codes on it.

A ``+rN`` format is GPTQ in its base format, then the rank-N correction of what GPTQ left
(``lowrank.py``, ``correction`` names the estimator) fitted with the same ``H``.
"""

from __future__ import annotations

import torch

from automp.errors import AutompError
from automp.formats import Format, GroupParams, fit_params, quantize_dequantize
from automp.quantizers.gguf_quantize import GGUFGrid
from automp.quantizers.gguf_weight import GGUFWeight
from automp.quantizers.qweight import CorrectedWeight, QuantizedWeight, QWeight


class HessianAccumulator:
    """Running ``X^T X / n`` over the rows of every input batch a layer sees."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(in_features, in_features, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.hessian *= self.count / (self.count + n)
        self.count += n
        self.hessian += x.T @ x / self.count


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: Format,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    blocksize: int = 128,
    correction: str = "exact",
) -> QWeight:
    """GPTQ-quantize an (out, in) weight given its input Hessian (in, in)."""
    if fmt.rank:
        base = gptq_quantize(weight, hessian, fmt.base, damp=damp, act_order=act_order, blocksize=blocksize)
        return CorrectedWeight.fit(weight, base, hessian, fmt, correction)
    rows, cols = weight.shape
    fmt.check_weight(weight)
    g = fmt.group(cols)
    if g < cols and blocksize % g:
        raise AutompError(f"GPTQ block size {blocksize} must be a multiple of the group size {g}")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone().to(W.device)

    importance = torch.diag(H).clone()
    dead = importance == 0  # inputs that were always zero carry no information
    H[dead, dead] = 1
    W[:, dead] = 0

    # Parameters fixed before any error feedback: per-channel (one group), act-order groups, GGUF grids.
    grid = GGUFGrid.fit(fmt, W, importance) if fmt.kind == "gguf" else None
    codes = torch.zeros(rows, cols, dtype=torch.long, device=W.device) if grid else None
    static = act_order or g == cols or grid is not None
    params = fit_params(fmt, W.reshape(rows, cols // g, g)) if static and not grid else None
    scale = params.scale if params else torch.zeros(rows, cols // g, device=W.device)
    zero = None if fmt.symmetric or fmt.kind != "int" else torch.zeros_like(scale)
    if params and params.zero is not None:
        zero = params.zero

    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    order = order.to(W.device)
    W, H = W[:, order], H[order][:, order]

    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise AutompError(f"GPTQ: the Hessian is not positive definite ({err}); raise the damping") from err

    Q = torch.zeros_like(W)
    columns = order.tolist()  # read once: indexing the device tensor per column would wait for the GPU each time
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = columns[i1 + i]
            grp = col // g
            if not static and col % g == 0:  # first column of a group: fit on the updated weights
                fitted = fit_params(fmt, W1[:, i : i + g])
                scale[:, grp] = fitted.scale
                if zero is not None:
                    zero[:, grp] = fitted.zero
            w = W1[:, i]
            if grid:
                q, codes[:, col] = grid.quantize(w, col)
            else:
                p = GroupParams(scale[:, grp], zero[:, grp] if zero is not None else None)
                q = quantize_dequantize(fmt, w.unsqueeze(1), p).squeeze(1)
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if grid:
        return GGUFWeight(fmt, grid.pack(codes).to(W.device))
    Q = Q[:, torch.argsort(order)]
    return QuantizedWeight.from_grid(fmt, Q, GroupParams(scale, zero))
