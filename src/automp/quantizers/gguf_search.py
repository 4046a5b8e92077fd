"""llama.cpp's scale searches (``ggml/src/ggml-quants.c``), vectorized over every block of a tensor.

Each function is the C function of the same name, in its notation, with one change of layout: ``x``
has shape ``(n, *batch)``, so ``x[i]`` is element ``i`` of every block at once and a C loop
``for (int i = 0; i < n; ++i)`` becomes a Python loop over ``n`` (16 or 32) whose body is one numpy
operation over all blocks. Per-block scalars have shape ``batch``.

Byte identity with llama.cpp needs float32 arithmetic evaluated exactly as the C code does (ggml-base
is built with SSE and without ``-ffast-math`` or FMA contraction):

* every product and sum is a float32 numpy operation, in C's left-to-right order (``w*x*l`` is
  ``(w*x)*l``, integers converted to float first);
* sums accumulate sequentially from ``0.0f`` (:func:`fsum`), never pairwise as ``np.sum`` does;
* ``nearest_int`` is ggml's bit trick itself (round half to even for ``|v| < 2**22``);
* a C loop that stops early when no element changed is run for all its passes: a pass that changes
  nothing leaves the state as it was, so every later pass changes nothing either;
* stores into ``uint8_t`` arrays wrap modulo 256, as C's do.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
# IQ4_NL's non-linear levels (kvalues_iq4nl in ggml-common.h)
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


def nearest_int(fval: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: add 1.5 * 2**23 in float32 and read the mantissa (int32)."""
    val = (np.asarray(fval, dtype=F32) + F32(12582912.0)).view(np.int32)
    return (val & 0x007FFFFF) - 0x00400000


def fsum(terms: np.ndarray) -> np.ndarray:
    """``float s = 0; for (i...) s += terms[i];`` over axis 0, in float32 and in order."""
    s = np.zeros(terms.shape[1:], dtype=F32)
    for term in terms:
        s += term
    return s


def fsum_from_first(terms: np.ndarray) -> np.ndarray:
    """``float s = terms[0]; for (i = 1...) s += terms[i];`` (keeps the sign of a lone -0.0)."""
    s = terms[0].copy()
    for term in terms[1:]:
        s += term
    return s


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }``: the first largest magnitude."""
    i = np.abs(x).argmax(axis=0)
    max_ = np.take_along_axis(x, i[None], axis=0)[0]
    return np.abs(max_), max_


def _f(l: np.ndarray) -> np.ndarray:
    return l.astype(F32)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b`` where the caller masks out the lanes with ``b == 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return a / b


def _safe(max_: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """A divisor for all-zero blocks (masked out later) that keeps warnings away."""
    return np.where(zero, F32(1), max_)


def make_qx_quants(nmax: int, x: np.ndarray, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric scale search over 19 candidate
    ``iscale``s, weighted by ``qw`` or ``x*x``. Returns (scale, L) with ``L`` in ``[0, 2*nmax)``."""
    amax, max_ = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    max_ = _safe(max_, zero)
    w = qw if qw is not None else x * x

    def trial(iscale):
        l = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        return l, fsum(w * x * _f(l)), fsum(w * _f(l) * _f(l))

    l, sumlx, suml2 = trial(F32(-nmax) / max_)
    L = l + nmax
    scale = np.where(suml2 != 0, _div(sumlx, suml2), F32(0))
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        l, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(is_)) / max_)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, l + nmax, L)
        scale = np.where(better, _div(sumlx, suml2), scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, F32(0), scale), np.where(zero, 0, L)


