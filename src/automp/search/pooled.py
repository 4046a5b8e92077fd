"""An evaluator whose evaluations run on an executor's workers (``--executor ray``).

Every worker holds its own evaluator (an ``AllocationEvaluator`` with its cache of quantized weights,
or a switchable model's), built once on the worker. A single evaluation runs on one worker;
``map`` spreads a batch over all of them (``--verify``'s candidates, ``--refine``'s and anneal's
speculative batches: ``search.verify`` and ``search.anneal``). The numbers are the ones the same
evaluator gives in this process (``execution/executor.py``).

``evaluations`` counts every evaluation run, including speculative ones whose results a solver
discarded; a solver's own ``Solution.evaluations`` counts only those it used, as in a serial run.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from automp.allocation import Allocation
from automp.execution.executor import Pool
from automp.search.evaluator import Measurement


def _itself(state: Any) -> Any:
    return state


class PooledEvaluator:
    """The evaluator ``view(state)`` of every worker of ``pool``, used as one evaluator with ``map``.

    Quacks like ``AllocationEvaluator``: ``metric``, ``baseline``, ``fp``, ``windows``, ``measure``,
    ``supports_attention``; ``workers`` says how many evaluations run at the same time. Leaving a
    ``with`` block changes nothing: the workers' models are their own copies.
    """

    def __init__(self, pool: Pool, view: Callable[[Any], Any] = _itself) -> None:
        self.pool, self.view, self.workers = pool, view, pool.workers
        self.evaluations = 0
        self.metric, self.baseline, self.fp, self.windows = pool.map(partial(_describe, view), [None])[0]
        self._supports_attention: bool | None = None

    def __call__(self, allocation: Allocation) -> float:
        return self.map([allocation])[0]

    def map(self, allocations: list[Allocation]) -> list[float]:
        """The metric of every allocation, in order, spread over the workers."""
        results = self._measure(allocations, kl=self.metric == "kl", attention=False)
        return [result.ppl if self.metric == "ppl" else result.kl for result in results]

    def measure(self, allocation: Allocation, *, kl: bool = False, attention: bool = False) -> Measurement:
        return self._measure([allocation], kl=kl, attention=attention)[0]

    @property
    def supports_attention(self) -> bool:
        if self._supports_attention is None:
            self._supports_attention = self.pool.map(partial(_supports_attention, self.view), [None])[0]
        return self._supports_attention

    def __enter__(self) -> PooledEvaluator:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def _measure(self, allocations: list[Allocation], *, kl: bool, attention: bool) -> list[Measurement]:
        self.evaluations += len(allocations)
        return self.pool.map(partial(_measure, self.view, kl, attention), allocations)


def _describe(view: Callable, state: Any, _item: None) -> tuple:
    evaluator = view(state)
    return evaluator.metric, evaluator.baseline, evaluator.fp, evaluator.windows


def _supports_attention(view: Callable, state: Any, _item: None) -> bool:
    return view(state).supports_attention


def _measure(view: Callable, kl: bool, attention: bool, state: Any, allocation: Allocation) -> Measurement:
    return view(state).measure(allocation, kl=kl, attention=attention)
