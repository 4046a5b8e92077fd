"""Round-to-nearest: each group's absmax (or min/max) sets its scale, each weight its nearest code."""

from __future__ import annotations

import torch

from automp.formats import Format, fit_params
from automp.quantizers.qweight import QuantizedWeight


def rtn_quantize(weight: torch.Tensor, fmt: Format) -> QuantizedWeight:
    """Quantize an (out, in) weight with round-to-nearest in ``fmt``."""
    rows, cols = weight.shape
    fmt.check_weight(weight)
    g = fmt.group(cols)
    params = fit_params(fmt, weight.float().reshape(rows, cols // g, g))
    return QuantizedWeight.from_grid(fmt, weight, params)
