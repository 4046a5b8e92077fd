"""Training styles of a switchable model: which bitmaps one optimizer step trains, and towards what.

A style is a function ``(step, formats, layers, generator, mixes) -> list[Pass]``; the training loop
(``train.py``) runs the passes in order, adds their losses' gradients and takes one optimizer step. A
pass's teacher is the full-precision model (``teacher=None``) or an earlier pass of the same step.

* ``spnet`` (SP-Nets' sandwich): all-highest, all-lowest and ``mixes`` random per-layer mixes, every step.
* ``cyclic``: one uniform bitmap per step, cycling from the lowest format to the highest.
* ``instantnet`` (cascade distillation): every uniform bitmap from the highest down, each taught by the
  next higher one (the highest by the full-precision model), with cross-entropy plus KL.

Formats are ordered from low to high bits (``SwitchableSpec.formats``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from automp.errors import AutompError


@dataclass
class Pass:
    bitmap: dict[str, str]  # layer -> format
    teacher: int | None = None  # index of an earlier pass of the step; None: the full-precision model
    cross_entropy: bool = False  # add the next-token cross-entropy to the distillation (instantnet)


def _uniform(layers: list[str], fmt: str) -> dict[str, str]:
    return dict.fromkeys(layers, fmt)


def spnet(step: int, formats: list[str], layers: list[str], generator: torch.Generator, mixes: int) -> list[Pass]:
    passes = [Pass(_uniform(layers, formats[-1])), Pass(_uniform(layers, formats[0]))]
    for _ in range(mixes):
        picks = torch.randint(len(formats), (len(layers),), generator=generator).tolist()
        passes.append(Pass({name: formats[i] for name, i in zip(layers, picks, strict=True)}))
    return passes


def cyclic(step: int, formats: list[str], layers: list[str], generator: torch.Generator, mixes: int) -> list[Pass]:
    return [Pass(_uniform(layers, formats[step % len(formats)]))]


def instantnet(step: int, formats: list[str], layers: list[str], generator: torch.Generator, mixes: int) -> list[Pass]:
    high_to_low = formats[::-1]
    return [Pass(_uniform(layers, fmt), None if i == 0 else i - 1, True) for i, fmt in enumerate(high_to_low)]


Style = Callable[[int, list[str], list[str], torch.Generator, int], list[Pass]]
STYLES: dict[str, Style] = {"spnet": spnet, "cyclic": cyclic, "instantnet": instantnet}


def get_style(name: str) -> Style:
    if name not in STYLES:
        raise AutompError(f"unknown training style {name!r}: use one of {', '.join(STYLES)}")
    return STYLES[name]
