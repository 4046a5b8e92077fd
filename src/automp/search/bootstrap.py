"""How much an allocation owes to the particular calibration windows: the bootstrap.

Each replicate draws the calibration windows again with replacement (a multinomial draw of counts,
``numpy.random.default_rng(seed)``: the same seed gives the same replicates), re-weights the
per-window proxy terms (:class:`WindowCosts`) into a replicate table, and solves it with the exact
knapsack under the same budget, allowed formats, pins and ties. Nothing is profiled again.

Reported (:class:`BootstrapResult`, saved as ``BOOTSTRAP_FILE`` in a run directory):

* per layer, the full-data solution's format, the share of replicates that choose the same format
  (its stability) and how often each format was chosen;
* the predicted loss of the full-data allocation under every replicate (mean and the 2.5 / 97.5 %
  percentiles: a 95 % confidence interval), and the replicates' own optimal predicted loss.

The full-data allocation is the knapsack's on the table, or the ``reference`` allocation given (e.g.
the one a run delivered after verification).

Proxies: ``hessian``, ``fisher`` and ``outgrad`` from their per-window terms; ``weight`` is data-free,
so every replicate equals the table (stability 1 by construction). ``grad`` and ``kl`` cannot be
bootstrapped (see ``automp.sensitivity.windows``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.io import artefact_path, read_json_artefact
from automp.search.knapsack import Knapsack
from automp.search.problem import Problem
from automp.sensitivity.table import PROXIES, SensitivityTable
from automp.sensitivity.windows import WINDOW_PROXIES, WindowCosts

BOOTSTRAP_FILE = "bootstrap.json"
BOOTSTRAP_PROXIES = ("weight", *WINDOW_PROXIES)
NOT_BOOTSTRAPPABLE = {
    "grad": "its |mean gradient * dW| does not split into per-window terms",
    "kl": "it is measured on separate windows, not on the calibration windows",
}


class LayerStability(BaseModel):
    name: str
    format: str  # the full-data allocation's format
    stability: float  # share of replicates choosing that same format
    counts: dict[str, int]  # format -> replicates choosing it (formats never chosen left out)


class Interval(BaseModel):
    mean: float
    low: float  # 2.5 % percentile over replicates
    high: float  # 97.5 % percentile


class BootstrapResult(BaseModel):
    n: int  # replicates
    seed: int
    proxy: str
    target_bits: float
    windows: int  # calibration windows each replicate draws with replacement
    predicted_loss: float  # the full-data allocation's predicted loss under the table
    layers: list[LayerStability]
    mean_stability: float
    stable_share: float  # share of layers whose format every replicate keeps
    allocation_loss: Interval  # the full-data allocation's predicted loss under each replicate
    optimal_loss: Interval  # each replicate's own optimal predicted loss
    allocation_losses: list[float]  # per replicate, as summarised in allocation_loss
    optimal_losses: list[float]

    def summary(self) -> dict:
        """The headline figures, JSON-ready (no per-layer or per-replicate lists)."""
        unstable = [layer.name for layer in self.layers if layer.stability < 1]
        return {
            "n": self.n,
            "seed": self.seed,
            "proxy": self.proxy,
            "target_bits": self.target_bits,
            "windows": self.windows,
            "predicted_loss": self.predicted_loss,
            "mean_stability": self.mean_stability,
            "stable_share": self.stable_share,
            "allocation_loss": self.allocation_loss.model_dump(),
            "optimal_loss": self.optimal_loss.model_dump(),
            "unstable_layers": unstable,
        }

    def save(self, path: Path) -> Path:
        """Write to ``path`` (a directory gets ``BOOTSTRAP_FILE``)."""
        path = artefact_path(path, BOOTSTRAP_FILE)
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> BootstrapResult:
        return read_json_artefact(cls, artefact_path(path, BOOTSTRAP_FILE), "bootstrap result")


def bootstrap(
    problem: Problem, windows: WindowCosts, n: int, seed: int = 0, reference: Allocation | None = None
) -> BootstrapResult:
    """Re-solve ``problem`` on ``n`` resamples of the calibration windows; see the module docstring."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise AutompError(f"--bootstrap needs a positive number of replicates, got {n}")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(windows.windows, np.full(windows.windows, 1 / windows.windows), size=int(n))
    return resolve(problem, windows, counts / windows.windows, seed, reference)


