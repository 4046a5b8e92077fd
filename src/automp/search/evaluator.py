"""Real quality of an allocation, fast enough to call hundreds of times.

Every inventory layer is quantized in every candidate format once, up front, and its dequantized
weight is cached. Evaluating an allocation then only copies cached tensors into the model and runs
one forward pass over a few held-out windows. The result is perplexity, or the mean per-token
``KL(full || quantized)`` against full-precision logits that are computed once and cached.

How the cache relates to ``quantize_``:

* ``method="rtn"``: RTN quantizes each layer on its own, so the cached weights are exactly what
  ``quantize_`` produces.
* ``method="gptq"``: each layer is GPTQ-quantized with the Hessian of its *full-precision* inputs,
  which are the same for every allocation. The cache is then independent of the allocation. The
  deployed model (``quantize_``) computes Hessians from already quantized upstream blocks, so its
  numbers come out slightly different.

The token embedding (role ``embed``) is cached with RTN whatever the method, as ``quantize_`` quantizes
it. The output head and the embedding are cached when the evaluator is built with them, or on the first
allocation that names them (so callers need not know whether a table allocates them).

Layers in a 16-bit format keep the model's own weights. Other tensors (embeddings, norms) are not
rounded to 16 bits. The all-16-bit allocation therefore reproduces the loaded model's perplexity
exactly, and every number measures only the damage the allocated layers do.

Memory: one copy of every allocated layer's weight per format, plus the original weights. With
KL, the cached reference log-probabilities take windows x seqlen x vocab fp32 values.

The evaluator owns the model's allocated weights while it is in use. ``restore()``, or leaving a
``with`` block, puts the original weights back.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.execution.blocks import capture_block_inputs, hessian_hooks, propagate, run_block
from automp.formats import Format, get_format
from automp.model import (
    Inventory,
    LayerInfo,
    decoder_blocks,
    inventory,
    inventory_for,
    linear_weight,
    set_linear_weight,
)
from automp.quantize import GPTQConfig
from automp.quantizers.gptq import gptq_quantize
from automp.quantizers.rtn import rtn_quantize

METRICS = ("ppl", "kl")
EVAL_BATCH = 8  # windows per forward pass
ATTENTION_BATCH = 2  # windows per forward when attention maps are returned (they take T^2 memory per head)


@dataclass
class Measurement:
    """One evaluation: perplexity always; KL and the attention-entropy shift when asked for."""

    ppl: float
    kl: float | None = None  # mean per-token KL(full || quantized)
    attn_shift: float | None = None  # mean |H_q - H_full| / mean H_full over layers x heads


class AllocationEvaluator:
    """Perplexity or KL of ``model`` under any allocation over ``formats``, by swapping cached weights.

    ``windows``: (n, seqlen) held-out evaluation windows. They must not overlap the calibration text.
    ``calib``: (m, seqlen) calibration windows, needed for ``method="gptq"``.
    Calling the evaluator returns the chosen ``metric`` (lower is better). ``baseline`` is that metric
    for the full-precision model: its perplexity, or 0 for KL.
    """

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor,
        formats: list[str] | list[Format],
        *,
        calib: torch.Tensor | None = None,
        method: str = "rtn",
        metric: str = "ppl",
        include_lm_head: bool = False,
        include_embeddings: bool = False,
        gptq: GPTQConfig | None = None,
        batch_size: int = EVAL_BATCH,
        progress: bool = False,
    ):
        if metric not in METRICS:
            raise AutompError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
        if method not in ("rtn", "gptq"):
            raise AutompError(f"unknown method {method!r}: use rtn or gptq")
        if windows.dim() != 2 or len(windows) == 0:
            raise AutompError("the evaluator needs a non-empty (windows, seqlen) tensor of evaluation tokens")
        if method == "gptq" and (calib is None or len(calib) == 0):
            raise AutompError("GPTQ needs calibration windows (--calib) to pre-quantize the layers")
        self.model = model
        self.windows = windows
        self.metric = metric
        self.batch_size = batch_size
        self.progress = progress
        self.evaluations = 0
        self.inventory: Inventory = inventory(
            model, include_lm_head=include_lm_head, include_embeddings=include_embeddings
        )
        self.formats = [get_format(f) if isinstance(f, str) else f for f in formats]
        if not self.formats:
            raise AutompError("the evaluator needs at least one format")
        self._modules = {layer.name: model.get_submodule(layer.name) for layer in self.inventory.layers}
        self._original = {name: linear_weight(m).detach().clone() for name, m in self._modules.items()}
        self._current = dict.fromkeys(self._modules, "")  # "" = the original weight
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._method, self._calib, self._gptq = method, calib, gptq or GPTQConfig()
        self._prequantize(self.inventory.layers)
        self._reference_logprobs: torch.Tensor | None = None
        self._reference_entropy: torch.Tensor | None = None
        self._supports_attention: bool | None = None
        self.fp = self._forward(kl=metric == "kl", count=False)  # the full-precision model on these windows
        self.baseline = self.fp.ppl if metric == "ppl" else 0.0

    # ---- public ----------------------------------------------------------------------------------

    def __call__(self, allocation: Allocation) -> float:
        result = self.measure(allocation, kl=self.metric == "kl")
        return result.ppl if self.metric == "ppl" else result.kl

    def measure(self, allocation: Allocation, *, kl: bool = False, attention: bool = False) -> Measurement:
        """Perplexity of ``allocation`` and, when asked for, KL and attention-entropy shift (one forward)."""
        self.apply(allocation)
        return self._forward(kl=kl, attention=attention, count=True)

    def apply(self, allocation: Allocation) -> None:
        """Put the cached weights of ``allocation`` into the model (only layers that change are copied)."""
        self._admit(allocation)
        allocation.check(self.inventory)
        for name, module in self._modules.items():
            fmt = allocation.format_of(name)
            key = fmt.name if fmt.quantized else ""
            if self._current[name] == key:
                continue
            if key and (name, key) not in self._cache:
                cached = ", ".join(f.name for f in self.formats)
                raise AutompError(f"format {fmt.name} was not pre-quantized by the evaluator (it has: {cached})")
            set_linear_weight(module, self._cache[(name, key)] if key else self._original[name])
            self._current[name] = key

    def restore(self) -> None:
        """Put the original weights back."""
        for name, module in self._modules.items():
            if self._current[name]:
                set_linear_weight(module, self._original[name])
                self._current[name] = ""

    def __enter__(self) -> AllocationEvaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    @property
    def supports_attention(self) -> bool:
        """Whether the model can return attention probabilities (eager attention, ``output_attentions``)."""
        if self._supports_attention is None:
            try:
                with self._eager_attention():
                    with torch.no_grad():
                        out = self.model(input_ids=self.windows[:1, :8].to(self._device), output_attentions=True)
                self._supports_attention = bool(out.attentions) and all(a is not None for a in out.attentions)
            except Exception:  # remote-code or exotic architectures: anything can go wrong here
                self._supports_attention = False
        return self._supports_attention

    # ---- the forward pass ---------------------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _forward(self, *, kl: bool = False, attention: bool = False, count: bool = True) -> Measurement:
        if kl and self._reference_logprobs is None:
            self._reference_logprobs = torch.cat(self._full_precision(lambda logits, _attn: F.log_softmax(logits, -1)))
        if attention and self._reference_entropy is None:
            if not self.supports_attention:
                raise AutompError(
                    f"{type(self.model).__name__} does not return attention probabilities; "
                    "set the attention-entropy weight to 0"
                )
            entropies = self._full_precision(lambda _logits, attn: _attention_entropy(attn), attention=True)
            self._reference_entropy = torch.stack(entropies).sum(0) / len(self.windows)
        nll: list[float] = []
        kls: list[torch.Tensor] = []
        entropies: list[torch.Tensor] = []
        for start, ids, logits, attn in self._batches(attention):
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            nll.extend(loss.view(len(ids), -1).mean(dim=1).tolist())
            if kl:
                ref = self._reference_logprobs[start : start + len(ids)]
                kls.append(F.kl_div(F.log_softmax(logits, -1), ref, log_target=True, reduction="none").sum(-1))
            if attention:
                entropies.append(_attention_entropy(attn))
        if count:
            self.evaluations += 1
        result = Measurement(math.exp(sum(nll) / len(nll)))
        if kl:
            result.kl = torch.cat([k.flatten() for k in kls]).mean().item()
        if attention:
            ref = self._reference_entropy
            entropy = torch.stack(entropies).sum(0) / len(self.windows)
            shift = (entropy - ref).abs().mean() / ref.mean().clamp(min=1e-12)
            result.attn_shift = shift.item()
        return result

    def _batches(self, attention: bool):
        """(first window, ids, float logits, attention probabilities or None) per batch of windows."""
        size = min(self.batch_size, ATTENTION_BATCH) if attention else self.batch_size
        starts = range(0, len(self.windows), size)
        with self._eager_attention() if attention else contextlib.nullcontext():
            for start in tqdm(starts, desc="evaluate", disable=not self.progress, leave=False):
                ids = self.windows[start : start + size].to(self._device)
                out = self.model(input_ids=ids, use_cache=False, output_attentions=attention)
                yield start, ids, out.logits.float(), (out.attentions if attention else None)

    def _full_precision(self, reduce, attention: bool = False) -> list[torch.Tensor]:
        """``reduce(logits, attentions)`` per batch with the original weights, the current ones restored after."""
        with self._original_weights():
            return [reduce(logits, attn) for _start, _ids, logits, attn in self._batches(attention)]

    @contextlib.contextmanager
    def _original_weights(self):
        """The original weights inside the ``with`` block; the current ones are put back after it."""
        current = dict(self._current)
        self.restore()
        try:
            yield
        finally:
            for name, key in current.items():
                if key:
                    set_linear_weight(self._modules[name], self._cache[(name, key)])
                    self._current[name] = key

    def _eager_attention(self):
        return _AttentionImplementation(self.model, "eager")

    # ---- the cache ------------------------------------------------------------------------------------

    def _admit(self, allocation: Allocation) -> None:
        """Cache the output head / token embedding the first time an allocation names them (when every layer
        cached so far is named too; otherwise ``Allocation.check`` reports the mismatch)."""
        wanted = inventory_for(self.model, allocation.formats)
        new = [layer for layer in wanted.layers if layer.name not in self._modules]
        if not new or not set(self._modules) <= {layer.name for layer in wanted.layers}:
            return
        self.inventory = wanted
        for layer in new:
            self._modules[layer.name] = module = self.model.get_submodule(layer.name)
            self._original[layer.name] = linear_weight(module).detach().clone()
            self._current[layer.name] = ""
        self._prequantize(new)

    @torch.no_grad()
    def _prequantize(self, layers: list[LayerInfo]) -> None:
        quantized = [fmt for fmt in self.formats if fmt.quantized]
        for layer in layers:
            for fmt in quantized:
                fmt.check_shape(layer.out_features, layer.in_features)
        if not quantized:
            return
        # RTN for every layer under method rtn, and for the token embedding (block -1, no Hessian) always
        rtn = [layer.name for layer in layers if self._method == "rtn" or layer.block < 0]
        for name in tqdm(rtn, desc="rtn cache", disable=not self.progress, leave=False):
            for fmt in quantized:
                self._store(name, fmt, rtn_quantize(self._original[name], fmt).dequantize())
        names = {layer.name for layer in layers} - set(rtn)
        if not names:
            return
        with self._original_weights():
            for name, hessian in self._full_precision_hessians(self._calib, names):
                for fmt in quantized:
                    qweight = gptq_quantize(self._original[name], hessian, fmt, **vars(self._gptq))
                    self._store(name, fmt, qweight.dequantize())

    def _store(self, name: str, fmt: Format, weight: torch.Tensor) -> None:
        original = self._original[name]
        self._cache[(name, fmt.name)] = weight.to(device=original.device, dtype=original.dtype)

    def _full_precision_hessians(self, calib: torch.Tensor, names: set[str]):
        """(layer name, input Hessian) of the layers ``names``, block by block, every block fed full-precision
        inputs (the caller holds the original weights in the model).

        Only one block's activations and Hessians are held at a time, as in ``quantize_``.
        """
        model, blocks = self.model, decoder_blocks(self.model)
        block_of = {layer.name: layer.block for layer in self.inventory.layers if layer.name in names}
        todo = blocks if any(0 <= b < len(blocks) for b in block_of.values()) else []  # the head alone: no blocks
        inputs = capture_block_inputs(model, blocks[0], calib, self.batch_size) if todo else []
        for index, block in enumerate(tqdm(todo, desc="gptq cache", disable=not self.progress, leave=False)):
            here = [name for name, b in block_of.items() if b == index]
            with hessian_hooks({name: self._modules[name] for name in here}) as hessians:
                outputs = list(run_block(block, inputs))
            yield from hessians.items()
            inputs = propagate(inputs, outputs)
        head = [name for name, b in block_of.items() if b == len(blocks)]  # lm_head, after the final norm
        if head:
            with hessian_hooks({head[0]: self._modules[head[0]]}) as hessians:
                for batch in calib.split(self.batch_size):
                    model(input_ids=batch.to(self._device), use_cache=False)
            yield from hessians.items()


def _attention_entropy(attentions) -> torch.Tensor:
    """(layers, heads) entropy of each head's attention distribution, mean over queries, summed over windows."""
    per_layer = [torch.special.entr(a.float()).sum(-1).mean(dim=2).sum(dim=0) for a in attentions]
    return torch.stack(per_layer)


class _AttentionImplementation:
    """Switch the model's attention implementation inside a ``with`` block (eager returns probabilities)."""

    def __init__(self, model: nn.Module, implementation: str):
        self.model, self.implementation = model, implementation

    def __enter__(self) -> None:
        self.previous = getattr(self.model.config, "_attn_implementation", None)
        if self.previous != self.implementation:
            self.model.set_attn_implementation(self.implementation)

    def __exit__(self, *exc) -> None:
        if self.previous is not None and self.previous != self.implementation:
            self.model.set_attn_implementation(self.previous)
