"""The switchable-precision prototype's search: lower precision where it hurts least per bit.

Every group starts at its most expensive allowed format. Each step lowers the one group whose next
cheaper format adds the least predicted loss per bit saved, until the allocation fits the bits
budget. With ``max_loss`` (a predicted-loss budget) the search then keeps lowering while the
predicted loss stays within it, so the result is the smallest allocation the greedy finds that meets
both budgets; if the bits budget alone already forces a larger loss, that is an error.

Fast and simple, but not optimal: one step looks only at the next cheaper format of each group.
"""

from __future__ import annotations

import time

import numpy as np

from automp.errors import AutompError
from automp.search.grouped import Grouped
from automp.search.problem import Evaluator, Problem, Solution


class Greedy:
    name = "greedy"

    def __init__(self, max_loss: float | None = None) -> None:
        self.max_loss = max_loss

    def solve(self, problem: Problem, *, seed: int = 0, evaluator: Evaluator | None = None) -> Solution:
        start = time.perf_counter()
        grouped = Grouped.of(problem)
        grouped.require_feasible()
        # each group's formats from most to fewest bits, one per bit width (the lower-loss one on a tie)
        ladders = [grouped.rungs(g)[::-1].tolist() for g in range(len(grouped.groups))]
        position = [0] * len(ladders)
        steps = np.array([_step(grouped, g, ladders[g], 0) for g in range(len(ladders))])  # (saved, added, ratio)
        choice = np.array([ladder[0] for ladder in ladders])
        bits, loss = grouped.choice_bits(choice), grouped.choice_loss(choice)
        while bits > problem.budget_bits or self.max_loss is not None:
            g = int(np.argmin(steps[:, 2]))  # the first minimum: the lowest group index on a tie
            saved, added, ratio = steps[g]
            if not np.isfinite(ratio):
                break  # every group is at its cheapest format
            if bits <= problem.budget_bits and loss + added > self.max_loss:
                break  # within the bits budget, and one more step would break the loss budget
            position[g] += 1
            choice[g] = ladders[g][position[g]]
            bits -= int(saved)
            loss += added
            steps[g] = _step(grouped, g, ladders[g], position[g])
        if self.max_loss is not None and grouped.choice_loss(choice) > self.max_loss:
            raise AutompError(
                f"the bits budget forces a predicted loss of {grouped.choice_loss(choice):.6g} in the greedy search, "
                f"above the loss budget {self.max_loss:g}; raise the target bits or the loss budget"
            )
        return grouped.solution(choice, self.name, time.perf_counter() - start)


def _step(grouped: Grouped, g: int, ladder: list[int], position: int) -> tuple[float, float, float]:
    """Bits saved, loss added and loss added per bit saved by moving group ``g`` one rung down."""
    if position + 1 == len(ladder):
        return 0.0, 0.0, np.inf
    here, there = ladder[position], ladder[position + 1]
    saved = float(grouped.bits[g, here] - grouped.bits[g, there])
    added = float(grouped.loss[g, there] - grouped.loss[g, here])
    return saved, added, added / saved
