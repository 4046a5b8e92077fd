"""Reading and writing artefacts safely: check an output path before any work, stage it, and move it
into place whole; find a stage's artefact by its file or its directory, and read it with one clear error.

Every command that writes uses these, so a bad ``--out`` fails in one line before a model is loaded,
and a failure half-way never leaves a partial file or directory behind. Nothing here imports from
the rest of automp except its error type.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from automp.errors import AutompError


def check_output(path: Path, kind: Literal["dir", "file"] = "dir", option: str = "--out") -> None:
    """Refuse, in one line, an output ``path`` that could not be written as a ``kind`` once the work is done.

    An existing output of the right kind is fine (it is replaced); missing parent directories are fine
    (they are created). The nearest existing ancestor must be a writable directory.
    """
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise AutompError(f"{option} {path} is an existing file, but a directory is written there; choose another path")
    if kind == "file" and path.is_dir():
        raise AutompError(f"{option} {path} is an existing directory, but a file is written there; choose a file path")
    parent = path.absolute().parent
    while not parent.exists():  # the first ancestor that exists is where the output gets created
        parent = parent.parent
    if not parent.is_dir():
        raise AutompError(f"{option} {path} cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AutompError(f"{option} {path} cannot be created: no permission to write in {parent}")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a fresh staging directory; move it to ``out`` on success, delete it on failure."""
    out = Path(out)
    staging = out.parent / f".{out.name}.partial"
    _remove(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def write_file_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place: never a partial file."""
    path = Path(path)
    staging = path.parent / f".{path.name}.partial"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.write_text(text)
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)


def artefact_path(path: Path, name: str) -> Path:
    """``path`` itself, or ``path / name`` when ``path`` is a directory (where a stage saves ``name``)."""
    path = Path(path)
    return path / name if path.is_dir() else path


def read_json_artefact(cls, path: Path, what: str):
    """The pydantic artefact ``cls`` from its JSON file; one clear error when it is missing or invalid."""
    try:
        return cls.model_validate_json(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise AutompError(f"could not read the {what} {path}: {err}") from err


def _remove(path: Path) -> None:
    """Delete a leftover from an earlier failed run, whether a directory or a file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
