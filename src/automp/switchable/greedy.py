"""The switchable prototype's greedy under a *measured* budget.

Start with every layer at the highest format. Rank the layers by the measured damage of lowering each one
alone to the lowest format (least sensitive first). Then, in that order, lower a layer one format at a
time while the measured perplexity stays within ``max_drop`` percent of the full-precision model's; the
first lowering that breaks the budget is undone and the next layer is tried. Every number is a forward
pass on held-out windows through the switchable evaluator, so the budget is met by measurement, not by
a proxy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from automp.errors import AutompError
from automp.switchable.evaluator import SwitchableEvaluator


@dataclass
class GreedyResult:
    bitmap: dict[str, str]
    ppl: float
    fp_ppl: float
    limit: float
    order: list[str]  # least sensitive first
    sensitivity: dict[str, float]  # ppl with only this layer at the lowest format
    evaluations: int
    steps: list[dict] = field(default_factory=list)  # every tried lowering: layer, format, ppl, kept


def measured_greedy(evaluator: SwitchableEvaluator, max_drop: float) -> GreedyResult:
    """The lowest bitmap the greedy reaches with perplexity at most ``(1 + max_drop / 100)`` times FP16's."""
    if max_drop < 0:
        raise AutompError(f"--max-drop is a perplexity increase in percent, at least 0, not {max_drop}")
    formats = evaluator.formats  # low to high
    sw = evaluator.sw
    limit = evaluator.fp.ppl * (1 + max_drop / 100)
    bitmap = sw.uniform(formats[-1])
    current = evaluator.measure(bitmap).ppl
    if current > limit:
        raise AutompError(f"even all-{formats[-1]} ({current:.4g}) exceeds the budget ({limit:.4g}): raise --max-drop")
    sensitivity = {name: evaluator.measure({**bitmap, name: formats[0]}).ppl for name in bitmap}
    order = sorted(bitmap, key=lambda name: (sensitivity[name], name))
    steps = []
    for name in order:
        level = formats.index(bitmap[name])
        while level > 0:
            trial = {**bitmap, name: formats[level - 1]}
            ppl = evaluator.measure(trial).ppl
            kept = ppl <= limit
            steps.append({"layer": name, "format": formats[level - 1], "ppl": ppl, "kept": kept})
            if not kept:
                break
            bitmap, current, level = trial, ppl, level - 1
    return GreedyResult(bitmap, current, evaluator.fp.ppl, limit, order, sensitivity, evaluator.evaluations, steps)
