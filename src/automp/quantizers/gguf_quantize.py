"""llama.cpp's quantizers for GGUF types, ported from ``ggml/src/ggml-quants.c``, and the fixed GGUF
grid that GPTQ rounds on.

:func:`quantize_gguf` produces what ``ggml_quantize_chunk(type, x, dst, 0, rows, cols, imatrix)``
produces: without an importance matrix the reference quantizers (``quantize_row_q4_K_ref`` ...), with
one the ``quantize_row_*_impl`` paths that weight every error by ``imatrix[col] * sqrt(sigma2 + x^2)``
(Q6_K by ``imatrix`` alone; Q8_0 ignores it, as llama.cpp does). The importance matrix is llama.cpp's:
the mean of squared activations per input column, i.e. ``diag(X^T X / n)``.

Each ``_q*`` function below is one C function, over all blocks at once (``gguf_search.py`` explains
the layout and the float32 rules that make the bytes identical). Sub-block arrays have shape
``(g, n_sub, S)`` (element, sub-block, super-block), per-sub-block values ``(n_sub, S)`` and
per-super-block values ``(S,)``. Each returns the blocks' :class:`~automp.quantizers.gguf_pack.Fields`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from automp.formats import Format
from automp.quantizers import gguf_pack
from automp.quantizers.gguf_pack import Fields, get_scale_min_k4, pack_scale_min_k4
from automp.quantizers.gguf_search import (
    F32,
    GROUP_MAX_EPS,
    KVALUES_IQ4NL,
    best_index_int8,
    first_absmax,
    fsum,
    iq4_nl_search,
    make_q3_quants,
    make_qkx2_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
)

CHUNK = 1 << 18  # weights per chunk of rows (bounds the temporaries, keeps them in cache)


def quantize_gguf(fmt: Format, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, cols // block_size * type_size) uint8 GGUF blocks of an (rows, cols) weight."""
    rows, cols = weight.shape
    fmt.check_shape(rows, cols)
    x = weight.detach().float().cpu().numpy()
    qw = None if imatrix is None else imatrix.detach().float().cpu().numpy().reshape(cols)
    step = max(1, CHUNK // cols)
    out = []
    with np.errstate(all="ignore"):  # masked lanes divide by zero; the C code never evaluates them
        for r in range(0, rows, step):
            fields = QUANTIZERS[fmt.ggml_type](np.ascontiguousarray(x[r : r + step]), qw)
            out.append(gguf_pack.pack(fmt.ggml_type, fields).reshape(-1, cols // fmt.block_size * fmt.type_size))
    return torch.cat(out)


# ---- layout helpers ----------------------------------------------------------------------------


def _sub_blocks(x: np.ndarray, g: int) -> np.ndarray:
    """(rows, cols) -> (g, 256 // g, S): element ``l`` of sub-block ``j`` of super-block ``i``."""
    return np.ascontiguousarray(x.reshape(-1, 256 // g, g).transpose(2, 1, 0))


def _codes(L: np.ndarray) -> torch.Tensor:
    """(g, n_sub, S) codes -> (S, 256) in the block's weight order."""
    return torch.from_numpy(np.ascontiguousarray(L.transpose(2, 1, 0)).reshape(L.shape[2], -1).astype(np.int64))


def _imatrix_sub_blocks(qw: np.ndarray, rows: int, g: int) -> np.ndarray:
    return _sub_blocks(np.broadcast_to(qw, (rows, len(qw))), g)


def _sigma2(x: np.ndarray, factor: float) -> np.ndarray:
    """``sumx2 = sum x^2`` over each super-block, in order, then ``factor*sumx2/QK_K`` -> (S,)."""
    sumx2 = fsum(np.ascontiguousarray((x * x).reshape(-1, 256).T))
    return F32(factor) * sumx2 / F32(256) if factor != 1 else sumx2 / F32(256)


def _f16(v: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(v, dtype=F32).astype(np.float16))


def _i8(v: np.ndarray) -> np.ndarray:
    return ((v + 128) & 0xFF) - 128


def _requantize(xs, L, d, sc, dmin=None, m=None, lo=0, hi=15, offset=0):
    """``if (!d) continue; l = nearest_int((x + dm)/d)`` per sub-block, d = fp16(d) * sc (float32)."""
    dq = d.astype(F32)[None] * sc.astype(F32)
    target = xs if dmin is None else xs + (dmin.astype(F32)[None] * m.astype(F32))
    lnew = np.clip(nearest_int(target / dq), lo, hi) + offset
    return np.where(dq != 0, lnew, L)


def _positive_max(v: np.ndarray) -> np.ndarray:
    """``max = 0; if (v[j] > max) max = v[j];``"""
    return np.maximum(v.max(axis=0), F32(0))


# ---- K-quants ----------------------------------------------------------------------------------


def _q2_k(x: np.ndarray, qw: np.ndarray | None) -> Fields:
    xs = _sub_blocks(x, 16)
    if qw is None:  # quantize_row_q2_K_ref
        scales, mins, L = make_qkx2_quants(3, xs, np.abs(xs), -0.5, 0.1, 15, use_mad=True)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        q4scale = F32(15)
        ls = np.where(max_scale > 0, nearest_int(q4scale / max_scale * scales), 0)
        lm = nearest_int(q4scale / max_min * mins)
        byte = np.where(max_min > 0, ls | (lm << 4), ls) & 0xFF
        d = np.where(max_scale > 0, max_scale / q4scale, F32(0)).astype(np.float16)
        dmin = np.where(max_min > 0, max_min / q4scale, F32(0)).astype(np.float16)
    else:  # quantize_row_q2_K_impl
        sigma2 = _sigma2(x, 1)
        weight = _imatrix_sub_blocks(qw, len(x), 16) * np.sqrt(sigma2 + xs * xs)
        sw = fsum(weight)
        scales, mins, L = make_qkx2_quants(3, xs, weight, -0.9, 0.05, 36, use_mad=False)
        dm, Ls = make_qp_quants(15, scales, sw)
        mm, Lm = make_qp_quants(15, mins, sw)
        d, dmin = dm.astype(np.float16), mm.astype(np.float16)
        byte = (Ls | (Lm << 4)) & 0xFF
    L = _requantize(xs, L, d, byte & 0xF, dmin, byte >> 4, 0, 3)
    return Fields(_codes(L), _f16(d), _f16(dmin), scales=torch.from_numpy(byte.T.astype(np.int64)))


def _q3_k(x: np.ndarray, qw: np.ndarray | None) -> Fields:
    xs = _sub_blocks(x, 16)
    if qw is None:  # quantize_row_q3_K_ref
        scales, L = make_q3_quants(4, xs)
        _, max_scale = first_absmax(scales)
        has = max_scale != 0
        iscale = F32(-32) / np.where(has, max_scale, F32(1))
        l = np.clip(_i8(nearest_int(iscale * scales)), -32, 31) + 32
        sc6 = np.where(has, l, 0)
        d = np.where(has, F32(1) / iscale, F32(0)).astype(np.float16)
    else:  # quantize_row_q3_K_impl
        sigma2 = _sigma2(x, 2)
        weight = _imatrix_sub_blocks(qw, len(x), 16) * np.sqrt(sigma2 + xs * xs)
        scales, L = make_qx_quants(4, xs, weight)
        d_block, sc6 = make_qx_quants(32, scales, fsum(weight))
        d = d_block.astype(np.float16)
    L = _requantize(xs, L, d, sc6 - 32, lo=-4, hi=3, offset=4)
    return Fields(_codes(L), _f16(d), scales=torch.from_numpy(sc6.T.astype(np.int64)))


def _q45_k(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> Fields:
    """quantize_row_q4_K_* (nmax 15) and quantize_row_q5_K_* (nmax 31)."""
    xs = _sub_blocks(x, 32)
    if qw is None:  # quantize_row_q{4,5}_K_ref
        av_x = np.sqrt(fsum(xs * xs) / F32(32))
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = make_qkx2_quants(nmax, xs, av_x + np.abs(xs), rmin, 0.1, nstep, use_mad=False)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        Ls = np.minimum(63, nearest_int(inv_scale * scales) & 0xFF)
        Lm = np.minimum(63, nearest_int(inv_min * mins) & 0xFF)
        d, dmin = (max_scale / F32(63)).astype(np.float16), (max_min / F32(63)).astype(np.float16)
    else:  # quantize_row_q{4,5}_K_impl
        sigma2 = _sigma2(x, 2)
        weights = _imatrix_sub_blocks(qw, len(x), 32) * np.sqrt(sigma2 + xs * xs)
        sw = fsum(weights)
        scales, mins, L = make_qkx2_quants(nmax, xs, weights, -0.9, 0.05, 36, use_mad=False)
        d_block, Ls = make_qp_quants(63, scales, sw)
        m_block, Lm = make_qp_quants(63, mins, sw)
        if nmax == 31:
            Ls, Lm = np.minimum(63, Ls), np.minimum(63, Lm)
        d, dmin = d_block.astype(np.float16), m_block.astype(np.float16)
    sc, m = get_scale_min_k4(pack_scale_min_k4(torch.from_numpy(Ls.T), torch.from_numpy(Lm.T)))
    L = _requantize(xs, L, d, sc.numpy().T, dmin, m.numpy().T, 0, nmax)
    return Fields(_codes(L), _f16(d), _f16(dmin), sc, m)


def _q6_k(x: np.ndarray, qw: np.ndarray | None) -> Fields:
    """quantize_row_q6_K_ref, and _impl (weights = imatrix alone)."""
    xs = _sub_blocks(x, 16)
    scales, L = make_qx_quants(32, xs, None if qw is None else _imatrix_sub_blocks(qw, len(x), 16))
    max_abs_scale, max_scale = first_absmax(scales)
    empty = max_abs_scale < GROUP_MAX_EPS  # the whole block is stored as zeros
    iscale = F32(-128) / np.where(empty, F32(1), max_scale)
    d = np.where(empty, F32(0), F32(1) / iscale).astype(np.float16)
    sc = np.where(empty, 0, _i8(np.minimum(127, nearest_int(iscale * scales))))
    L = np.where(empty, 0, _requantize(xs, L, d, sc, lo=-32, hi=31, offset=32))
    return Fields(_codes(L), _f16(d), scales=torch.from_numpy(sc.T.astype(np.int64)))


# ---- 32-weight blocks --------------------------------------------------------------------------


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf (half away from zero), exactly."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) == F32(0.5), t + np.sign(v), np.rint(v))


def _q8_0(x: np.ndarray, qw: np.ndarray | None) -> Fields:
    """quantize_row_q8_0_ref (llama.cpp ignores the importance matrix for Q8_0)."""
    xb = x.reshape(-1, 32)
    d = np.abs(xb).max(axis=1) / F32(127)
    id_ = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    q = _roundf(xb * id_[:, None]).astype(np.int64)
    return Fields(torch.from_numpy(q), _f16(d))


def _q4_0(x: np.ndarray, qw: np.ndarray | None) -> Fields:
    rows, cols = x.shape
    xb = np.ascontiguousarray(x.reshape(-1, 32).T)  # (32, S)
    if qw is None:  # quantize_row_q4_0_ref
        _, max_ = first_absmax(xb)
        d = max_ / F32(-8)
        id_ = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
        L = np.minimum(15, np.trunc(xb * id_ + F32(8.5)).astype(np.int64))
    else:  # quantize_row_q4_0_impl: sigma2 over the whole row
        sigma2 = np.repeat(fsum(np.ascontiguousarray((x * x).T)) / F32(cols), cols // 32)
        weight = np.broadcast_to(qw.reshape(-1, 32).T[:, None, :], (32, rows, cols // 32)).reshape(32, -1)
        d, L = make_qx_quants(8, xb, weight * np.sqrt(sigma2 + xb * xb))
    return Fields(torch.from_numpy(np.ascontiguousarray(L.T).astype(np.int64)), _f16(d))


def _iq4_nl(x: np.ndarray, qw: np.ndarray | None) -> Fields:
    """quantize_iq4_nl (ggml_quantize_chunk calls it with ntry = 7, with or without imatrix)."""
    rows, cols = x.shape
    xb = np.ascontiguousarray(x.reshape(-1, 32).T)  # (32, S)
    if qw is None:
        weight = xb * xb
    else:
        sigma2 = fsum(xb * xb) * (F32(2) / F32(32))
        qwb = np.broadcast_to(qw.reshape(-1, 32).T[:, None, :], (32, rows, cols // 32)).reshape(32, -1)
        weight = qwb * np.sqrt(sigma2 + xb * xb)
    d = iq4_nl_search(xb, weight)
    id_ = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0))
    L = best_index_int8(KVALUES_IQ4NL, id_ * xb)
    return Fields(torch.from_numpy(np.ascontiguousarray(L.T).astype(np.int64)), _f16(d))


QUANTIZERS = {
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": lambda x, qw: _q45_k(x, qw, 15), "Q5_K": lambda x, qw: _q45_k(x, qw, 31),
    "Q6_K": _q6_k, "Q8_0": _q8_0, "Q4_0": _q4_0, "IQ4_NL": _iq4_nl,
}  # fmt: skip


# ---- the fixed grid GPTQ rounds on ---------------------------------------------------------------


@dataclass
class GGUFGrid:
    """Every sub-block's grid ``dl * levels - ml`` of a GGUF-quantized weight, fixed: GPTQ rounds each
    column onto it and :meth:`pack` stores the codes with the grid's own scale fields."""

    fmt: Format
    fields: Fields  # the blocks the grid was fitted as (CPU)
    dl: torch.Tensor  # (rows, cols // group_size) float32
    ml: torch.Tensor | None  # (rows, cols // group_size) float32, K-quants with mins only
    levels: torch.Tensor  # level of each code index, float32 (sorted)

    @classmethod
    def fit(cls, fmt: Format, weight: torch.Tensor, importance: torch.Tensor) -> GGUFGrid:
        """The grid llama.cpp's importance-matrix quantizer picks for ``weight`` (importance = diag(H))."""
        rows, cols = weight.shape
        blocks = quantize_gguf(fmt, weight, importance)
        fields = gguf_pack.unpack(fmt.ggml_type, blocks.reshape(-1, fmt.type_size))
        dl, ml, levels = gguf_pack.sub_block_grid(fmt.ggml_type, fields)
        device = weight.device
        ml = None if ml is None else ml.reshape(rows, -1).to(device)
        return cls(fmt, fields, dl.reshape(rows, -1).to(device), ml, levels.to(device))

    def quantize(self, w: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(value, code index) of column ``col``'s nearest grid point for each row of ``w`` (rows,)."""
        j = col // self.fmt.group_size
        dl = self.dl[:, j]
        target = w if self.ml is None else w + self.ml[:, j]
        zero = dl == 0  # every code decodes to -ml: keep the code nearest level 0
        t = target / torch.where(zero, torch.ones_like(dl), dl)
        if self.fmt.ggml_type == "IQ4_NL":
            index = (t[:, None] > (self.levels[1:] + self.levels[:-1]) / 2).sum(dim=1)  # midpoints below t
        else:
            index = torch.clamp(torch.round(t) - self.levels[0], 0, len(self.levels) - 1).long()
        index = torch.where(zero, self.levels.abs().argmin(), index)
        value = dl * self.levels[index]
        return (value if self.ml is None else value - self.ml[:, j]), index

    def pack(self, index: torch.Tensor) -> torch.Tensor:
        """(rows, cols // block_size * type_size) uint8 blocks: the code indices (rows, cols) on this grid."""
        rows = index.shape[0]
        q = index.cpu().reshape(-1, self.fmt.block_size) + gguf_pack.code_offset(self.fmt.ggml_type)
        f = self.fields
        fields = Fields(q, f.d, f.dmin, f.scales, f.mins)
        return gguf_pack.pack(self.fmt.ggml_type, fields).reshape(rows, -1)
