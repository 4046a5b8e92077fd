"""A Problem seen group by group: the unit every solver picks a format for.

Layers tied together (``--tie-fused``: q/k/v, gate/up) take one format, so a group's bits and
predicted loss in a format are the sums over its members; every other layer is a group of one. A
group may take a format only if all its members may (allowed formats, pins). Solvers choose one
format index per group and hand the choice back here, so every solver reports exact stored bits and
the proxy sum the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from automp.errors import AutompError
from automp.search.problem import Problem, Solution


@dataclass(frozen=True)
class Grouped:
    problem: Problem
    groups: list[list[int]]  # layer indices per group
    bits: np.ndarray  # (groups, formats) int64: exact stored bits of the whole group
    loss: np.ndarray  # (groups, formats) float64: summed proxy of the group's layers
    allowed: np.ndarray  # (groups, formats) bool
    layer_bits: np.ndarray  # (layers, formats), from the table
    layer_loss: np.ndarray  # (layers, formats), from the table

    @classmethod
    def of(cls, problem: Problem) -> Grouped:
        table = problem.table
        names = [layer.name for layer in table.layers]
        unknown = sorted(set(problem.pinned) - set(names))
        if unknown:
            raise AutompError(f"pinned layer {unknown[0]} is not in the sensitivity table")
        layer_bits = table.bits_matrix()
        layer_loss = table.proxy_matrix(problem.proxy)
        mask = problem.choices()
        groups = problem.groups()
        allowed = np.stack([mask[members].all(axis=0) for members in groups])
        for members, row in zip(groups, allowed, strict=True):
            if not row.any():
                listed = ", ".join(names[i] for i in members)
                raise AutompError(f"no format is left for {listed}: tied layers are pinned to different formats")
        return cls(
            problem=problem,
            groups=groups,
            bits=np.stack([layer_bits[members].sum(axis=0) for members in groups]),
            loss=np.stack([layer_loss[members].sum(axis=0) for members in groups]),
            allowed=allowed,
            layer_bits=layer_bits,
            layer_loss=layer_loss,
        )

    @property
    def weight_count(self) -> int:
        return self.problem.table.weight_count()

    def ladder(self, g: int) -> np.ndarray:
        """Group ``g``'s allowed format indices from fewest to most bits (equal bits: lower loss first)."""
        options = np.flatnonzero(self.allowed[g])
        return options[np.lexsort((options, self.loss[g, options], self.bits[g, options]))]

    def rungs(self, g: int) -> np.ndarray:
        """Group ``g``'s ladder with one format per bit width (the lowest-loss one): bits strictly increase."""
        ladder = self.ladder(g)
        widths = self.bits[g, ladder]
        return ladder[np.r_[True, widths[1:] > widths[:-1]]]

    def min_bits(self) -> int:
        return int(sum(self.bits[g, self.ladder(g)[0]] for g in range(len(self.groups))))

    def min_avg_bits(self) -> float:
        """The smallest target any allocation meets, rounded up to 4 decimals so that it is itself feasible."""
        return math.ceil(self.min_bits() / self.weight_count * 1e4) / 1e4

    def require_feasible(self, target_bits: float | None = None) -> None:
        target = self.problem.target_bits if target_bits is None else target_bits
        if math.floor(target * self.weight_count) < self.min_bits():
            raise AutompError(
                f"target {target:g} avg bits is below the minimum achievable {self.min_avg_bits():.4f} avg bits "
                "with the allowed formats and pins"
            )

    def choice_bits(self, group_choice: np.ndarray) -> int:
        return int(self.bits[np.arange(len(self.groups)), group_choice].sum())

    def choice_loss(self, group_choice: np.ndarray) -> float:
        return float(self.loss[np.arange(len(self.groups)), group_choice].sum())

    def solution(self, group_choice: np.ndarray | list[int], solver: str, seconds: float) -> Solution:
        """Expand one format index per group to one per layer and measure it exactly."""
        choice = np.empty(len(self.layer_bits), dtype=np.int64)
        for g, (members, j) in enumerate(zip(self.groups, group_choice, strict=True)):
            # a solver bug, not a user error: never report an allocation that breaks the problem's rules
            assert self.allowed[g, j], f"solver {solver} chose a format group {g} may not take"
            choice[members] = j
        rows = np.arange(len(choice))
        return Solution(
            allocation=self.problem.allocation(choice),
            choice=choice.tolist(),
            avg_bits=int(self.layer_bits[rows, choice].sum()) / self.weight_count,
            predicted_loss=float(self.layer_loss[rows, choice].sum()),
            solver=solver,
            seconds=seconds,
        )
