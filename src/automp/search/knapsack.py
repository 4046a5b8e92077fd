"""The exact allocation: a multiple-choice knapsack.

Every group takes exactly one format; minimise the summed proxy subject to total stored bits <=
budget. Bits stay exact integers throughout. The default algorithm bounds, reduces, then enumerates:

1. Formats that another format of the same group dominates (no fewer bits, no less loss) are
   dropped: an optimum never needs them.
2. The LP relaxation is solved exactly by the classic greedy: walk the segments of every group's
   lower convex hull of (bits, loss), most loss removed per bit first, until the next segment does
   not fit. Its slope there prices a bit, ``price``. Then
   ``lower = sum_g min_f (loss + price * bits) - price * budget`` bounds every allocation's loss from
   below (Lagrangian duality), and the segments taken plus a greedy fill of the unused bits are an
   allocation that fits: ``upper``.
3. With the reduced cost ``rc(g, f) = loss + price * bits - min_f' (loss + price * bits)`` (>= 0),
   every allocation that fits has ``loss >= lower + sum rc``, so an optimum has ``sum rc <= upper -
   lower``. Formats whose reduced cost alone exceeds that gap are dropped. The gap is small, so
   most groups keep one or two formats.
4. What is left is enumerated group by group, keeping only Pareto-optimal partial sums of
   (bits, loss) whose reduced costs still fit in the gap and whose bits leave room for the groups
   still to come. The least loss among the complete sums is the optimum.

A 224-layer x 6-format table (a 32-block Llama) takes about 0.1 s (``bench/solver_speed.py``). If
step 4 ever kept more than ``MAX_STATES`` partial sums, a MILP (HiGHS through ``scipy.optimize.milp``,
zero optimality gap) takes over; ``method="milp"`` asks for it directly. The MILP is exact only up to
HiGHS's floating-point tolerances (on the benchmark table it once returned an allocation 2e-6
relatively worse), and 10-20x slower, hence the fallback role.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from automp.errors import AutompError
from automp.search.grouped import Grouped
from automp.search.problem import Evaluator, Problem, Solution

MAX_STATES = 1_000_000  # partial sums kept in step 4 before the MILP takes over
METHODS = ("auto", "enumerate", "milp")  # auto: enumerate, falling back to the MILP


@dataclass
class _Candidates:
    """Per group, the undominated formats from fewest to most bits, relative to the first (the base)."""

    formats: list[np.ndarray]  # format indices; loss strictly decreases along each
    extra_bits: list[np.ndarray]  # bits above the base format, int64
    extra_loss: list[np.ndarray]  # loss above the base format (<= 0)
    base_bits: int

    @classmethod
    def of(cls, grouped: Grouped) -> _Candidates:
        formats, extra_bits, extra_loss = [], [], []
        for g in range(len(grouped.groups)):
            kept: list[int] = []
            for j in grouped.ladder(g):  # fewest bits first, equal bits by loss
                if not kept or grouped.loss[g, j] < grouped.loss[g, kept[-1]]:
                    kept.append(int(j))
            kept_arr = np.array(kept)
            formats.append(kept_arr)
            extra_bits.append(grouped.bits[g, kept_arr] - grouped.bits[g, kept_arr[0]])
            extra_loss.append(grouped.loss[g, kept_arr] - grouped.loss[g, kept_arr[0]])
        base_bits = int(sum(grouped.bits[g, f[0]] for g, f in enumerate(formats)))
        return cls(formats, extra_bits, extra_loss, base_bits)

    def chosen(self, positions: list[int]) -> np.ndarray:
        return np.array([f[k] for f, k in zip(self.formats, positions, strict=True)])


class Knapsack:
    """Exact: the allocation with the least predicted loss that fits the bits budget."""

    name = "knapsack"

    def __init__(self, method: str = "auto") -> None:
        if method not in METHODS:
            raise AutompError(f"unknown knapsack method {method!r}: use one of {', '.join(METHODS)}")
        self.method = method

    def solve(self, problem: Problem, *, seed: int = 0, evaluator: Evaluator | None = None) -> Solution:
        start = time.perf_counter()
        grouped = Grouped.of(problem)
        grouped.require_feasible()
        cand = _Candidates.of(grouped)
        slack = problem.budget_bits - cand.base_bits  # bits available above every group's cheapest format
        positions = None
        if self.method != "milp":
            positions = _bound_and_enumerate(cand.extra_bits, cand.extra_loss, slack)
            if positions is None and self.method == "enumerate":
                raise AutompError(f"the exact enumeration needed more than {MAX_STATES} partial allocations")
        if positions is None:
            positions = _milp_positions(cand.extra_bits, cand.extra_loss, slack)
        return grouped.solution(cand.chosen(positions), self.name, time.perf_counter() - start)


def _bound_and_enumerate(bits: list[np.ndarray], loss: list[np.ndarray], slack: int) -> list[int] | None:
    """Steps 2-4 on each group's (extra bits, extra loss) ladder; None if step 4 grows too large."""
    position, price = _lp_greedy(bits, loss, slack)
    if price is None:
        return position  # every group's least-loss format fits: nothing to trade
    position = _fill(bits, loss, position, slack)
    value = [lo + price * b for b, lo in zip(bits, loss, strict=True)]
    lower = sum(float(v.min()) for v in value) - price * slack
    upper = sum(float(lo[k]) for lo, k in zip(loss, position, strict=True))
    # rounding slack, so that the upper-bound allocation itself is never pruned
    tol = 1e-9 * (sum(float(np.abs(lo).max()) for lo in loss) + abs(lower))
    limit = upper - lower + tol
    reduced = [v - v.min() for v in value]
    keep = [np.flatnonzero(rc <= limit) for rc in reduced]
    room_after = np.cumsum([0] + [int(b[k].min()) for b, k in zip(bits[::-1], keep[::-1], strict=True)])[::-1]

    sum_bits, sum_loss, sum_rc = np.zeros(1, dtype=np.int64), np.zeros(1), np.zeros(1)
    parents: list[np.ndarray] = []
    options: list[np.ndarray] = []
    for g, k in enumerate(keep):
        count = len(sum_bits)
        new_bits = (sum_bits[:, None] + bits[g][k][None]).ravel()
        new_loss = (sum_loss[:, None] + loss[g][k][None]).ravel()
        new_rc = (sum_rc[:, None] + reduced[g][k][None]).ravel()
        parent, option = np.repeat(np.arange(count), len(k)), np.tile(k, count)
        ok = (new_bits + room_after[g + 1] <= slack) & (new_rc <= limit)
        # Pareto: sorted by bits then loss, keep a partial sum only if it has less loss than every cheaper one
        order = np.flatnonzero(ok)[np.lexsort((new_loss[ok], new_bits[ok]))]
        ordered_loss = new_loss[order]
        best_before = np.minimum.accumulate(ordered_loss)
        order = order[np.r_[True, ordered_loss[1:] < best_before[:-1]]] if order.size else order
        if order.size == 0 or order.size > MAX_STATES:
            return None
        sum_bits, sum_loss, sum_rc = new_bits[order], new_loss[order], new_rc[order]
        parents.append(parent[order])
        options.append(option[order])
    state = int(np.argmin(sum_loss))  # the first minimum: the fewest bits on a tie
    for g in range(len(bits) - 1, -1, -1):
        position[g] = int(options[g][state])
        state = int(parents[g][state])
    return position


