"""Weight formats: what a user can type, what each costs in stored bits, and its quantization grid.

Names: ``w{2,3,4,8}`` per output channel, ``w{b}g{32,64,128}`` group-wise, an ``a`` suffix for
asymmetric (``w4g128a``), ``nf4g{32,64,128}`` (QLoRA NormalFloat codebook), ``fp4g{32,64,128}``
(e2m1 codebook), ``fp16``/``bf16`` (left unquantized), and llama.cpp's GGUF tensor types ``q2_k``,
``q3_k``, ``q4_k``, ``q5_k``, ``q6_k``, ``q8_0``, ``q4_0`` and ``iq4_nl`` (any case: ``Q4_K`` parses too).

Every automp format (int, nf4, fp4) stores unsigned ``bits``-bit codes, one fp16 scale per group and, when
asymmetric, one ``bits``-bit zero-point per group. Dequantization is

* integer: ``(code - zero) * scale`` (symmetric formats use the fixed zero ``2**(bits-1)``),
* codebook: ``codebook[code] * scale``.

Scales are rounded to fp16 *before* encoding, so the stored tensors decode to exactly the values
the quantizers evaluated.

GGUF formats (``kind="gguf"``) store llama.cpp's blocks byte for byte (``quantizers/gguf_weight.py``):
``block_size`` weights of a row per block of ``type_size`` bytes (gguf-py's ``GGML_QUANT_SIZES``), 256 for
the K-quants and 32 for the others, so a row's length must be a multiple of the block. ``bits`` is the
nominal code width and ``group_size`` the sub-block the scales apply to (16 for Q2_K/Q3_K/Q6_K, 32 for
the others): the unit GPTQ and AWQ iterate over. Stored bits per weight are exact (Q4_K: 4.5).

A ``+r{N}`` suffix on any quantized format (``w2g64+r16``, ``q4_k+r8``) adds a rank-N low-rank error
correction ``B A`` beside the quantized weight (``quantizers/lowrank.py``): ``A`` (N x in) and ``B``
(out x N) are stored in fp16 and cost exactly ``N * (in + out) * 16`` bits, counted in
``storage_bits`` like scales are. ``Format.base`` is the format without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import torch

from automp.errors import AutompError

SCALE_BITS = 16  # scales are stored as fp16
ADAPTER_BITS = 16  # low-rank corrections (A, B) are stored as fp16
INT_BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)

# QLoRA's NormalFloat-4 levels (quantiles of N(0,1), normalised to [-1, 1], exact zero).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 e2m1 magnitudes; code = sign bit * 8 + magnitude index (OCP MX layout).
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# GGUF type (lower case) -> (nominal code bits, sub-block length its scales apply to)
GGUF_TYPES = {
    "q2_k": (2, 16), "q3_k": (3, 16), "q4_k": (4, 32), "q5_k": (5, 32), "q6_k": (6, 16),
    "q8_0": (8, 32), "q4_0": (4, 32), "iq4_nl": (4, 32),
}  # fmt: skip
# What llama-quantize stores instead when a row is not a multiple of the block (src/llama-quant.cpp,
# tensor_type_fallback); 32-block types, and fallbacks that do not fit either, become F16.
GGUF_FALLBACK = {"q2_k": "Q4_0", "q3_k": "Q4_0", "q4_k": "Q5_0", "q5_k": "Q5_1", "q6_k": "Q8_0"}
GGUF_FALLBACK_BLOCK = 32  # every fallback above is a 32-block type
# Formats with mins (value = d * code - m) rather than a symmetric grid.
GGUF_AFFINE = ("q2_k", "q4_k", "q5_k")

_RANK = re.compile(r"^(?P<base>.+?)\+r(?P<rank>.*)$")
_NAME = re.compile(r"^(?:w(?P<bits>\d+)(?:g(?P<g>\d+))?(?P<asym>a)?|(?P<cb>nf4|fp4)g(?P<cbg>\d+))$")


@dataclass(frozen=True)
class Format:
    """One weight format. ``group_size=None`` means one group per output row (per-channel)."""

    name: str
    kind: str  # "int", "nf4", "fp4", "float" or "gguf"
    bits: int
    group_size: int | None = None
    symmetric: bool = True
    rank: int = 0  # rank of the low-rank error correction stored beside the weight (0: none)

    @property
    def quantized(self) -> bool:
        return self.kind != "float"

    @property
    def base(self) -> Format:
        """The format without its low-rank correction (itself when it has none)."""
        return get_format(self.name.split("+", 1)[0]) if self.rank else self

    def group(self, in_features: int) -> int:
        """The group length along the input dimension for a layer with ``in_features`` inputs."""
        return self.group_size or in_features

    @property
    def ggml_type(self) -> str | None:
        """The GGML tensor type name ("Q4_K", "F16", ...); None for automp's own int/nf4/fp4 formats."""
        if self.rank:
            return self.base.ggml_type
        if self.kind == "gguf":
            return self.name.upper()
        return {"fp16": "F16", "bf16": "BF16"}.get(self.name)

    @property
    def block_size(self) -> int:
        """Weights per GGUF block along a row (gguf formats only)."""
        return _gguf_sizes(self.ggml_type)[0]

    @property
    def type_size(self) -> int:
        """Bytes per GGUF block (gguf formats only)."""
        return _gguf_sizes(self.ggml_type)[1]

    def check_shape(self, out_features: int, in_features: int) -> None:
        if self.rank > min(out_features, in_features):
            raise AutompError(
                f"format {self.name}: rank {self.rank} exceeds the layer's smaller dimension "
                f"({out_features} x {in_features}); use a rank of at most {min(out_features, in_features)}"
            )
        if self.rank:
            return self.base.check_shape(out_features, in_features)
        if self.kind == "gguf":
            self._check_gguf_row(in_features)
        elif self.quantized and in_features % self.group(in_features):
            raise AutompError(
                f"format {self.name}: input dimension {in_features} is not divisible by the "
                f"group size {self.group_size}; choose a group size that divides it or a per-channel format"
            )

    def _check_gguf_row(self, in_features: int) -> None:
        if in_features % self.block_size == 0:
            return
        fallback = GGUF_FALLBACK.get(self.name)
        if fallback is None or in_features % GGUF_FALLBACK_BLOCK:
            fallback = "F16"
        fits_32 = in_features % GGUF_FALLBACK_BLOCK == 0
        advice = "q8_0, q4_0 or iq4_nl (blocks of 32) or fp16" if fits_32 else "fp16 or a per-channel automp format"
        raise AutompError(
            f"format {self.name}: row length {in_features} is not a multiple of {self.ggml_type}'s block of "
            f"{self.block_size} weights; llama.cpp's llama-quantize would store this tensor as {fallback} instead. "
            f"Choose {advice} for this layer"
        )

    def check_weight(self, weight: torch.Tensor) -> None:
        """Shape divisible by the group size, and every value finite."""
        self.check_shape(*weight.shape)
        if not torch.isfinite(weight).all():
            raise AutompError(f"format {self.name}: the weight contains NaN or Inf values")

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact stored bits of an ``out_features x in_features`` weight: codes + scales + zeros, plus the
        low-rank correction's ``A`` and ``B``."""
        if not self.quantized:
            return self.bits * out_features * in_features
        self.check_shape(out_features, in_features)
        if self.rank:
            return self.base.storage_bits(out_features, in_features) + self.correction_bits(out_features, in_features)
        if self.kind == "gguf":
            return out_features * (in_features // self.block_size) * self.type_size * 8
        groups = out_features * (in_features // self.group(in_features))
        zero_bits = 0 if self.symmetric else self.bits
        return self.bits * out_features * in_features + groups * (SCALE_BITS + zero_bits)

    def correction_bits(self, out_features: int, in_features: int) -> int:
        """Stored bits of the low-rank correction alone: ``rank * (in + out)`` fp16 values."""
        return self.rank * (in_features + out_features) * ADAPTER_BITS

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.storage_bits(out_features, in_features) / (out_features * in_features)

    @property
    def levels(self) -> torch.Tensor | None:
        """Codebook values indexed by code (codebook formats only)."""
        return _codebook(self.kind)


@cache
def _codebook(kind: str) -> torch.Tensor | None:
    if kind == "nf4":
        return torch.tensor(NF4_LEVELS)
    if kind == "fp4":
        mags = torch.tensor(FP4_MAGNITUDES)
        return torch.cat([mags, -mags])
    return None


@cache
def _gguf_sizes(ggml_type: str | None) -> tuple[int, int]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if ggml_type is None or ggml_type.lower() not in GGUF_TYPES:
        raise AutompError(f"{ggml_type} is not a GGUF quantized format")
    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]


@cache
def get_format(name: str) -> Format:
    """Parse a format name; raises AutompError listing the valid names."""
    key = name.strip().lower()
    if m := _RANK.match(key):
        return _with_rank(get_format(m["base"]), m["rank"], name)
    if key in ("fp16", "bf16"):
        return Format(key, "float", 16)
    if key in GGUF_TYPES:
        bits, sub_block = GGUF_TYPES[key]
        return Format(key, "gguf", bits, sub_block, symmetric=key not in GGUF_AFFINE)
    m = _NAME.match(key)
    if m and m["cb"]:
        group = int(m["cbg"])
        if group in GROUP_SIZES:
            return Format(key, m["cb"], 4, group)
    elif m:
        bits, group = int(m["bits"]), (int(m["g"]) if m["g"] else None)
        if bits in INT_BITS and (group is None or group in GROUP_SIZES):
            return Format(key, "int", bits, group, symmetric=not m["asym"])
    raise AutompError(
        f"unknown format {name!r}: use w{{2,3,4,8}} (per-channel), w{{b}}g{{32,64,128}} (group-wise), "
        "an 'a' suffix for asymmetric (w4g128a), nf4g64, fp4g32, fp16, bf16, or a GGUF (llama.cpp) type: "
        "q2_k, q3_k, q4_k, q5_k, q6_k, q8_0, q4_0, iq4_nl"
    )


def _with_rank(base: Format, rank: str, name: str) -> Format:
    if not base.quantized:
        raise AutompError(f"format {name!r}: a low-rank correction repairs quantization error; {base.name} has none")
    if not rank.isdigit() or int(rank) == 0:
        raise AutompError(f"format {name!r}: the rank after '+r' must be a positive integer, e.g. {base.name}+r16")
    return Format(f"{base.name}+r{int(rank)}", base.kind, base.bits, base.group_size, base.symmetric, int(rank))


def with_ranks(formats: list[Format], ranks: list[int]) -> list[Format]:
    """``formats`` plus, for every quantized format without a rank, one ``+rN`` option per positive rank
    (``--ranks 0,4,8``: rank 0 keeps the plain formats)."""
    for rank in ranks:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise AutompError(f"rank {rank!r}: ranks must be non-negative integers (0 keeps the plain formats)")
    extra = [get_format(f"{fmt.name}+r{r}") for fmt in formats if fmt.quantized and not fmt.rank for r in ranks if r]
    return list(dict.fromkeys(formats + extra))


def parse_formats(spec: str) -> list[Format]:
    """A comma-separated list of format names, e.g. ``w2g64,w3g128,w4g128,fp16``."""
    formats = [get_format(name) for name in spec.split(",") if name.strip()]
    if not formats:
        raise AutompError("no formats given")
    return formats


# --------------------------------------------------------------------------------------------
# The quantization grid. ``w`` has shape (rows, n); ``scale``/``zero`` broadcast against it
# (one value per row for a whole group, or per row of a single column inside GPTQ).


@dataclass
class GroupParams:
    scale: torch.Tensor  # fp32 values that are exactly representable in fp16
    zero: torch.Tensor | None  # asymmetric integer formats only (float holding an integer)


def fit_params(fmt: Format, w: torch.Tensor) -> GroupParams:
    """Round-to-nearest parameters for each row of ``w`` (one group per row): absmax or min/max."""
    w = w.float()
    if fmt.kind == "int" and not fmt.symmetric:
        maxq = 2**fmt.bits - 1
        lo = w.amin(dim=-1).clamp(max=0)
        hi = w.amax(dim=-1).clamp(min=0)
        scale = _fp16_exact((hi - lo) / maxq)
        zero = torch.round(-lo / scale).clamp(0, maxq)
        return GroupParams(scale, zero)
    absmax = w.abs().amax(dim=-1)
    if fmt.kind == "int":
        # (2^b - 1)/2 half-steps: the grid -2^(b-1)..2^(b-1)-1 reaches -absmax exactly (GPTQ's and
        # compressed-tensors' symmetric convention)
        scale = absmax / ((2**fmt.bits - 1) / 2)
    else:
        scale = absmax / fmt.levels.abs().max()
    return GroupParams(_fp16_exact(scale), None)


def _fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    # a zero scale (all-zero group) would divide by zero; any positive scale encodes zeros exactly
    return scale.clamp(min=1e-6).half().float()


def encode(fmt: Format, w: torch.Tensor, p: GroupParams) -> torch.Tensor:
    """Nearest codes (int64) of ``w`` under ``p``."""
    scale = p.scale.unsqueeze(-1)
    if fmt.kind == "int":
        zero = p.zero.unsqueeze(-1) if p.zero is not None else 2 ** (fmt.bits - 1)
        return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**fmt.bits - 1).long()
    levels = fmt.levels.to(w.device)
    order = torch.argsort(levels)
    sorted_levels = levels[order]
    midpoints = (sorted_levels[1:] + sorted_levels[:-1]) / 2
    return order[torch.bucketize((w.float() / scale).contiguous(), midpoints)]


def decode(fmt: Format, codes: torch.Tensor, p: GroupParams) -> torch.Tensor:
    scale = p.scale.unsqueeze(-1)
    if fmt.kind == "int":
        zero = p.zero.unsqueeze(-1) if p.zero is not None else 2 ** (fmt.bits - 1)
        return (codes.float() - zero) * scale
    return fmt.levels.to(codes.device)[codes] * scale


def quantize_dequantize(fmt: Format, w: torch.Tensor, p: GroupParams) -> torch.Tensor:
    return decode(fmt, encode(fmt, w, p), p)
