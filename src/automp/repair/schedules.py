"""How much training each decoder block gets, and the learning-rate curve inside a block.

A block's budget is its number of epochs (passes over the training windows), a learning-rate factor
and its early-stopping patience (in validations). The schedules (the Fisher prototype's SGRA):

* ``uniform``: every block the base budget.
* ``sgra``: a block of sensitivity ``s`` ∈ [0, 1] gets ``epochs·(1 + √s)``, ``lr / (1 + s/2)`` and
  patience ``2 + 3s``: sensitive blocks train longer and more gently.
* ``joint``: ``sgra``, then blocks given more bits get ``epochs × (1 + 0.3·(b − 2)/6)``,
  ``lr × (1 + 0.2·(b − 2)/6)`` and two more validations of patience above 4 bits.

``s`` is the block's share of the sensitivity table's proxy for the formats it was allocated, divided
by the largest block's (:func:`block_sensitivity`). :func:`equal_total` rescales any schedule's epochs
to a given total, so schedules can be compared at equal training steps as well as at their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.sensitivity.table import SensitivityTable

SCHEDULES = ("uniform", "sgra", "joint")


@dataclass(frozen=True)
class BlockBudget:
    epochs: float
    lr_scale: float = 1.0
    patience: int = 2


def block_budget(schedule: str, base: BlockBudget, sensitivity: float = 0.0, bits: float = 16.0) -> BlockBudget:
    """The budget of one block of normalised ``sensitivity`` and average allocated ``bits``."""
    if schedule not in SCHEDULES:
        raise AutompError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if schedule == "uniform":
        return base
    s = min(max(sensitivity, 0.0), 1.0)
    epochs, lr, patience = base.epochs * (1 + math.sqrt(s)), base.lr_scale / (1 + 0.5 * s), 2 + 3 * s
    if schedule == "joint":
        more = min(max(bits - 2, 0.0), 6.0) / 6
        epochs, lr = epochs * (1 + 0.3 * more), lr * (1 + 0.2 * more)
        patience += 2 if bits > 4 else 0
    return BlockBudget(epochs, lr, round(patience))


def equal_total(budgets: list[BlockBudget], total_epochs: float) -> list[BlockBudget]:
    """The same budgets with epochs rescaled to sum to ``total_epochs``."""
    factor = total_epochs / sum(b.epochs for b in budgets)
    return [replace(b, epochs=b.epochs * factor) for b in budgets]


def block_sensitivity(table: SensitivityTable, allocation: Allocation, proxy: str, blocks: int) -> list[float]:
    """Each block's summed proxy at its allocated formats, divided by the largest block's (0 when none)."""
    matrix = table.proxy_matrix(proxy)
    totals = [0.0] * blocks
    for row, layer in zip(matrix, table.layers, strict=True):
        fmt = allocation.formats.get(layer.name)
        if fmt is not None and 0 <= layer.block < blocks and fmt in table.formats:
            totals[layer.block] += max(float(row[table.format_index(fmt)]), 0.0)
    top = max(totals)
    return [t / top if top > 0 else 0.0 for t in totals]


def cosine_lr(step: int, steps: int) -> float:
    """The learning-rate factor at ``step`` of ``steps``: cosine decay from 1 to 0 (nanoGPT's shape)."""
    return 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
