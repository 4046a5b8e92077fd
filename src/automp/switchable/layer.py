"""A linear layer that switches its weight at run time: full precision or one of several quantized formats.

``SwitchableLinear`` keeps the layer's full-precision weight and, per allowed format, the dequantized
weight of that format's stored codes (``QuantizedWeight``, RTN or GPTQ). ``format`` names the weight the
forward pass uses; ``FULL`` is the full-precision weight. Its adapters are not here: PEFT wraps the layer
(``dispatch.py``) and keeps one LoRA adapter per format in its ``ModuleDict``s, keyed by the format name,
as PEFT's own LoRA layer keeps adapters by adapter name.

The stored codes stay beside the dequantized weights so that a bitmap can be delivered exactly as it runs
(same codes, same bytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from automp.errors import AutompError
from automp.quantizers.qweight import QuantizedWeight

FULL = "fp16"  # the format name of the full-precision weight


class SwitchableLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stored: dict[str, QuantizedWeight]):
        super().__init__()
        self.out_features, self.in_features = weight.shape  # (out, in), as nn.Linear
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.stored = dict(stored)  # the codes, for delivery
        for name, qweight in stored.items():  # non-persistent: a PEFT state dict holds adapters only
            if qweight.shape != tuple(weight.shape):
                raise AutompError(f"{name} codes have shape {qweight.shape}, the layer {tuple(weight.shape)}")
            self.register_buffer(_buffer(name), qweight.dequantize().to(weight), persistent=False)
        self.format = FULL

    @property
    def formats(self) -> list[str]:
        return list(self.stored)

    def switch(self, name: str) -> None:
        if name != FULL and name not in self.stored:
            raise AutompError(f"format {name!r} was not built for this layer: use {FULL} or {', '.join(self.stored)}")
        self.format = name

    def active_weight(self) -> torch.Tensor:
        return self.weight if self.format == FULL else getattr(self, _buffer(self.format))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return F.linear(x, self.active_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, formats={self.formats}, active={self.format}"


def _buffer(name: str) -> str:
    return "q_" + name.replace(".", "_")
