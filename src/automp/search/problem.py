"""The allocation problem every solver solves, and what every solver returns.

A solver sees a :class:`Problem` (the sensitivity table, a proxy, a budget in real stored bits,
allowed formats, pinned layers, tie groups) and returns a :class:`Solution`. Solvers that measure
real quality get an :class:`Evaluator` and count how many full evaluations they used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from automp.allocation import Allocation
from automp.sensitivity.table import SensitivityTable


@dataclass
class Problem:
    table: SensitivityTable
    proxy: str = "hessian"
    target_bits: float = 4.0  # average stored bits per weight over the table's layers (scales, zeros counted)
    allowed: list[str] | None = None  # format names; None = every profiled format
    pinned: dict[str, str] = field(default_factory=dict)  # layer name -> format
    tie_fused: bool = False  # layers engines fuse (q/k/v, gate/up) share one format

    @property
    def budget_bits(self) -> int:
        """Total stored bits the allocated layers may use."""
        return int(np.floor(self.target_bits * self.table.weight_count()))

    def groups(self) -> list[list[int]]:
        """Layer indices that must share a format: each tie group, every other layer alone."""
        index = {layer.name: i for i, layer in enumerate(self.table.layers)}
        seen: set[int] = set()
        groups = []
        if self.tie_fused:
            for names in self.table.fused:
                members = [index[n] for n in names if n in index]
                groups.append(members)
                seen.update(members)
        groups += [[i] for i in range(len(self.table.layers)) if i not in seen]
        return sorted(groups)

    def choices(self) -> np.ndarray:
        """(layers, formats) bool: which format each layer may take (allowed, pinned)."""
        table = self.table
        mask = np.ones((len(table.layers), len(table.formats)), dtype=bool)
        if self.allowed is not None:
            allowed = {table.format_index(f) for f in self.allowed}
            mask[:, [j for j in range(len(table.formats)) if j not in allowed]] = False
        for name, fmt in self.pinned.items():
            row = [i for i, layer in enumerate(table.layers) if layer.name == name]
            mask[row, :] = False
            mask[row, table.format_index(fmt)] = True
        return mask

    def allocation(self, choice: np.ndarray) -> Allocation:
        """An Allocation from one format index per layer."""
        return Allocation(
            formats={lay.name: self.table.formats[j] for lay, j in zip(self.table.layers, choice, strict=True)}
        )


@dataclass
class Solution:
    allocation: Allocation
    choice: list[int]  # format index per layer
    avg_bits: float
    predicted_loss: float  # sum of the proxy over layers
    solver: str
    seconds: float = 0.0
    evaluations: int = 0  # full evaluations of real quality used
    curve: list[dict] = field(default_factory=list)  # learning curve (RL): one dict per episode


class Evaluator(Protocol):
    """Real quality of an allocation (e.g. perplexity on held-out windows); lower is better.

    An evaluator that runs evaluations in parallel (``search.pooled.PooledEvaluator``) also has
    ``workers`` (how many at the same time) and ``map(allocations) -> list[float]``."""

    evaluations: int

    def __call__(self, allocation: Allocation) -> float: ...


def evaluate_all(evaluator: Evaluator, allocations: list[Allocation]) -> list[float]:
    """The real loss of every allocation, in order: one parallel batch when the evaluator has ``map``."""
    batch = getattr(evaluator, "map", None)
    return batch(allocations) if batch is not None else [float(evaluator(a)) for a in allocations]


def parallel_width(evaluator: Evaluator) -> int:
    """How many evaluations ``evaluator`` runs at the same time (1 for an evaluator in this process)."""
    return getattr(evaluator, "workers", 1)


class Solver(Protocol):
    name: str

    def solve(self, problem: Problem, *, seed: int = 0, evaluator: Evaluator | None = None) -> Solution: ...
