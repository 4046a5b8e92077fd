"""The Fisher prototype's allocation: sensitivity classes by quantile, then a greedy fix.

1. Sensitivity per weight. For each group, ``s = (loss at its cheapest allowed format - loss at its
   best allowed format) / weight count``: the damage per weight that the group can take.
2. Power-law mapping. ``u = (s / max s) ** alpha`` with ``alpha = 0.5``. Sensitivities are heavy
   tailed (a few layers dominate), so on the raw scale almost every layer sits near 0; the square
   root spreads them over [0, 1] so that the middle classes are populated.
3. Quantile classes. With K allowed formats, class k (k-th cheapest format) holds the groups with
   ``k <= K * u + shift < k + 1`` (clipped to 0..K-1): evenly spaced cut points on the mapped scale,
   so each class is a quantile band of the layers, most sensitive -> most bits. The one ``shift``
   sets every class size at once; it is the largest shift whose allocation fits the bits budget.
4. Greedy fix. The bits the classes leave unused go, one step at a time, to the group whose next
   more expensive format removes the most predicted loss per extra bit and still fits. The result
   never exceeds the budget.

Pinned groups keep their format throughout. Deterministic: no randomness is involved.
"""

from __future__ import annotations

import time

import numpy as np

from automp.search.grouped import Grouped
from automp.search.problem import Evaluator, Problem, Solution


class Quantile:
    name = "quantile"

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha

    def solve(self, problem: Problem, *, seed: int = 0, evaluator: Evaluator | None = None) -> Solution:
        start = time.perf_counter()
        grouped = Grouped.of(problem)
        grouped.require_feasible()
        ladders = [grouped.rungs(g) for g in range(len(grouped.groups))]  # fewest bits first, one per width
        mapped = self.mapped_sensitivity(grouped, ladders)
        position = _classes(grouped, ladders, mapped, problem.budget_bits)
        position = _fill(grouped, ladders, position, problem.budget_bits)
        choice = np.array([ladder[p] for ladder, p in zip(ladders, position, strict=True)])
        return grouped.solution(choice, self.name, time.perf_counter() - start)

    def mapped_sensitivity(self, grouped: Grouped, ladders: list[np.ndarray]) -> np.ndarray:
        """``(s / max s) ** alpha`` per group, in [0, 1]."""
        numel = np.array([sum(grouped.problem.table.layers[i].numel for i in members) for members in grouped.groups])
        damage = np.array(
            [grouped.loss[g, ladder[0]] - grouped.loss[g, ladder].min() for g, ladder in enumerate(ladders)]
        )
        s = damage / numel
        return (s / s.max()) ** self.alpha if s.max() > 0 else np.zeros_like(s)


def _classes(grouped: Grouped, ladders: list[np.ndarray], mapped: np.ndarray, budget: int) -> np.ndarray:
    """Each group's class (ladder position) under the largest shift that fits ``budget``."""
    sizes = np.array([len(ladder) for ladder in ladders])
    classes = sizes.max()

    def at(shift: float) -> np.ndarray:
        return np.clip(np.floor(classes * mapped + shift), 0, sizes - 1).astype(np.int64)

    def bits(position: np.ndarray) -> int:
        return int(sum(grouped.bits[g, ladder[p]] for g, (ladder, p) in enumerate(zip(ladders, position, strict=True))))

    # the allocation changes only where a cut point crosses a group: at shift = j - K * u for integer j
    shifts = np.unique((np.arange(-classes, classes + 1)[:, None] - classes * mapped[None]).ravel())
    lo, hi = 0, len(shifts) - 1  # at shifts[0] every group is in class 0: the cheapest allocation fits
    while lo < hi:  # bits grow with the shift: bisect for the last shift that fits
        mid = (lo + hi + 1) // 2
        if bits(at(shifts[mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return at(shifts[lo])


def _fill(grouped: Grouped, ladders: list[np.ndarray], position: np.ndarray, budget: int) -> np.ndarray:
    """Spend the unused bits on the upgrades that remove the most loss per bit and still fit."""
    position = position.copy()
    rows = range(len(ladders))
    left = budget - sum(grouped.bits[g, ladders[g][position[g]]] for g in rows)
    while True:
        best, best_gain = -1, 0.0
        for g in rows:
            ladder, p = ladders[g], position[g]
            if p + 1 == len(ladder):
                continue
            extra = grouped.bits[g, ladder[p + 1]] - grouped.bits[g, ladder[p]]
            gain = (grouped.loss[g, ladder[p]] - grouped.loss[g, ladder[p + 1]]) / extra
            if extra <= left and gain > best_gain:
                best, best_gain = g, gain
        if best < 0:
            return position
        left -= (
            grouped.bits[best, ladders[best][position[best] + 1]] - grouped.bits[best, ladders[best][position[best]]]
        )
        position[best] += 1
