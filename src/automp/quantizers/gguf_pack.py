"""GGUF block layouts (``ggml/src/ggml-common.h``): fields <-> the bytes llama.cpp stores, and decoding.

:class:`Fields` holds one GGUF type's blocks unpacked: the codes ``q`` one per weight, in order, and
the block's scale fields as the C struct stores them. Packing places them in the struct's byte order,
so ``pack`` / ``unpack`` are exact inverses, and :func:`dequantize_fields` computes the values in
float32 in the same order as ggml's ``dequantize_row_*`` (and gguf-py's ``dequantize``).

=======  =====  ====================================================================================
type     bytes  layout (``q``: codes; ``d``/``dmin``: fp16) and value of code ``q`` in sub-block ``j``
=======  =====  ====================================================================================
Q2_K     84     scales[16] (low nibble scale, high nibble min), qs[64] (2 bit), d, dmin.
                ``d*(scales[j] & 15) * q - dmin*(scales[j] >> 4)``, ``q`` in 0..3, sub-blocks of 16
Q3_K     110    hmask[32] (bit 3), qs[64] (bits 1-2), scales[12] (16 x 6 bit, stored +32), d.
                ``d*(scales[j] - 32) * (q - 4)``, ``q`` in 0..7, sub-blocks of 16
Q4_K     144    d, dmin, scales[12] (8 scales + 8 mins, 6 bit), qs[128]. ``d*sc[j] * q - dmin*m[j]``,
                ``q`` in 0..15, sub-blocks of 32
Q5_K     176    as Q4_K plus qh[32] (bit 5) before qs. ``q`` in 0..31
Q6_K     210    ql[128] (low 4 bit), qh[64] (high 2 bit), scales[16] (int8), d.
                ``d*scales[j] * (q - 32)``, ``q`` in 0..63, sub-blocks of 16
Q8_0     34     d, qs[32] (int8). ``d * q``, ``q`` in -128..127
Q4_0     18     d, qs[16]. ``d * (q - 8)``, ``q`` in 0..15
IQ4_NL   18     d, qs[16]. ``d * kvalues_iq4nl[q]``, ``q`` in 0..15
=======  =====  ====================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass
class Fields:
    """One GGUF type's blocks unpacked; ``S`` blocks (torch tensors)."""

    q: torch.Tensor  # (S, block_size) codes (int64)
    d: torch.Tensor  # (S,) float16 super-block (or block) scale
    dmin: torch.Tensor | None = None  # (S,) float16, Q2_K/Q4_K/Q5_K
    scales: torch.Tensor | None = None  # (S, sub-blocks): Q2_K bytes, Q3_K 6-bit (+32), Q4_K/Q5_K 6-bit, Q6_K int8
    mins: torch.Tensor | None = None  # (S, 8) Q4_K/Q5_K 6-bit mins


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x.long() & 0xFF).to(torch.uint8)


def _half_bytes(h: torch.Tensor) -> torch.Tensor:
    return h.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _half(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1)


def _bits(x: torch.Tensor, shifts: list[int], dim: int) -> torch.Tensor:
    """OR the slices of ``x`` along ``dim``, each shifted left by its entry of ``shifts``."""
    out = torch.zeros_like(x.select(dim, 0))
    for k, shift in enumerate(shifts):
        out = out | (x.select(dim, k) << shift)
    return out


def _unbits(x: torch.Tensor, shifts: list[int], width: int, dim: int) -> torch.Tensor:
    return torch.stack([(x >> shift) & ((1 << width) - 1) for shift in shifts], dim=dim)