def _lp_greedy(bits: list[np.ndarray], loss: list[np.ndarray], slack: int) -> tuple[list[int], float | None]:
    """The LP relaxation's integral part and the price of a bit (None when everything fits)."""
    segments = []  # (-loss removed per bit, group, from, to): sorting puts the most effective first
    for g, (b, lo) in enumerate(zip(bits, loss, strict=True)):
        for start, end in itertools.pairwise(_lower_hull(b, lo)):
            segments.append((float(lo[end] - lo[start]) / float(b[end] - b[start]), g, start, end))
    segments.sort()
    position, used = [0] * len(bits), 0
    for negative_rate, g, start, end in segments:
        step = int(bits[g][end] - bits[g][start])
        if used + step > slack:
            return position, -negative_rate
        position[g], used = end, used + step
    return position, None


def _lower_hull(bits: np.ndarray, loss: np.ndarray) -> list[int]:
    """Positions on the lower convex hull of the points (bits increasing, loss decreasing)."""
    hull: list[int] = []
    for k in range(len(bits)):
        # drop the last point while it lies on or above the line from the one before it to k
        while len(hull) >= 2:
            a, m = hull[-2], hull[-1]
            if (loss[m] - loss[a]) * (bits[k] - bits[a]) >= (loss[k] - loss[a]) * (bits[m] - bits[a]):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def _fill(bits: list[np.ndarray], loss: list[np.ndarray], position: list[int], slack: int) -> list[int]:
    """Spend unused bits greedily: the upgrade that removes the most loss and still fits, until none does."""
    position = list(position)
    left = slack - sum(int(b[k]) for b, k in zip(bits, position, strict=True))
    while True:
        best_gain, best = 0.0, None
        for g, (b, lo) in enumerate(zip(bits, loss, strict=True)):
            here = position[g]
            fits = np.flatnonzero(b - b[here] <= left)
            k = int(fits[np.argmin(lo[fits])])
            if lo[here] - lo[k] > best_gain:
                best_gain, best = float(lo[here] - lo[k]), (g, k)
        if best is None:
            return position
        g, k = best
        left -= int(bits[g][k] - bits[g][position[g]])
        position[g] = k


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1: the HiGHS in scipy 1.17 prints debug lines straight to it (not via
    Python's sys.stdout), which would land in front of a command's JSON line."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _milp_positions(bits: list[np.ndarray], losses: list[np.ndarray], slack: int) -> list[int]:
    """The same optimum by MILP: binary x[g, k] for every non-base format, at most one per group."""
    sizes = [len(b) - 1 for b in bits]
    owners = np.repeat(np.arange(len(bits)), sizes)
    if owners.size == 0 or slack == 0:
        return [0] * len(bits)
    extra = np.concatenate([b[1:] for b in bits]).astype(np.float64)
    loss = np.concatenate([lo[1:] for lo in losses])
    # both rows scaled to O(1): HiGHS tolerances are absolute, and raw bit counts reach 1e11
    scale = float(np.abs(loss).max()) or 1.0
    one_per_group = csr_array((np.ones(owners.size), (owners, np.arange(owners.size))), shape=(len(bits), owners.size))
    limit = slack
    while True:
        with warnings.catch_warnings(), _quiet_stdout():
            # mip_abs_gap goes to HiGHS as is; scipy warns that it does not know the option
            warnings.filterwarnings("ignore", message="Unrecognized options")
            result = milp(
                loss / scale,
                integrality=np.ones(owners.size),
                bounds=Bounds(0, 1),
                constraints=[
                    LinearConstraint(one_per_group, -np.inf, 1),
                    LinearConstraint((extra / slack)[None], -np.inf, limit / slack),
                ],
                options={"mip_rel_gap": 0.0, "mip_abs_gap": 0.0},
            )
        if result.x is None:
            raise AutompError(f"the MILP solver failed: {result.message}")
        taken = result.x > 0.5
        used = int(extra[taken].sum())
        if used <= slack:
            break
        # the feasibility tolerance let the bits row overshoot: tighten it by the excess and solve again
        limit -= used - slack
    positions = [0] * len(bits)
    offsets = np.cumsum([0, *sizes])
    for index in np.flatnonzero(taken):
        g = int(owners[index])
        positions[g] = int(index - offsets[g]) + 1
    return positions
