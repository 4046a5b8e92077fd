"""Checking a search against real quality, and improving its result on it.

* :func:`verify` evaluates candidate allocations end to end. Spearman's rank correlation
  between each proxy's predicted loss and the real loss shows how well each proxy ranked them.
* :func:`candidates` builds the top-K candidates at one budget: the search's own solution, the
  exact knapsack optimum under every measured proxy, and the best-predicted feasible swap
  neighbours of the solution. They are ranked by the problem's proxy.
* :func:`refine` runs a proxy-guided local search on the real loss. It tries feasible swap moves
  (one group up a format, another down, within the budget) in order of predicted gain and takes
  the first that really improves. It repeats this until no move improves or the evaluation budget
  is spent. Nothing is evaluated twice.

With an evaluator that runs several evaluations at once (``--executor ray``), ``verify`` measures
the candidates in one batch, and ``refine`` evaluates the next moves in batches of that width,
speculatively: it keeps the results up to the first improving move and drops the rest, so its path,
curve and count of evaluations are the serial run's.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
from scipy.stats import spearmanr

from automp.errors import AutompError
from automp.search.knapsack import Knapsack
from automp.search.problem import Evaluator, Problem, Solution, evaluate_all, parallel_width
from automp.search.space import DecisionSpace
from automp.sensitivity.table import PROXIES, SensitivityTable


def verify(candidates: list[Solution], evaluator: Evaluator, proxies: dict[str, list[float]]) -> dict:
    """Real loss of every candidate, and each proxy's Spearman correlation with it (None if undefined)."""
    if not candidates:
        raise AutompError("verify needs at least one candidate allocation")
    for name, scores in proxies.items():
        if len(scores) != len(candidates):
            raise AutompError(f"proxy {name} scores {len(scores)} candidates, not {len(candidates)}")
    real = evaluate_all(evaluator, [candidate.allocation for candidate in candidates])
    spearman = {name: _rank_correlation(scores, real) for name, scores in proxies.items()}
    return {"real": real, "spearman": spearman, "best": int(np.argmin(real)), "evaluations": len(candidates)}


def proxy_scores(candidates: list[Solution], table: SensitivityTable) -> dict[str, list[float]]:
    """Every measured proxy's predicted loss (summed over layers) of every candidate."""
    scores = {}
    for name in PROXIES:
        try:
            matrix = table.proxy_matrix(name)
        except AutompError:  # not measured (e.g. kl without --kl)
            continue
        rows = np.arange(len(table.layers))
        scores[name] = [float(matrix[rows, candidate.choice].sum()) for candidate in candidates]
    return scores


def candidates(problem: Problem, solution: Solution, k: int) -> list[Solution]:
    """Up to ``k`` distinct allocations within the budget, ``solution`` first, then by predicted loss."""
    if k < 1:
        raise AutompError("--verify needs K >= 1 candidates")
    space = DecisionSpace.build(problem)
    pool = {tuple(solution.choice): solution}
    for proxy in proxy_scores([solution], problem.table):
        exact = Knapsack().solve(replace(problem, proxy=proxy))
        pool.setdefault(tuple(exact.choice), replace(exact, solver=f"knapsack[{proxy}]"))
    start = space.actions_of(solution.choice)
    for move in _moves(space, start):
        neighbour = space.solution(_apply(space, start, move), "swap-neighbour", 0.0)
        pool.setdefault(tuple(neighbour.choice), neighbour)
    others = [c for key, c in pool.items() if key != tuple(solution.choice)]
    others.sort(key=lambda c: space.predicted_loss(space.actions_of(c.choice)))
    return [solution, *others][:k]


def refine(solution: Solution, problem: Problem, evaluator: Evaluator, max_evals: int) -> Solution:
    """Local search with swap moves on the real loss, from ``solution``; at most ``max_evals`` evaluations."""
    if max_evals < 1:
        raise AutompError("refine needs an evaluation budget of at least 1")
    began = time.perf_counter()
    space = DecisionSpace.build(problem)
    current = space.actions_of(solution.choice)
    seen = {tuple(current): evaluator(space.allocation(current))}
    curve = [{"evaluation": 0, "loss": seen[tuple(current)], "best": seen[tuple(current)], "move": None}]
    width = parallel_width(evaluator)
    improved = True
    while improved and len(seen) < max_evals:
        improved = False
        moves = [(move, _apply(space, current, move)) for move in _moves(space, current)]
        moves = [(move, proposal) for move, proposal in moves if tuple(proposal) not in seen]
        while moves and not improved and len(seen) < max_evals:
            take = min(width, max_evals - len(seen))
            batch, moves = moves[:take], moves[take:]
            losses = evaluate_all(evaluator, [space.allocation(proposal) for _move, proposal in batch])
            for (move, proposal), loss in zip(batch, losses, strict=True):
                seen[tuple(proposal)] = loss
                best = min(curve[-1]["best"], loss)
                curve.append({"evaluation": len(curve), "loss": loss, "best": best, "move": list(move)})
                if loss < seen[tuple(current)]:  # the first improving move is taken; later results are dropped
                    current, improved = proposal, True
                    break
    return space.solution(
        current, f"{solution.solver}+refine", time.perf_counter() - began, evaluations=len(seen), curve=curve
    )


def _moves(space: DecisionSpace, actions: np.ndarray) -> list[tuple[int, int | None]]:
    """Feasible moves (group up, group down or None), most promising by the proxy first.

    A group goes up one format alone when the budget allows it, otherwise together with another
    group going down one format. The predicted gain is the proxy's loss change of the move.
    """
    moves = []
    bits = space.total_bits(actions)
    for up in range(space.n_groups):
        raised = space.neighbour(actions, up, +1)
        if raised is None:
            continue
        extra = space.bits[up, raised] - space.bits[up, actions[up]]
        gain = space.cost[up, raised] - space.cost[up, actions[up]]
        if bits + extra <= space.budget:
            moves.append((gain, up, None))
            continue
        for down in range(space.n_groups):
            lowered = space.neighbour(actions, down, -1) if down != up else None
            if lowered is None:
                continue
            saved = space.bits[down, actions[down]] - space.bits[down, lowered]
            if bits + extra - saved <= space.budget:
                moves.append((gain + space.cost[down, lowered] - space.cost[down, actions[down]], up, down))
    moves.sort(key=lambda move: (move[0], move[1], -1 if move[2] is None else move[2]))
    return [(up, down) for _gain, up, down in moves]


def _apply(space: DecisionSpace, actions: np.ndarray, move: tuple[int, int | None]) -> np.ndarray:
    up, down = move
    moved = actions.copy()
    moved[up] = space.neighbour(actions, up, +1)
    if down is not None:
        moved[down] = space.neighbour(actions, down, -1)
    return moved


def _rank_correlation(scores: list[float], real: list[float]) -> float | None:
    if len(scores) < 2 or len(set(scores)) < 2 or len(set(real)) < 2:
        return None  # a constant ranking has no correlation
    rho = spearmanr(scores, real).statistic
    return None if math.isnan(rho) else float(rho)