# ---- Q2_K / Q3_K: 2-bit planes, four 32-weight rows per byte row ------------------------------


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6, j = 0, 128."""
    return _bits(L.reshape(-1, 2, 4, 32), [0, 2, 4, 6], dim=2).reshape(-1, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    return _unbits(qs.long().reshape(-1, 2, 32), [0, 2, 4, 6], 2, dim=2).reshape(-1, 256)


def pack_q2_k(f: Fields) -> torch.Tensor:
    return torch.cat([_u8(f.scales), _u8(_pack_2bit(f.q.long())), _half_bytes(f.d), _half_bytes(f.dmin)], dim=1)


def unpack_q2_k(b: torch.Tensor) -> Fields:
    return Fields(_unpack_2bit(b[:, 16:80]), _half(b[:, 80:82]), _half(b[:, 82:84]), scales=b[:, :16].long())


def _pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """16 six-bit values into 12 bytes: low nibbles of 0-7 and 8-15, then 2 high bits x 4 per byte."""
    low = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    high = _bits((l >> 4).reshape(-1, 4, 4), [0, 2, 4, 6], dim=1)  # byte 8 + j%4, shift 2 * (j/4)
    return torch.cat([low, high], dim=1)


def _unpack_q3_scales(s: torch.Tensor) -> torch.Tensor:
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    high = _unbits(s[:, 8:], [0, 2, 4, 6], 2, dim=1).reshape(-1, 16)
    return low | (high << 4)


def pack_q3_k(f: Fields) -> torch.Tensor:
    L = f.q.long()
    hmask = _bits((L >> 2).reshape(-1, 8, 32), list(range(8)), dim=1)  # bit j/32 of hmask[j%32]
    parts = [hmask, _pack_2bit(L & 3), _pack_q3_scales(f.scales.long())]
    return torch.cat([_u8(p) for p in parts] + [_half_bytes(f.d)], dim=1)


def unpack_q3_k(b: torch.Tensor) -> Fields:
    high = _unbits(b[:, :32].long(), list(range(8)), 1, dim=1).reshape(-1, 256)
    q = _unpack_2bit(b[:, 32:96]) | (high << 2)
    return Fields(q, _half(b[:, 108:110]), scales=_unpack_q3_scales(b[:, 96:108].long()))


# ---- Q4_K / Q5_K: 6-bit scales and mins in 12 bytes, nibbles 32 apart ------------------------


def pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The C packing loop of quantize_row_q4_K (uint8 arithmetic, so out-of-range values wrap alike)."""
    ls, lm = ls.long() & 0xFF, lm.long() & 0xFF
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return _u8(torch.cat([first, second, third], dim=1))


