"""A stored quantized weight made trainable, and frozen back into exactly its format.

Rounding passes gradients straight through (STE); the scales seen by the forward are already rounded
to fp16, so in eval mode the forward computes what :meth:`TrainableWeight.freeze` stores. Two
parametrisations, one per method (groups of ``g`` weights share a scale ``s`` and zero-point ``z``):

* ``block-ap`` (EfficientQAT's Block-AP): the latent weight ``W`` and ``s`` (and ``z`` for
  asymmetric formats) train; ``Ŵ = s · (clamp(⌊W/s⌉ + z, 0, 2^b − 1) − z)``. ``s`` and ``z`` start
  at the stored ones, ``W`` at the full-precision weight (at the stored weight when none is given).
  ``W`` is kept in units of the starting scale, so one learning rate suits every layer. Codebook
  formats (nf4, fp4) round to their nearest level instead.
* ``sign-round`` (AutoRound): ``W`` is the full-precision weight and stays fixed; per-weight
  offsets ``V ∈ [−½, ½]`` and per-group clip factors ``α ∈ [½, 1]`` on the group's max (and min)
  train: ``Ŵ = s · (clamp(⌊W/s + V⌉ + z, 0, 2^b − 1) − z)`` with ``s, z`` from the clipped range.
  Integer formats only.

A ``+rN`` format's correction factors ``A``, ``B`` train too (rounded to fp16 the same way).
"""

from __future__ import annotations

import torch
from torch import nn

from automp.errors import AutompError
from automp.formats import Format
from automp.quantizers.lowrank import LowRankCorrection
from automp.quantizers.qweight import CorrectedWeight, QuantizedWeight, QWeight

PARAMETRISATIONS = ("block-ap", "sign-round")


def why_untrainable(qweight: QWeight, parametrisation: str) -> str | None:
    """Why ``qweight`` cannot be trained under ``parametrisation`` (None when it can)."""
    fmt = qweight.fmt.base
    if fmt.kind == "gguf":
        return f"{fmt.name}: GGUF blocks (super-block scales) have no trainable parametrisation here"
    if parametrisation == "sign-round" and fmt.kind != "int":
        return f"{fmt.name}: sign rounding needs an integer grid"
    return None


