"""Simulated annealing on the real loss, starting from the exact knapsack allocation.

The knapsack optimum is only optimal for the proxy. Annealing measures allocations for real (with
the evaluator) and moves from there. A *move* raises one group to its next larger format. If that
alone breaks the bits budget, the move also lowers another group to its next smaller format.
Proposals that still exceed the budget are redrawn without being evaluated. A worse allocation is
accepted with probability ``exp(-relative loss increase / T)``. The temperature falls geometrically
from ``t_start`` to ``t_end`` over the evaluation budget. The best allocation seen is returned, so
the result is never worse on the real loss than the start.

Deterministic for a seed. ``evaluations`` counts every real evaluation, the start's included.

With an evaluator that runs several evaluations at once (``--executor ray``), the next proposals are
drawn ahead along the path on which each one is rejected (the most likely path once the temperature
is low) and evaluated in one batch. Walking through the results in order, the first accepted
proposal ends the batch: the random generator is put back where the serial run has it, and later
results are dropped. So the path, curve and result are the serial run's for the same seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from automp.errors import AutompError
from automp.search.knapsack import Knapsack
from automp.search.problem import Evaluator, Problem, Solution, evaluate_all, parallel_width
from automp.search.space import DecisionSpace, format_option

MAX_DRAWS = 1000  # proposals drawn per evaluation before the search gives up (no feasible move left)


class Anneal:
    name = "anneal"

    def __init__(
        self,
        max_evals: int = 100,
        t_start: float = 0.005,
        t_end: float = 0.0001,
        formats: list[str] | str | None = None,
    ) -> None:
        if max_evals < 1 or not 0 < t_end <= t_start:
            raise AutompError("anneal needs max_evals >= 1 and 0 < t_end <= t_start")
        self.max_evals, self.t_start, self.t_end = max_evals, t_start, t_end
        self.formats = format_option(formats)

    def solve(self, problem: Problem, *, seed: int = 0, evaluator: Evaluator | None = None) -> Solution:
        if evaluator is None:
            raise AutompError("the anneal solver measures real quality: it needs an evaluator (--eval)")
        start_time = time.perf_counter()
        space = DecisionSpace.build(problem, self.formats)
        # the knapsack over the same formats the moves use, so that every start group is an option
        start = Knapsack().solve(replace(problem, allowed=self.formats) if self.formats else problem)
        current = space.actions_of(start.choice)
        current_loss = evaluator(space.allocation(current))
        best, best_loss = current.copy(), current_loss
        rng = np.random.default_rng(seed)
        curve = [{"evaluation": 0, "loss": current_loss, "best": best_loss, "temperature": None, "accepted": True}]
        width, exhausted = parallel_width(evaluator), False
        while len(curve) < self.max_evals and not exhausted:
            ahead, exhausted = _propose_ahead(space, current, rng, min(width, self.max_evals - len(curve)))
            losses = evaluate_all(evaluator, [space.allocation(proposal) for proposal, _state in ahead])
            for (proposal, state), loss in zip(ahead, losses, strict=True):
                step = len(curve)
                rng.bit_generator.state = state  # where the serial run stands after drawing this proposal
                temperature = self.t_start * (self.t_end / self.t_start) ** ((step - 1) / max(1, self.max_evals - 2))
                increase = (loss - current_loss) / max(abs(current_loss), 1e-12)
                accepted = increase <= 0 or rng.random() < math.exp(-increase / temperature)
                if loss < best_loss:
                    best, best_loss = proposal.copy(), loss
                curve.append(
                    {
                        "evaluation": step,
                        "loss": loss,
                        "best": best_loss,
                        "temperature": temperature,
                        "accepted": accepted,
                    }
                )
                if accepted:  # the proposals drawn after this one assumed it rejected: drop them
                    current, current_loss, exhausted = proposal, loss, False
                    break
        return space.solution(best, self.name, time.perf_counter() - start_time, evaluations=len(curve), curve=curve)


def _propose_ahead(
    space: DecisionSpace, actions: np.ndarray, rng: np.random.Generator, count: int
) -> tuple[list[tuple[np.ndarray, dict]], bool]:
    """Up to ``count`` proposals from ``actions``, each drawn after the previous one was rejected (a
    rejection draws one uniform number), with the generator's state right after each proposal; and
    whether the proposals ran out (no feasible move left)."""
    ahead = []
    for _ in range(count):
        proposal = _propose(space, actions, rng)
        if proposal is None:
            return ahead, True
        ahead.append((proposal, rng.bit_generator.state))
        rng.random()
    return ahead, False


def _propose(space: DecisionSpace, actions: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A random feasible move: one group one format up, and if the budget needs it another one down."""
    for _ in range(MAX_DRAWS):
        up = int(rng.integers(space.n_groups))
        raised = space.neighbour(actions, up, +1)
        if raised is None:
            continue
        proposal = actions.copy()
        proposal[up] = raised
        if space.total_bits(proposal) <= space.budget:
            return proposal
        down = int(rng.integers(space.n_groups))
        lowered = space.neighbour(actions, down, -1) if down != up else None
        if lowered is None:
            continue
        proposal[down] = lowered
        if space.total_bits(proposal) <= space.budget:
            return proposal
    return None