def make_q3_quants(nmax: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: nearest codes, then up to 5 passes of
    coordinate descent on ``(sum w x l)^2 / sum w l^2`` with ``w = x*x``. Returns (scale, L in [0, 2*nmax))."""
    amax, max_ = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    iscale = F32(-nmax) / _safe(max_, zero)
    L = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = fsum(w * x * _f(L)), fsum(w * _f(L) * _f(L))
    for _itry in range(5):
        for i in range(len(x)):
            Li = _f(L[i])
            slx = sumlx - w[i] * x[i] * Li
            sl2 = suml2 - w[i] * Li * Li
            new_l = np.clip(nearest_int(_div(x[i] * sl2, slx)), -nmax, nmax - 1)
            nl = _f(new_l)
            slx_new = slx + w[i] * x[i] * nl
            sl2_new = sl2 + w[i] * nl * nl
            accept = (slx > 0) & (new_l != L[i]) & (sl2_new > 0)
            accept &= slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new
            L[i] = np.where(accept, new_l, L[i])
            sumlx = np.where(accept, slx_new, sumlx)
            suml2 = np.where(accept, sl2_new, suml2)
    scale = np.where(suml2 > 0, _div(sumlx, suml2), F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, L + nmax)


def make_qkx2_quants(
    nmax: int, x: np.ndarray, weights: np.ndarray, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` (and ``make_qkx3_quants`` with weights, which computes the same): an affine
    grid ``scale * L - the_min`` with ``L`` in ``[0, nmax]``, the best weighted least-squares fit over
    ``nstep + 1`` candidate ranges. Returns (scale, the_min, L)."""
    min_ = np.minimum(x.min(axis=0), F32(0))  # if (min > 0) min = 0
    max_ = x.max(axis=0)
    sum_w = fsum_from_first(weights)
    sum_x = fsum_from_first(weights * x)
    flat = max_ == min_
    ones = F32(1)

    def error(scale, min_, L):
        diff = scale * _f(L) + min_ - x
        return fsum(weights * (np.abs(diff) if use_mad else diff * diff))

    iscale = F32(nmax) / np.where(flat, ones, max_ - min_)
    scale = F32(1) / iscale
    L = np.clip(nearest_int(iscale * (x - min_)), 0, nmax)
    best_error = error(scale, min_, L)
    for is_ in range(nstep + 1):
        # min is the best fit's so far: later candidates scale the range it leaves
        iscale = (F32(rmin) + F32(rdelta) * F32(is_) + F32(nmax)) / np.where(flat, ones, max_ - min_)
        l = np.clip(nearest_int(iscale * (x - min_)), 0, nmax)
        lf = _f(l)
        sum_l, sum_l2, sum_xl = fsum(weights * lf), fsum(weights * lf * lf), fsum(weights * lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        positive = this_min > 0
        this_min = np.where(positive, F32(0), this_min)
        this_scale = np.where(positive, _div(sum_xl, sum_l2), this_scale)
        cur_error = error(this_scale, this_min, l)
        better = (D > 0) & (cur_error < best_error) & ~flat
        L = np.where(better, l, L)
        best_error = np.where(better, cur_error, best_error)
        scale = np.where(better, this_scale, scale)
        min_ = np.where(better, this_min, min_)
    return np.where(flat, F32(0), scale), -min_, np.where(flat, 0, L)


def make_qp_quants(nmax: int, x: np.ndarray, quant_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants``: a non-negative scale for non-negative ``x`` (the sub-block scales or mins of
    a super-block), searched over 9 candidates then refined by coordinate descent. Returns (scale, L)
    with ``L`` the stored ``uint8_t`` codes."""
    max_ = np.zeros(x.shape[1:], dtype=F32)
    for xi in x:
        max_ = np.where(max_ > xi, max_, xi)  # MAX(max, x[i])
    zero = max_ < GROUP_MAX_EPS
    max_ = _safe(max_, zero)
    w = quant_weights

    iscale = F32(nmax) / max_
    L = nearest_int(iscale * x) & 0xFF
    scale = F32(1) / iscale
    diff = x - scale * _f(L)
    best_mse = fsum(w * diff * diff)
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (F32(0.1) * F32(is_) + F32(nmax)) / max_
        scale_is = F32(1) / iscale_is
        l = np.minimum(nmax, nearest_int(iscale_is * x))
        diff = x - scale_is * _f(l)
        mse = fsum(w * diff * diff)
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        iscale = np.where(better, iscale_is, iscale)
    l = np.minimum(nmax, nearest_int(iscale * x))
    L = l & 0xFF
    sumlx, suml2 = fsum(w * x * _f(l)), fsum(w * _f(l) * _f(l))
    for _itry in range(5):
        for i in range(len(x)):
            Li = _f(L[i])
            slx = sumlx - w[i] * x[i] * Li
            sl2 = suml2 - w[i] * Li * Li
            new_l = np.minimum(nmax, nearest_int(_div(x[i] * sl2, slx)))
            nl = _f(new_l)
            slx_new = slx + w[i] * x[i] * nl
            sl2_new = sl2 + w[i] * nl * nl
            accept = (slx > 0) & (sl2 > 0) & (new_l != L[i])
            accept &= slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new
            L[i] = np.where(accept, new_l & 0xFF, L[i])
            sumlx = np.where(accept, slx_new, sumlx)
            suml2 = np.where(accept, sl2_new, suml2)
    scale = np.where(suml2 > 0, _div(sumlx, suml2), F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, L)


def best_index_int8(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``best_index_int8``: the index of the level nearest ``x`` (ties to the upper level), as the C
    binary search computes it, including its float32 distance comparison."""
    val = values.astype(F32)
    mu = np.clip(np.searchsorted(val, x, side="right"), 1, len(val) - 1)
    lower = mu - (x - val[mu - 1] < val[mu] - x)
    return np.where(x <= val[0], 0, np.where(x >= val[-1], len(val) - 1, lower))


def iq4_nl_search(x: np.ndarray, weight: np.ndarray, ntry: int = 7) -> np.ndarray:
    """The scale search of ``quantize_row_iq4_nl_impl`` for IQ4_NL (one block of 32 = the super-block):
    start from ``d = max / 127`` and try ``2 * ntry + 1`` more ``id = (itry - 127) / max``. Returns
    the float32 scale ``d`` (the codes follow from it: ``best_index_int8(id * x)``)."""
    values = KVALUES_IQ4NL
    amax, max_ = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    max_ = _safe(max_, zero)
    v0 = F32(values[0])

    def sums(id_):
        q = values.astype(F32)[best_index_int8(values, id_ * x)]
        return fsum(weight * q * x), fsum(weight * q * q)

    d = -max_ / v0 if ntry > 0 else max_ / v0
    sumqx, sumq2 = sums(F32(1) / d)
    d = np.where(sumq2 > 0, _div(sumqx, sumq2), F32(0))
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = sums(F32(itry + int(values[0])) / max_)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, _div(sumqx, sumq2), d)
        best = np.where(better, d * sumqx, best)
    return np.where(zero, F32(0), d)
