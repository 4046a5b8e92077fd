"""Verified delivery: what ``automp run`` hands over has been measured, and it is never an allocation
that measured worse than the best uniform format within the same budget.

A search ranks allocations by a proxy, and proxies can be wrong. Before delivery every candidate is
quantized for real with the run's final method (block by block, exactly as delivered) and its
per-window NLL is measured on held-out windows, neither calibration nor ``--eval`` text:

* **mixed**: the search's own solution, and the exact knapsack under every profiled proxy
  (re-solving takes milliseconds), so the proxy is chosen by measurement, not by a default;
* **uniform**: the uniform format with the most stored bits within the budget, and, when the budget
  lies between two formats, the *uniform mix*: the next larger format given to layer groups spread
  evenly through the model until the budget is spent (no proxy involved); with GGUF types, also
  llama.cpp's own recipe with the most bits within the budget (``search/gguf_recipes.py``).

The best mixed candidate is delivered when its mean NLL is below the best uniform candidate's. If
it is not, a refinement (``search.verify.refine``: swap moves on the measured loss, at most
``max_evals`` evaluations of cached pre-quantized weights) starts from it, and its result is
quantized and measured for real. If that still does not beat uniform, the uniform candidate is
delivered, and the record says so. Ties go to uniform. Every comparison is paired over the windows:
``delta_nll`` (candidate minus best uniform) and its standard error; ``significant`` marks a
difference beyond 2 SE.

With ``--executor ray`` the candidates are quantized and measured in parallel, each worker on its own
copy of the model (:class:`PooledQuality`), and the refinement's evaluations run on the same workers
(their ``AllocationEvaluator`` is built on that copy when refinement first asks). The numbers, and so
the delivered allocation, are the serial run's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn
from tqdm import tqdm

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.evaluate import Perplexity, paired_delta, perplexity
from automp.execution.executor import Pool, get_executor
from automp.search.gguf_recipes import BASE as RECIPES
from automp.search.gguf_recipes import recipe
from automp.search.knapsack import Knapsack
from automp.search.problem import Problem, Solution
from automp.sensitivity.table import PROXIES

if TYPE_CHECKING:
    from automp.quantize import GPTQConfig

Kind = Literal["mixed", "uniform"]
VERIFICATION_FILE = "verification.json"  # in an `automp run` directory


class Measured(BaseModel):
    """One candidate as measured: its allocation, bits, perplexity and paired difference to uniform."""

    label: str
    kind: Kind
    proxy: str  # the proxy that chose it (the search's own for uniform candidates)
    avg_bits: float
    ppl: float
    nll: float  # mean per-window NLL on the verification windows
    delta_nll: float | None = None  # paired, minus the best uniform candidate (None: no uniform fits)
    se: float | None = None
    formats: dict[str, str]
    window_nll: list[float]


class Verification(BaseModel):
    """The record of a verified delivery, saved in the run directory as ``verification.json``."""

    text: str  # where the windows came from
    windows: int
    seqlen: int
    method: str
    candidates: list[Measured]
    best_uniform: str | None
    best_mixed: str | None
    refine: dict | None = None  # evaluations, start/best measured loss, the refined candidate's label
    delivered: str
    delivered_kind: Kind
    delta_nll: float | None  # the delivered candidate minus the best uniform, paired
    se: float | None
    significant: bool  # |delta_nll| > 2 SE
    reason: str
    seconds: float

    def summary(self) -> dict:
        """The figures ``run --json`` and ``metrics.json`` carry (no per-window lists or formats)."""
        exclude = {"candidates": {"__all__": {"formats", "window_nll"}}}
        return self.model_dump(exclude=exclude)

    @property
    def allocation(self) -> Allocation:
        return Allocation(formats=next(c.formats for c in self.candidates if c.label == self.delivered))


@dataclass
class Candidate:
    label: str
    kind: Kind
    solution: Solution
    proxy: str


class RealQuality:
    """Quantize an allocation for real (``quantize``) on the original weights and measure its
    per-window NLL on ``windows``. The original weights are restored before every quantization."""

    def __init__(
        self, model: nn.Module, windows: torch.Tensor, quantize: Callable[[nn.Module, Allocation], object],
        batch_size: int = 8,
    ):  # fmt: skip
        self.model, self.windows, self.quantize, self.batch_size = model, windows, quantize, batch_size
        self.original = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.evaluations = 0

    def __call__(self, allocation: Allocation) -> Perplexity:
        self.restore()
        self.quantize(self.model, allocation)
        self.evaluations += 1
        return perplexity(self.model, self.windows, self.batch_size, progress=False)

    def imap(self, allocations: list[Allocation]) -> Iterator[Perplexity]:
        """Every allocation measured, in order, one after the other."""
        return (self(allocation) for allocation in allocations)

    def restore(self) -> None:
        self.model.load_state_dict(self.original)


class _Verifier:
    """One worker's share of a pooled verification: ``RealQuality`` on the worker's copy of the model and,
    once refinement asks, an ``AllocationEvaluator`` (``evaluator(model)``) on the same copy."""

    def __init__(
        self, model: nn.Module, windows: torch.Tensor, quantize: Callable[[nn.Module, Allocation], object],
        evaluator: Callable[[nn.Module], object], batch_size: int,
    ) -> None:  # fmt: skip
        self.quality = RealQuality(model, windows, quantize, batch_size)
        self.make_evaluator, self._evaluator = evaluator, None

    def measure(self, allocation: Allocation) -> Perplexity:
        """``allocation`` quantized for real on this worker's model and measured (as ``RealQuality``)."""
        if self._evaluator is not None:  # RealQuality restores the weights: the evaluator's swaps end here
            self._evaluator.restore()
            self._evaluator = None
        return self.quality(allocation)

    def evaluator(self):
        """The refinement's evaluator on this worker's model, built on the original weights when first asked."""
        if self._evaluator is None:
            self.quality.restore()
            self._evaluator = self.make_evaluator(self.quality.model)
        return self._evaluator


