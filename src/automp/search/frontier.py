"""The predicted loss-vs-bits curve: one allocation per target average bits, from one cached table.

Any allocation that fits a budget also fits every larger one, so the best predicted loss can only
fall as bits grow. The exact knapsack gives that by itself; for a heuristic solver a point that came
out worse than the point before keeps the earlier allocation instead, so the curve is always
non-increasing.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.search.grouped import Grouped
from automp.search.problem import Problem
from automp.search.registry import get_solver


class FrontierPoint(NamedTuple):
    target_bits: float
    avg_bits: float
    predicted_loss: float
    allocation: Allocation


def parse_range(spec: str) -> tuple[float, float, float]:
    """``lo:hi:step`` (e.g. ``2.5:8:0.25``) -> (lo, hi, step)."""
    try:
        lo, hi, step = (float(part) for part in spec.split(":"))
    except ValueError:
        raise AutompError(f"frontier range {spec!r} must be lo:hi:step, e.g. 2.5:8:0.25") from None
    if not (step > 0 and hi >= lo and math.isfinite(lo) and math.isfinite(hi)):
        raise AutompError(f"frontier range {spec!r} needs lo <= hi and a positive step")
    return lo, hi, step


def targets(lo: float, hi: float, step: float) -> list[float]:
    count = math.floor((hi - lo) / step + 1e-9) + 1  # hi itself is included when the steps land on it
    return [round(lo + i * step, 10) for i in range(count)]


def frontier(
    problem: Problem, lo: float, hi: float, step: float, solver: str = "knapsack", seed: int = 0, **options
) -> list[FrontierPoint]:
    """One point per target in lo, lo+step, ..., hi; targets below the cheapest allocation are skipped."""
    grouped = Grouped.of(problem)
    wanted = targets(lo, hi, step)
    feasible = [t for t in wanted if math.floor(t * grouped.weight_count) >= grouped.min_bits()]
    if not feasible:
        grouped.require_feasible(wanted[-1])  # raises, naming the minimum achievable avg bits
    engine = get_solver(solver, **options)
    solutions = [engine.solve(replace(problem, target_bits=t), seed=seed) for t in feasible]
    points: list[FrontierPoint] = []
    for target, solution in zip(feasible, solutions, strict=True):
        if points and solution.predicted_loss > points[-1].predicted_loss:
            points.append(points[-1]._replace(target_bits=target))
        else:
            points.append(FrontierPoint(target, solution.avg_bits, solution.predicted_loss, solution.allocation))
    return points
