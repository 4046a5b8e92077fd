"""Round-to-nearest: each group's absmax (or min/max) sets its scale, each weight its nearest code.

For GGUF formats, round-to-nearest is llama.cpp's own quantizer (``gguf_quantize.py``), byte for byte,
with its importance-matrix variant when ``imatrix`` is given.

A ``+rN`` format is RTN in its base format plus the rank-N correction (``lowrank.py``): ``exact`` or
``diag`` when the layer's input Hessian is given (AWQ passes it), the data-free ``svd`` when not.
"""

from __future__ import annotations

import torch

from automp.errors import AutompError
from automp.formats import Format, fit_params
from automp.quantizers.gguf_quantize import quantize_gguf
from automp.quantizers.gguf_weight import GGUFWeight
from automp.quantizers.qweight import CorrectedWeight, QuantizedWeight, QWeight


def rtn_quantize(
    weight: torch.Tensor,
    fmt: Format,
    imatrix: torch.Tensor | None = None,
    *,
    hessian: torch.Tensor | None = None,
    correction: str = "exact",
) -> QWeight:
    """Quantize an (out, in) weight with round-to-nearest in ``fmt``.

    ``imatrix`` (GGUF formats only): per-input-column importance, llama.cpp's importance matrix (the
    mean squared activation of each column, ``diag(X^T X / n)``). ``hessian`` and ``correction``:
    the low-rank correction of a ``+rN`` format (``svd`` whatever ``correction`` says, without a Hessian)."""
    if fmt.rank:
        base = rtn_quantize(weight, fmt.base, imatrix)
        return CorrectedWeight.fit(weight, base, hessian, fmt, correction if hessian is not None else "svd")
    rows, cols = weight.shape
    fmt.check_weight(weight)
    if fmt.kind == "gguf":
        return GGUFWeight(fmt, quantize_gguf(fmt, weight, imatrix).to(weight.device))
    if imatrix is not None:
        raise AutompError(f"format {fmt.name}: an importance matrix applies to GGUF formats only")
    g = fmt.group(cols)
    params = fit_params(fmt, weight.float().reshape(rows, cols // g, g))
    return QuantizedWeight.from_grid(fmt, weight, params)