class PooledQuality:
    """``RealQuality`` spread over a pool of :class:`_Verifier` workers; the same results, in order."""

    def __init__(self, pool: Pool[_Verifier], windows: torch.Tensor) -> None:
        self.pool, self.windows, self.evaluations = pool, windows, 0

    def __call__(self, allocation: Allocation) -> Perplexity:
        return list(self.imap([allocation]))[0]

    def imap(self, allocations: list[Allocation]) -> Iterator[Perplexity]:
        self.evaluations += len(allocations)
        return self.pool.imap(_Verifier.measure, allocations)

    def restore(self) -> None:
        """Nothing to restore here: every worker restores its own model before each quantization."""


def candidates(problem: Problem, solution: Solution) -> list[Candidate]:
    """The mixed and uniform candidates at ``problem``'s budget, each allocation once (first label wins)."""
    pool = [Candidate(solution.solver, "mixed", solution, problem.proxy)]
    for proxy in PROXIES:
        try:
            exact = Knapsack().solve(replace(problem, proxy=proxy))
        except AutompError:  # a proxy the table did not measure (kl without --kl, old tables' outgrad)
            continue
        pool.append(Candidate(f"knapsack[{proxy}]", "mixed", exact, proxy))
    pool += uniform_candidates(problem) + recipe_candidates(problem)
    unique: dict[tuple, Candidate] = {}
    for candidate in pool:
        key = tuple(candidate.solution.choice)
        if key in unique:
            if candidate.kind == "uniform":  # an allocation that is also uniform counts as uniform
                unique[key] = replace(unique[key], kind="uniform", label=candidate.label)
            continue
        unique[key] = candidate
    return list(unique.values())


def uniform_candidates(problem: Problem) -> list[Candidate]:
    """The largest uniform format within the budget, and the uniform mix with the next larger one."""
    table, mask, bits = problem.table, problem.choices(), problem.table.bits_matrix()
    pinned = {i for i, layer in enumerate(table.layers) if layer.name in problem.pinned}
    rows = np.arange(len(table.layers))

    def uniform(j: int) -> np.ndarray | None:
        choice = np.array([int(np.flatnonzero(mask[i])[0]) if i in pinned else j for i in rows])
        return choice if mask[rows, choice].all() else None

    options = [(int(bits[rows, c].sum()), j, c) for j in range(len(table.formats)) if (c := uniform(j)) is not None]
    options.sort(key=lambda option: option[:2])
    fitting = [option for option in options if option[0] <= problem.budget_bits]
    if not fitting:
        return []
    total, low, choice = fitting[-1]
    found = [
        Candidate(f"uniform {table.formats[low]}", "uniform", _solution(problem, choice, "uniform"), problem.proxy)
    ]
    larger = [option for option in options if option[0] > total]
    if larger:
        high = larger[0][1]
        mixed = _spread(problem, choice, high, problem.budget_bits - total)
        if mixed is not None:
            share = bits[rows, mixed][mixed == high].sum() / bits[rows, mixed].sum()
            label = f"uniform mix {table.formats[low]}+{table.formats[high]} ({share:.0%} {table.formats[high]})"
            found.append(Candidate(label, "uniform", _solution(problem, mixed, "uniform mix"), problem.proxy))
    return found


