"""The decision space of the evaluation-driven solvers (RL, annealing, refinement).

Built on :class:`Grouped` (a problem seen group by group). These solvers decide only the groups
that have a real choice, and only among a list of *options* (format indices, cheapest first).
Groups with a single possible format (pinned, or tied to a pinned layer) are fixed.

Actions are one option index per decided group. The space converts them into a solution and
counts their exact stored bits. It also applies the greedy *repair* that brings an over-budget
action vector within the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.formats import get_format
from automp.search.grouped import Grouped
from automp.search.problem import Problem, Solution

FULL_BITS = 16


@dataclass
class DecisionSpace:
    grouped: Grouped
    options: list[int]  # table format indices, ascending total stored bits
    decided: list[int]  # indices of the decided groups in ``grouped.groups``
    base: np.ndarray  # format index per group of ``grouped``; fixed groups keep theirs
    valid: np.ndarray  # (decided, options) bool
    bits: np.ndarray  # (decided, options) int64: stored bits of the group in each option
    cost: np.ndarray  # (decided, options) float64: the problem's proxy summed over the group

    @classmethod
    def build(cls, problem: Problem, options: Sequence[str] | None = None) -> DecisionSpace:
        """Decision groups over ``options`` (format names; default: every allowed format)."""
        grouped = Grouped.of(problem)
        table = problem.table
        allowed = grouped.allowed.any(axis=0)
        if options is None:
            option_list = [j for j in range(len(table.formats)) if allowed[j]]
        else:
            option_list = sorted({table.format_index(name) for name in options})
            refused = [table.formats[j] for j in option_list if not allowed[j]]
            if refused:
                raise AutompError(f"option formats {', '.join(refused)} are not allowed by the problem")
        option_list.sort(key=lambda j: (int(grouped.bits[:, j].sum()), j))
        if len(option_list) < 2:
            raise AutompError("the search needs at least two formats to choose from")

        cols = np.array(option_list)
        decided, base = [], np.zeros(len(grouped.groups), dtype=np.int64)
        for g, row in enumerate(grouped.allowed):
            usable = np.flatnonzero(row[cols])
            if len(usable) >= 2:
                decided.append(g)
                continue
            only = [option_list[k] for k in usable] or list(np.flatnonzero(row))
            if len(only) != 1:
                names = [table.layers[i].name for i in grouped.groups[g]]
                listed = ", ".join(table.formats[j] for j in option_list)
                raise AutompError(f"layers {', '.join(names[:3])} allow none of the formats {listed}")
            base[g] = only[0]
        if not decided:
            raise AutompError("every layer is pinned: there is nothing to search")
        rows = np.array(decided)
        space = cls(
            grouped=grouped,
            options=option_list,
            decided=decided,
            base=base,
            valid=grouped.allowed[rows][:, cols],
            bits=grouped.bits[rows][:, cols],
            cost=grouped.loss[rows][:, cols],
        )
        space.check_feasible()
        return space

    # ---- sizes and costs ----------------------------------------------------------------------------

    @property
    def problem(self) -> Problem:
        return self.grouped.problem

    @property
    def n_groups(self) -> int:
        return len(self.decided)

    @property
    def n_options(self) -> int:
        return len(self.options)

    @property
    def budget(self) -> int:
        return self.problem.budget_bits

    @property
    def fixed_bits(self) -> int:
        """Stored bits of the groups that are not decided."""
        fixed = [g for g in range(len(self.grouped.groups)) if g not in set(self.decided)]
        return int(sum(self.grouped.bits[g, self.base[g]] for g in fixed))

    def total_bits(self, actions: Sequence[int]) -> int:
        return self.grouped.choice_bits(self.group_choice(actions))

    def avg_bits(self, actions: Sequence[int]) -> float:
        return self.total_bits(actions) / self.grouped.weight_count

    def memory_saving(self, actions: Sequence[int]) -> float:
        """1 - stored bits / the same weights in 16 bits: the RL prototypes' memory term."""
        return 1 - self.total_bits(actions) / (FULL_BITS * self.grouped.weight_count)

    def predicted_loss(self, actions: Sequence[int]) -> float:
        return self.grouped.choice_loss(self.group_choice(actions))

    def check_feasible(self) -> None:
        lowest = self.total_bits(self.cheapest())
        if lowest > self.budget:
            raise AutompError(
                f"target {self.problem.target_bits:g} avg bits is below the cheapest allocation over the formats "
                f"{', '.join(self.problem.table.formats[j] for j in self.options)} "
                f"({lowest / self.grouped.weight_count:.4f} avg bits)"
            )

    # ---- conversions ----------------------------------------------------------------------------------

    def cheapest(self) -> np.ndarray:
        """The valid option with the fewest bits, for every decided group."""
        return np.where(self.valid, self.bits, np.iinfo(np.int64).max).argmin(axis=1)

    def group_choice(self, actions: Sequence[int]) -> np.ndarray:
        """Format index per group of ``grouped``."""
        actions = np.asarray(actions, dtype=np.int64)
        if actions.shape != (self.n_groups,) or not self.valid[np.arange(self.n_groups), actions].all():
            raise AutompError(f"invalid actions {actions.tolist()} for this decision space")
        choice = self.base.copy()
        choice[self.decided] = np.array(self.options)[actions]
        return choice

    def layer_choice(self, actions: Sequence[int]) -> np.ndarray:
        """Format index per layer."""
        choice = np.empty(len(self.problem.table.layers), dtype=np.int64)
        for members, fmt in zip(self.grouped.groups, self.group_choice(actions), strict=True):
            choice[members] = fmt
        return choice

    def allocation(self, actions: Sequence[int]) -> Allocation:
        return self.problem.allocation(self.layer_choice(actions))

    def actions_of(self, choice: Sequence[int]) -> np.ndarray:
        """The option of every decided group in a per-layer ``choice`` (e.g. another solver's solution)."""
        actions = []
        for g in self.decided:
            formats = {int(choice[i]) for i in self.grouped.groups[g]}
            fmt = formats.pop()
            if formats or fmt not in self.options:
                names = [self.problem.table.layers[i].name for i in self.grouped.groups[g]]
                raise AutompError(f"the allocation gives {', '.join(names)} a format outside the search's options")
            actions.append(self.options.index(fmt))
        return np.array(actions, dtype=np.int64)

    def solution(self, actions: Sequence[int], solver: str, seconds: float, **fields) -> Solution:
        solution = self.grouped.solution(self.group_choice(actions), solver, seconds)
        for name, value in fields.items():
            setattr(solution, name, value)
        return solution

    # ---- moves ------------------------------------------------------------------------------------------

    def neighbour(self, actions: Sequence[int], group: int, direction: int) -> int | None:
        """Group ``group``'s valid option with the next more (+1) or fewer (-1) bits, or None."""
        bits, current = self.bits[group], self.bits[group, actions[group]]
        better = self.valid[group] & ((bits > current) if direction > 0 else (bits < current))
        candidates = np.flatnonzero(better)
        if not len(candidates):
            return None
        pick = np.argmin(bits[candidates]) if direction > 0 else np.argmax(bits[candidates])
        return int(candidates[pick])

    def repair(self, actions: Sequence[int]) -> np.ndarray:
        """Lower one group at a time until the budget holds, least proxy damage per saved bit first.

        Each round considers every cheaper valid option of every group and takes the one with the
        smallest predicted loss increase per bit saved, so the least sensitive layers go down first.
        """
        actions = np.array(actions, dtype=np.int64)
        while self.total_bits(actions) > self.budget:
            best, best_score = None, np.inf
            for g in range(self.n_groups):
                current = actions[g]
                for lower in np.flatnonzero(self.valid[g] & (self.bits[g] < self.bits[g, current])):
                    saved = self.bits[g, current] - self.bits[g, lower]
                    score = (self.cost[g, lower] - self.cost[g, current]) / saved
                    if best is None or score < best_score:
                        best, best_score = (g, int(lower)), score
            if best is None:  # cannot happen after check_feasible; a guard against an endless loop
                raise AutompError("no allocation over the options fits the budget")
            actions[best[0]] = best[1]
        return actions


def format_option(formats: list[str] | str | None) -> list[str] | None:
    """A solver's ``formats`` option as a list: comma-separated text (CLI, YAML) or a list; None = default."""
    return formats.split(",") if isinstance(formats, str) else formats


def bit_options(problem: Problem, widths: Sequence[int] = (3, 4, 8)) -> list[str]:
    """The RL prototypes' choices: one allowed format per bit width in ``widths``.

    For width ``b`` the preference is ``w{b}g128``, then ``w{b}`` (per channel), then any other
    allowed quantized format of ``b`` bits in table order. Widths without an allowed format are left
    out.
    """
    table = problem.table
    allowed = [table.formats[table.format_index(f)] for f in problem.allowed] if problem.allowed else table.formats
    chosen = []
    for b in widths:
        same_width = [name for name in allowed if get_format(name).quantized and get_format(name).bits == b]
        preferred = [name for name in (f"w{b}g128", f"w{b}") if name in same_width]
        if preferred or same_width:
            chosen.append((preferred or same_width)[0])
    if len(chosen) < 2:
        raise AutompError(
            f"fewer than two of the bit widths {list(widths)} have an allowed format among {', '.join(allowed)}; "
            "name the formats to choose from explicitly"
        )
    return chosen