def _ste(x: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """``hard`` in the forward, the identity's gradient in the backward."""
    return x + (hard - x).detach()


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return _ste(x, x.detach().half().float())


class TrainableWeight(nn.Module):
    """One quantized layer's trainable state; ``forward()`` returns its (out, in) dequantized weight."""

    def __init__(self, qweight: QWeight, parametrisation: str, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if parametrisation not in PARAMETRISATIONS:
            raise AutompError(f"unknown parametrisation {parametrisation!r}: use one of {', '.join(PARAMETRISATIONS)}")
        if (why := why_untrainable(qweight, parametrisation)) is not None:
            raise AutompError(why)
        base = qweight.base if isinstance(qweight, CorrectedWeight) else qweight
        self.fmt: Format = qweight.fmt
        self.parametrisation = parametrisation
        rows, groups, g = base._grouped()
        self.shape = (rows, groups * g)
        self.maxq = 2**self.fmt.bits - 1 if self.fmt.kind == "int" else 0
        if parametrisation == "block-ap":
            scale = base.scale.float().reshape(rows, groups, 1)
            self.register_buffer("scale0", scale)
            # EfficientQAT's start: the full-precision weight on the stored grid. The stored codes
            # themselves sit exactly mid-cell, where Adam's equal steps flip whole groups at once.
            start = base.dequantize() if weight is None else weight.detach()
            latent = start.float().reshape(rows, groups, g) / scale
            self.latent = nn.Parameter(latent)
            self.gain = nn.Parameter(torch.ones_like(scale))
            zero = None if base.zero is None else base.zero.float().reshape(rows, groups, 1)
            self.zero = None if zero is None else nn.Parameter(zero)
        else:
            if weight is None:
                raise AutompError("sign rounding needs the layer's full-precision weight")
            w = weight.detach().float().reshape(rows, groups, g)
            self.register_buffer("weight", w)
            symmetric = self.fmt.symmetric  # the clipped range: ±absmax, or [min, max] around 0
            self.register_buffer("lo", w.amin(-1, keepdim=True).clamp(max=0))
            self.register_buffer(
                "hi", w.abs().amax(-1, keepdim=True) if symmetric else w.amax(-1, keepdim=True).clamp(min=0)
            )
            self.offset = nn.Parameter(torch.zeros_like(w))
            self.clip_hi = nn.Parameter(torch.ones_like(self.hi))
            self.clip_lo = None if symmetric else nn.Parameter(torch.ones_like(self.lo))
        correction = qweight.correction if isinstance(qweight, CorrectedWeight) else None
        self.A = None if correction is None else nn.Parameter(correction.A.float())
        self.B = None if correction is None else nn.Parameter(correction.B.float())

    # ---- the grid ------------------------------------------------------------------------

    def _scale_zero(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each group's fp16 scale and integer zero-point (None: the symmetric midpoint)."""
        if self.parametrisation == "block-ap":
            scale = _fp16((self.scale0 * self.gain).clamp(min=1e-6))
            zero = None if self.zero is None else _ste(self.zero, self.zero.detach().round()).clamp(0, self.maxq)
            return scale, zero
        hi = self.hi * self.clip_hi
        if self.clip_lo is None:  # symmetric: fit_params' convention, (2^b − 1)/2 half-steps reach −absmax
            return _fp16((hi / (self.maxq / 2)).clamp(min=1e-6)), None
        lo = self.lo * self.clip_lo
        scale = _fp16(((hi - lo) / self.maxq).clamp(min=1e-6))
        zero = -lo / scale
        return scale, _ste(zero, zero.detach().round()).clamp(0, self.maxq)

    def _target(self, scale: torch.Tensor) -> torch.Tensor:
        """The real-valued code position of each weight, before rounding."""
        if self.parametrisation == "block-ap":
            return self.latent * self.scale0 / scale
        return self.weight / scale + self.offset

    def _codes(self, x: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Rounded code values (centred: the level, not its index), straight-through."""
        if self.fmt.kind != "int":
            levels = self.fmt.levels.to(x.device)
            nearest = levels[(x.detach().unsqueeze(-1) - levels).abs().argmin(-1)]
            return _ste(x, nearest)
        z = zero if zero is not None else 2 ** (self.fmt.bits - 1)
        return torch.clamp(_ste(x, x.detach().round()) + z, 0, self.maxq) - z

    def forward(self) -> torch.Tensor:
        scale, zero = self._scale_zero()
        w = (self._codes(self._target(scale), zero) * scale).reshape(self.shape)
        if self.A is not None:
            w = w + _fp16(self.B) @ _fp16(self.A)
        return w

    @torch.no_grad()
    def project_(self) -> None:
        """Keep sign rounding's offsets and clip factors in their ranges (after each step)."""
        if self.parametrisation == "sign-round":
            self.offset.clamp_(-0.5, 0.5)
            for clip in (self.clip_hi, self.clip_lo):
                if clip is not None:
                    clip.clamp_(0.5, 1.0)

    # ---- back to the stored format -------------------------------------------------------

    @torch.no_grad()
    def freeze(self) -> QWeight:
        """The stored weight: codes, fp16 scales, integer zero-points (and fp16 ``A``, ``B``)."""
        scale, zero = self._scale_zero()
        x = self._target(scale)
        rows, groups, g = x.shape
        if self.fmt.kind == "int":
            offset = zero if zero is not None else 2 ** (self.fmt.bits - 1)
            codes = torch.clamp(x.round() + offset, 0, self.maxq)
        else:
            codes = (x.unsqueeze(-1) - self.fmt.levels.to(x.device)).abs().argmin(-1)
        scale16 = scale.reshape(rows, groups).half()
        zero8 = None if zero is None else zero.reshape(rows, groups).to(torch.uint8)
        base = QuantizedWeight(self.fmt.base, codes.reshape(self.shape).to(torch.uint8), scale16, zero8)
        if self.A is None:
            return base
        return CorrectedWeight(self.fmt, base, LowRankCorrection(A=self.A.detach().half(), B=self.B.detach().half()))