def recipe_candidates(problem: Problem) -> list[Candidate]:
    """llama.cpp's own recipe (``gguf_recipes.py``) with the most bits within the budget, when the
    table holds its GGUF types: a baseline like uniform, since llama.cpp users would otherwise run it."""
    table, mask, bits = problem.table, problem.choices(), problem.table.bits_matrix()
    rows, options = np.arange(len(table.layers)), []
    for name in RECIPES:
        formats = recipe(name, table.layers) | problem.pinned
        if not all(fmt in table.formats for fmt in formats.values()):
            continue
        choice = np.array([table.format_index(formats[layer.name]) for layer in table.layers])
        tied = all(len({choice[i] for i in group}) == 1 for group in problem.groups())
        if tied and mask[rows, choice].all() and (total := int(bits[rows, choice].sum())) <= problem.budget_bits:
            options.append((total, name, choice))
    if not options:
        return []
    _, name, choice = max(options, key=lambda option: option[0])
    return [Candidate(f"llama.cpp {name}", "uniform", _solution(problem, choice, f"llama.cpp {name}"), problem.proxy)]


def _spread(problem: Problem, choice: np.ndarray, high: int, spare: int) -> np.ndarray | None:
    """Raise layer groups to format ``high``, spread evenly in model order (error diffusion), while
    ``spare`` bits last; None when no group can be raised."""
    mask, bits = problem.choices(), problem.table.bits_matrix()
    groups = [g for g in problem.groups() if all(mask[i, high] and choice[i] != high for i in g)]
    extra = [int(sum(bits[i, high] - bits[i, choice[i]] for i in g)) for g in groups]
    if not groups or sum(extra) <= 0:
        return None
    share, owed, raised = spare / sum(extra), 0.0, choice.copy()
    for group, cost in zip(groups, extra, strict=True):
        owed += share * cost
        if cost <= owed and cost <= spare:
            raised[group], owed, spare = high, owed - cost, spare - cost
    for group, cost in zip(groups, extra, strict=True):  # what rounding left over, first come first served
        if raised[group[0]] != high and cost <= spare:
            raised[group], spare = high, spare - cost
    return None if (raised == choice).all() else raised


def _solution(problem: Problem, choice: np.ndarray, solver: str) -> Solution:
    table = problem.table
    rows = np.arange(len(table.layers))
    loss = table.proxy_matrix(problem.proxy)[rows, choice].sum()
    avg = table.bits_matrix()[rows, choice].sum() / table.weight_count()
    return Solution(problem.allocation(choice), [int(j) for j in choice], float(avg), float(loss), solver)


def verify_delivery(
    problem: Problem,
    solution: Solution,
    measure: RealQuality | PooledQuality,
    *,
    text: str,
    method: str,
    refine_evaluator: Callable[[], object] | None = None,
    max_evals: int = 40,
    progress: bool = True,
) -> Verification:
    """Measure every candidate with ``measure`` and decide what to deliver (see the module docstring).

    ``refine_evaluator()`` builds the cached evaluator ``search.verify.refine`` needs (on the original
    weights); it is only called when the best mixed candidate does not beat uniform.
    """
    from automp.search.verify import refine

    began = time.perf_counter()
    pool = candidates(problem, solution)
    measured = measure.imap([candidate.solution.allocation for candidate in pool])
    bar = tqdm(measured, total=len(pool), desc="verify", disable=not progress, leave=False)
    results = {candidate.label: result for candidate, result in zip(pool, bar, strict=True)}
    uniform = [c for c in pool if c.kind == "uniform"]
    mixed = [c for c in pool if c.kind == "mixed"]
    best_uniform = min(uniform, key=lambda c: _mean(results[c.label]), default=None)
    best_mixed = min(mixed, key=lambda c: _mean(results[c.label]), default=None)

    def beats_uniform(label: str) -> bool:
        return best_uniform is None or _mean(results[label]) < _mean(results[best_uniform.label])

    refined_record, delivered = None, None
    if best_mixed is not None and beats_uniform(best_mixed.label):
        delivered, reason = best_mixed, "the best mixed allocation measured better than the best uniform one"
    elif best_mixed is not None and refine_evaluator is not None and max_evals > 0:
        measure.restore()
        with refine_evaluator() as evaluator:
            refined = refine(best_mixed.solution, problem, evaluator, max_evals)
        label = f"{best_mixed.label}+refine"
        if tuple(refined.choice) != tuple(best_mixed.solution.choice):
            pool.append(Candidate(label, "mixed", refined, best_mixed.proxy))
            results[label] = measure(refined.allocation)
        refined_record = {
            "from": best_mixed.label, "evaluations": refined.evaluations, "label": label,
            "start": refined.curve[0]["loss"], "best": min(row["loss"] for row in refined.curve),
        }  # fmt: skip
        if label in results and beats_uniform(label):
            delivered = pool[-1]
            reason = "the best mixed allocation lost to uniform; refined on the measured loss, it won"
    if delivered is None:
        delivered = best_uniform
        reason = (
            "no mixed allocation measured better than the best uniform one"
            + (", even after refinement" if refined_record else "")
            + ": uniform delivered"
        )
    if delivered is None:  # nothing uniform fits (pins) and nothing mixed: cannot happen with a solution
        raise AutompError("verification found no candidate to deliver")
    if best_uniform is None:
        reason = "no uniform format fits the budget: the best mixed allocation is delivered"

    measured = []
    for candidate in pool:
        result = results[candidate.label]
        delta = se = None
        if best_uniform is not None:
            delta, se = paired_delta(results[best_uniform.label], result)
        measured.append(
            Measured(
                label=candidate.label, kind=candidate.kind, proxy=candidate.proxy, avg_bits=candidate.solution.avg_bits,
                ppl=result.ppl,
                nll=_mean(result), delta_nll=delta, se=se, formats=candidate.solution.allocation.formats,
                window_nll=result.window_nll,
            )
        )  # fmt: skip
    final = next(m for m in measured if m.label == delivered.label)
    windows = measure.windows
    return Verification(
        text=text, windows=len(windows), seqlen=windows.shape[1], method=method, candidates=measured,
        best_uniform=best_uniform.label if best_uniform else None, best_mixed=best_mixed.label if best_mixed else None,
        refine=refined_record, delivered=delivered.label, delivered_kind=delivered.kind,
        delta_nll=final.delta_nll, se=final.se,
        significant=final.delta_nll is not None and abs(final.delta_nll) > 2 * (final.se or 0.0),
        reason=reason, seconds=round(time.perf_counter() - began, 3),
    )  # fmt: skip