def get_scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, mins), each (S, 8), from the 12 packed bytes."""
    s = s.long()
    sc = torch.cat([s[:, :4] & 63, (s[:, 8:] & 0xF) | ((s[:, :4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def _pack_nibbles_64(L: torch.Tensor) -> torch.Tensor:
    """q[32c + l] = L[64c + l] | L[64c + l + 32] << 4."""
    return _bits(L.reshape(-1, 4, 2, 32), [0, 4], dim=2).reshape(-1, 128)


def _unpack_nibbles_64(qs: torch.Tensor) -> torch.Tensor:
    return _unbits(qs.long().reshape(-1, 4, 32), [0, 4], 4, dim=2).reshape(-1, 256)


def pack_q4_k(f: Fields) -> torch.Tensor:
    head = [_half_bytes(f.d), _half_bytes(f.dmin), pack_scale_min_k4(f.scales, f.mins)]
    return torch.cat(head + [_u8(_pack_nibbles_64(f.q.long()))], dim=1)


def unpack_q4_k(b: torch.Tensor) -> Fields:
    sc, m = get_scale_min_k4(b[:, 4:16])
    return Fields(_unpack_nibbles_64(b[:, 16:144]), _half(b[:, :2]), _half(b[:, 2:4]), sc, m)


def pack_q5_k(f: Fields) -> torch.Tensor:
    L = f.q.long()
    qh = _bits((L >> 4).reshape(-1, 8, 32), list(range(8)), dim=1)  # bit 2c + h for L[64c + 32h + j]
    head = [_half_bytes(f.d), _half_bytes(f.dmin), pack_scale_min_k4(f.scales, f.mins)]
    return torch.cat(head + [_u8(qh), _u8(_pack_nibbles_64(L & 0xF))], dim=1)


def unpack_q5_k(b: torch.Tensor) -> Fields:
    sc, m = get_scale_min_k4(b[:, 4:16])
    high = _unbits(b[:, 16:48].long(), list(range(8)), 1, dim=1).reshape(-1, 256)
    q = _unpack_nibbles_64(b[:, 48:176]) | (high << 4)
    return Fields(q, _half(b[:, :2]), _half(b[:, 2:4]), sc, m)


# ---- Q6_K ----------------------------------------------------------------------------------------


def pack_q6_k(f: Fields) -> torch.Tensor:
    L = f.q.long().reshape(-1, 2, 4, 32)  # [half of 128, quarter k, l]: weight 128c + 32k + l
    ql = (L[:, :, :2] & 0xF) | ((L[:, :, 2:] & 0xF) << 4)  # ql[64c + 32h + l]: quarters h and h + 2
    qh = _bits(L >> 4, [0, 2, 4, 6], dim=2)  # qh[32c + l]
    parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), f.scales.long()]
    return torch.cat([_u8(p) for p in parts] + [_half_bytes(f.d)], dim=1)


def unpack_q6_k(b: torch.Tensor) -> Fields:
    ql = b[:, :128].long().reshape(-1, 2, 2, 32)
    low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # quarters 0, 1 from the low nibbles, 2, 3 from the high
    high = _unbits(b[:, 128:192].long().reshape(-1, 2, 32), [0, 2, 4, 6], 2, dim=2)
    q = (low | (high << 4)).reshape(-1, 256)
    return Fields(q, _half(b[:, 208:210]), scales=b[:, 192:208].contiguous().view(torch.int8).long())


# ---- 32-weight blocks ---------------------------------------------------------------------------


def pack_q8_0(f: Fields) -> torch.Tensor:
    return torch.cat([_half_bytes(f.d), _u8(f.q)], dim=1)


def unpack_q8_0(b: torch.Tensor) -> Fields:
    return Fields(b[:, 2:34].contiguous().view(torch.int8).long(), _half(b[:, :2]))


def pack_q4_0(f: Fields) -> torch.Tensor:
    """Also IQ4_NL: qs[j] = L[j] | L[j + 16] << 4."""
    return torch.cat([_half_bytes(f.d), _u8(_bits(f.q.long().reshape(-1, 2, 16), [0, 4], dim=1))], dim=1)


def unpack_q4_0(b: torch.Tensor) -> Fields:
    return Fields(_unbits(b[:, 2:18].long(), [0, 4], 4, dim=1).reshape(-1, 32), _half(b[:, :2]))


PACK = {"Q2_K": pack_q2_k, "Q3_K": pack_q3_k, "Q4_K": pack_q4_k, "Q5_K": pack_q5_k, "Q6_K": pack_q6_k,
        "Q8_0": pack_q8_0, "Q4_0": pack_q4_0, "IQ4_NL": pack_q4_0}  # fmt: skip
UNPACK = {"Q2_K": unpack_q2_k, "Q3_K": unpack_q3_k, "Q4_K": unpack_q4_k, "Q5_K": unpack_q5_k, "Q6_K": unpack_q6_k,
          "Q8_0": unpack_q8_0, "Q4_0": unpack_q4_0, "IQ4_NL": unpack_q4_0}  # fmt: skip


def pack(ggml_type: str, fields: Fields) -> torch.Tensor:
    """(S, type_size) uint8 blocks."""
    return PACK[ggml_type](fields)


def unpack(ggml_type: str, blocks: torch.Tensor) -> Fields:
    """Fields of (S, type_size) uint8 blocks."""
    return UNPACK[ggml_type](blocks)


# ---- values ---------------------------------------------------------------------------------------


def sub_block_grid(ggml_type: str, f: Fields) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per sub-block ``(dl, ml, levels)``: the value of code ``q`` is ``dl * levels[q] - ml`` (``ml`` None:
    no min), evaluated in float32 as ggml's dequantize_row_* evaluates it. ``dl``/``ml``: (S, sub-blocks)."""
    d = f.d.float()[:, None]
    if ggml_type in ("Q2_K", "Q4_K", "Q5_K"):
        sc, m = (f.scales & 0xF, f.scales >> 4) if ggml_type == "Q2_K" else (f.scales, f.mins)
        nmax = {"Q2_K": 3, "Q4_K": 15, "Q5_K": 31}[ggml_type]
        return d * sc.float(), f.dmin.float()[:, None] * m.float(), torch.arange(nmax + 1, dtype=torch.float32)
    if ggml_type == "Q3_K":
        return d * (f.scales - 32).float(), None, torch.arange(-4, 4, dtype=torch.float32)
    if ggml_type == "Q6_K":
        return d * f.scales.float(), None, torch.arange(-32, 32, dtype=torch.float32)
    if ggml_type == "Q8_0":
        return d, None, torch.arange(-128, 128, dtype=torch.float32)
    if ggml_type == "Q4_0":
        return d, None, torch.arange(-8, 8, dtype=torch.float32)
    return d, None, torch.tensor(KVALUES_IQ4NL, dtype=torch.float32)


def code_offset(ggml_type: str) -> int:
    """``levels[code - offset]`` is the level of a stored code (Q8_0's codes are signed)."""
    return -128 if ggml_type == "Q8_0" else 0


def dequantize_fields(ggml_type: str, f: Fields) -> torch.Tensor:
    """(S, block_size) float32 values."""
    dl, ml, levels = sub_block_grid(ggml_type, f)
    S, n = f.q.shape
    sub = dl.shape[1]
    level = levels.to(f.q.device)[f.q - code_offset(ggml_type)].reshape(S, sub, n // sub)
    values = dl[:, :, None] * level
    if ml is not None:
        values = values - ml[:, :, None]
    return values.reshape(S, n)
