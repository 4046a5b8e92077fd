"""Solver names -> solver classes. Registering a solver is one line in ``SOLVERS``.

Entries are ``"module:Class"`` paths imported on first use, so naming the cheap deterministic
solvers never imports the heavy learned ones (torch policies and the like).
"""

from __future__ import annotations

import importlib
import inspect

from automp.errors import AutompError
from automp.search.problem import Solver

SOLVERS: dict[str, str] = {
    "knapsack": "automp.search.knapsack:Knapsack",
    "greedy": "automp.search.greedy:Greedy",
    "quantile": "automp.search.quantile:Quantile",
    "reinforce": "automp.search.reinforce:Reinforce",  # these three measure real quality (--eval)
    "ppo": "automp.search.ppo:PPOSolver",
    "anneal": "automp.search.anneal:Anneal",
}


def solver_names() -> list[str]:
    return list(SOLVERS)


def get_solver(name: str, **options) -> Solver:
    """A fresh solver; ``options`` go to its constructor (e.g. ``max_loss`` for greedy)."""
    if name not in SOLVERS:
        raise AutompError(f"unknown solver {name!r}: use one of {', '.join(SOLVERS)}")
    module, cls_name = SOLVERS[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise AutompError(f"solver {name} has no option {unknown[0]!r} (it takes: {', '.join(accepted) or 'none'})")
    return cls(**options)
