"""Training state files of the learned solvers: atomic writes, safe loads, and a settings check.

A state file is one ``torch.save`` of plain containers and tensors (policy and optimizer state
dicts, RNG states, the learning curve). It is written to a temporary file and renamed into place,
so an interrupted write never leaves a half-written state behind. It is loaded with
``weights_only=True``, so a state file can never run code. The learning curve is also written next
to it as JSON, for people and plots.

Every state file records a *fingerprint* of the settings that produced it. Resuming with different
settings would silently mix two runs, so it is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from automp.errors import AutompError


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (torch.save), and its ``curve`` as ``<path>.curve.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, lambda handle: torch.save(state, handle))
    if "curve" in state:
        _atomic(curve_path(path), lambda handle: handle.write(json.dumps(state["curve"], indent=1).encode()))


def load_state(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The state saved at ``path``, or None if there is none; an error if other settings wrote it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # a corrupt or foreign file surfaces as many different exception types
        raise AutompError(f"could not read the training state {path}: {err}") from err
    if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint:
        raise AutompError(
            f"the training state {path} was written with other settings (solver options, seed, budget or "
            "model); delete it or give another state path"
        )
    return state


def curve_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".curve.json")


def _atomic(path: Path, write) -> None:
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            write(handle)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
