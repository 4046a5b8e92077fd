"""Budgets as users state them: average bits per weight, a file size, or a device's memory at a
context length. Each resolves to the one budget every solver takes, the average stored bits of
the allocated layers (codes, scales and zero-points counted).

* ``target_bits``: the allocated layers store at most ``floor(bits x their weight count)`` bits.
* ``target_size``: the whole stored model (allocated layers packed, every other tensor in 16-bit)
  takes at most this many bytes. Each packed tensor rounds up to whole bytes (codes and
  zero-points: at most 2 bytes per layer), and that slack is reserved, so the model as stored fits.
* ``fit_memory``: the weights (as ``target_size``) plus the KV cache at ``context`` tokens x
  ``batch`` sequences plus a stated runtime ``overhead`` fit this memory. The KV cache is
  ``2 (K and V) x layers x kv heads x head dim x context x batch x 2 bytes`` (a 16-bit cache, standard
  multi-head or grouped-query attention), read from the model's config.

Sizes are written ``3.2GB`` (powers of 1000), ``24GiB`` (powers of 1024), ``512MB`` or a plain byte count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from automp.errors import AutompError

UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?(b?)\s*$", re.IGNORECASE)
KV_BYTES = 2  # a 16-bit KV cache
PACKING_SLACK_BYTES = 2  # per allocated layer: codes and zero-points each round up to a whole byte


def parse_size(text: str | int, option: str) -> int:
    """Bytes from ``3.2GB``, ``24GiB``, ``512MB`` or a plain number; ``option`` names the flag in errors."""
    match = _SIZE.match(str(text))
    if match is None:
        raise AutompError(f"{option} {text!r} is not a size: write e.g. 3.2GB, 24GiB, 512MB or a byte count")
    number, unit = float(match[1]), (match[2] or "").lower()
    size = math.floor(number * UNITS[unit])
    if size <= 0:
        raise AutompError(f"{option} must be positive, got {text!r}")
    return size


def kv_cache_bytes(config, context: int, batch: int) -> int:
    """Bytes of a 16-bit KV cache for ``batch`` sequences of ``context`` tokens (see the module docstring)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * context * batch * KV_BYTES


@dataclass(frozen=True)
class Budget:
    """Exactly one of ``target_bits``, ``target_size`` or ``fit_memory`` (bytes)."""

    target_bits: float | None = None
    target_size: int | None = None
    fit_memory: int | None = None
    context: int | None = None  # fit_memory: default the model's maximum positions
    batch: int = 1
    overhead: int = 0

    @classmethod
    def of(cls, settings) -> Budget:
        """The budget a run or search settings object states, checked."""
        given = [name for name in ("target_bits", "target_size", "fit_memory") if getattr(settings, name) is not None]
        if len(given) != 1:
            flags = " / ".join(f"--{name.replace('_', '-')}" for name in ("target_bits", "target_size", "fit_memory"))
            stated = ", ".join(f"--{name.replace('_', '-')}" for name in given) or "none"
            raise AutompError(f"give exactly one budget of {flags} (given: {stated})")
        if settings.target_bits is not None and not settings.target_bits > 0:
            raise AutompError(f"--target-bits must be positive, got {settings.target_bits:g}")
        if settings.context is not None and settings.context < 1:
            raise AutompError(f"--context must be at least 1, got {settings.context}")
        if settings.batch < 1:
            raise AutompError(f"--batch must be at least 1, got {settings.batch}")
        return cls(
            target_bits=settings.target_bits,
            target_size=None if settings.target_size is None else parse_size(settings.target_size, "--target-size"),
            fit_memory=None if settings.fit_memory is None else parse_size(settings.fit_memory, "--fit-memory"),
            context=settings.context,
            batch=settings.batch,
            overhead=0 if settings.fit_memory is None else _overhead(settings.overhead),
        )

    def model_bytes(self, config) -> int | None:
        """The most bytes the stored model may take (None for a bits budget)."""
        if self.target_size is not None:
            return self.target_size
        if self.fit_memory is None:
            return None
        return self.fit_memory - self.kv_cache_bytes(config) - self.overhead

    def kv_cache_bytes(self, config) -> int:
        """``fit_memory``'s KV cache at ``context`` (default: the model's maximum positions) x ``batch``."""
        context = self.context or getattr(config, "max_position_embeddings", None)
        if not context:
            raise AutompError("--fit-memory needs --context: the model's config states no maximum positions")
        return kv_cache_bytes(config, context, self.batch)

    def average_bits(self, weight_count: int, dense_bytes: int, layers: int, config=None) -> float:
        """The average stored bits per allocated weight this budget allows."""
        if self.target_bits is not None:
            return self.target_bits
        cap = self.model_bytes(config)
        usable = cap - dense_bytes - PACKING_SLACK_BYTES * layers
        if usable <= 0:
            raise AutompError(
                f"the budget leaves {cap / 1e6:.3f} MB for the model, but its unquantized tensors alone "
                f"(embeddings, norms, head) take {dense_bytes / 1e6:.3f} MB"
            )
        return math.floor(usable * 8 / weight_count * 1e9) / 1e9  # rounded down: the floor keeps the cap

    def describe(self, config=None) -> dict:
        """The budget as stated and the byte cap it implies, for metrics."""
        stated = {k: v for k, v in vars(self).items() if v is not None and not (k in ("batch", "overhead") and not v)}
        if self.target_bits is None:
            stated["model_bytes"] = self.model_bytes(config)
        if self.fit_memory is not None:
            stated["kv_cache_bytes"] = self.kv_cache_bytes(config)
        return stated


def _overhead(text: str | int) -> int:
    if str(text).strip() in ("0", "0B", "0b"):
        return 0
    return parse_size(text, "--overhead")