def check_bootstrappable(proxy: str) -> None:
    """One clear error for a proxy the bootstrap cannot re-weight."""
    if proxy in BOOTSTRAP_PROXIES:
        return
    why = NOT_BOOTSTRAPPABLE.get(proxy, "it is not a proxy automp knows")
    raise AutompError(f"proxy {proxy!r} cannot be bootstrapped ({why}): use one of {', '.join(BOOTSTRAP_PROXIES)}")


def resolve(
    problem: Problem,
    windows: WindowCosts,
    weights: np.ndarray,
    seed: int = 0,
    reference: Allocation | None = None,
) -> BootstrapResult:
    """The bootstrap for given window weights (replicates, windows), each row summing to 1."""
    check_bootstrappable(problem.proxy)
    windows.check(problem.table)
    table = problem.table
    solver = Knapsack()
    choice = solver.solve(problem).choice if reference is None else _choice(table, reference)
    rows = np.arange(len(table.layers))
    choices, allocation_losses, optimal_losses = [], [], []
    for w in np.asarray(weights, dtype=np.float64):
        matrix = table.proxy_matrix("weight") if problem.proxy == "weight" else windows.proxy_matrix(problem.proxy, w)
        solution = solver.solve(dataclasses.replace(problem, table=_with_proxy(table, problem.proxy, matrix)))
        choices.append(solution.choice)
        allocation_losses.append(float(matrix[rows, choice].sum()))
        optimal_losses.append(solution.predicted_loss)
    chosen = np.array(choices)  # (replicates, layers)
    layers = []
    for i, layer in enumerate(table.layers):
        picked, times = np.unique(chosen[:, i], return_counts=True)
        layers.append(
            LayerStability(
                name=layer.name,
                format=table.formats[choice[i]],
                stability=float(np.mean(chosen[:, i] == choice[i])),
                counts={table.formats[j]: int(c) for j, c in zip(picked, times, strict=True)},
            )
        )
    stability = np.array([layer.stability for layer in layers])
    return BootstrapResult(
        n=len(chosen),
        seed=seed,
        proxy=problem.proxy,
        target_bits=problem.target_bits,
        windows=windows.windows,
        predicted_loss=float(table.proxy_matrix(problem.proxy)[rows, choice].sum()),
        layers=layers,
        mean_stability=float(stability.mean()),
        stable_share=float(np.mean(stability == 1.0)),
        allocation_loss=_interval(allocation_losses),
        optimal_loss=_interval(optimal_losses),
        allocation_losses=allocation_losses,
        optimal_losses=optimal_losses,
    )


def _choice(table: SensitivityTable, reference: Allocation) -> list[int]:
    """The reference allocation as one format index per table layer."""
    missing = [layer.name for layer in table.layers if layer.name not in reference.formats]
    if missing:
        raise AutompError(f"the reference allocation has no format for {missing[0]}")
    return [table.format_index(reference.formats[layer.name]) for layer in table.layers]


def _with_proxy(table: SensitivityTable, proxy: str, matrix: np.ndarray) -> SensitivityTable:
    """A copy of ``table`` whose ``proxy`` costs are ``matrix`` (layers, formats): what a solver reads."""
    field, names, costs = PROXIES[proxy], table.formats, {}
    for layer, row in zip(table.layers, matrix, strict=True):
        own = table.costs[layer.name]
        costs[layer.name] = {f: own[f].model_copy(update={field: float(v)}) for f, v in zip(names, row, strict=True)}
    return table.model_copy(update={"costs": costs})


def _interval(values: list[float]) -> Interval:
    low, high = np.percentile(values, [2.5, 97.5])
    return Interval(mean=float(np.mean(values)), low=float(low), high=float(high))