def deliver(
    settings, problem: Problem, result, model: nn.Module, calib: torch.Tensor, held_out: tuple[torch.Tensor, str],
    progress: bool = True,
) -> tuple[Solution, Verification]:  # fmt: skip
    """``automp run``'s verification: the search's result (a ``SearchResult``) against the other candidates,
    each quantized with ``settings.method`` on ``model`` (its weights are restored afterwards), on
    ``settings.executor``'s workers."""
    from automp.quantize import GPTQConfig
    from automp.search.evaluator import AllocationEvaluator
    from automp.search.pooled import PooledEvaluator

    windows, text = held_out
    gptq = GPTQConfig.of(settings)
    quantize = partial(_quantize, settings.method, calib, gptq, settings.batch_size)
    cached = partial(
        AllocationEvaluator, windows=windows, formats=problem.allowed or problem.table.formats, calib=calib,
        method="gptq" if settings.method == "gptq" else "rtn",  # AWQ's last step is RTN of the scaled weights
        gptq=gptq, batch_size=settings.batch_size,
    )  # fmt: skip
    found = _solution(problem, _choice(problem, result.formats), result.solver)
    verify = partial(
        verify_delivery, problem, found, text=text, method=settings.method, max_evals=settings.max_evals,
        progress=progress,
    )  # fmt: skip
    with get_executor(settings.executor, settings.ray_address) as executor:
        if executor.remote:
            with executor.pool(partial(_Verifier, model, windows, quantize, cached, settings.batch_size)) as pool:
                refine_evaluator = partial(PooledEvaluator, pool, _Verifier.evaluator)
                record = verify(PooledQuality(pool, windows), refine_evaluator=refine_evaluator)
        else:
            measure = RealQuality(model, windows, quantize, settings.batch_size)
            try:
                record = verify(measure, refine_evaluator=partial(cached, model))
            finally:
                measure.restore()
    delivered = next(c for c in record.candidates if c.label == record.delivered)
    chosen = replace(problem, proxy=delivered.proxy)
    return _solution(chosen, _choice(problem, delivered.formats), delivered.label), record


def _quantize(
    method: str, calib: torch.Tensor, gptq: GPTQConfig, batch_size: int, model: nn.Module, allocation: Allocation
) -> None:
    """``RealQuality``'s quantizer: ``model`` quantized in place as ``automp run`` delivers it."""
    from automp.quantize import quantize_

    quantize_(model, allocation, method, calib, gptq=gptq, batch_size=batch_size, progress=False)


def _choice(problem: Problem, formats: dict[str, str]) -> np.ndarray:
    return np.array([problem.table.formats.index(formats[layer.name]) for layer in problem.table.layers])


def _mean(result: Perplexity) -> float:
    return float(np.mean(result.window_nll))
