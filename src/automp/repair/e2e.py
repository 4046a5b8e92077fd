"""End-to-end scale tuning (EfficientQAT's E2E-QP): the codes stay, only the scales train, on the whole model.

Every integer or codebook layer's weight is ``q · s``: ``q`` its frozen code values (``code − zero``,
or the codebook level), ``s`` its per-group scale, trained as a factor on the stored one and rounded
to fp16 in the forward (straight through). The loss is the language-model loss on the training
windows (``lm``) or the KL divergence to the full-precision model's next-token distributions
(``kl``, which needs the reference model). AdamW, cosine decay; the last windows are held out,
validated a few times per epoch, and the best scales (the stored ones included) are kept, so the
held-out loss never ends above where it started. Codes, zero-points, GGUF layers and ``+rN``
corrections are untouched; the stored bytes do not change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from automp.errors import AutompError
from automp.formats import GroupParams, decode
from automp.quantizers.qweight import CorrectedWeight, QuantizedWeight, QWeight
from automp.repair.schedules import cosine_lr

LOSSES = ("kl", "lm")


@dataclass
class E2EConfig:
    epochs: float = 1.0
    lr: float = 1e-3  # on each scale's factor (1 = the stored scale)
    loss: str = "kl"
    batch_size: int = 4
    val_fraction: float = 0.125
    validations_per_epoch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise AutompError(f"unknown E2E-QP loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.epochs <= 0:
            raise AutompError("E2E-QP needs a positive number of epochs")


@dataclass
class E2ERecord:
    steps: int
    layers: int
    loss_start: float  # held-out loss of the stored scales
    loss_end: float
    kept_start: bool
    seconds: float


class _Scales(nn.Module):
    """One layer's frozen code values and trainable scale factor."""

    def __init__(self, qweight: QuantizedWeight) -> None:
        super().__init__()
        rows, groups, g = qweight._grouped()
        unit = GroupParams(torch.ones(rows, groups), None if qweight.zero is None else qweight.zero.float())
        self.register_buffer("q", decode(qweight.fmt, qweight.codes.long().reshape(rows, groups, g), unit))
        self.register_buffer("scale0", qweight.scale.float().reshape(rows, groups, 1))
        self.factor = nn.Parameter(torch.ones_like(self.scale0))
        self.qweight = qweight

    def scale(self) -> torch.Tensor:
        s = (self.scale0 * self.factor).clamp(min=1e-6)
        return s + (s.detach().half().float() - s).detach()

    def forward(self) -> torch.Tensor:
        return (self.q * self.scale()).flatten(1)

    @torch.no_grad()
    def freeze(self) -> QuantizedWeight:
        q = self.qweight
        return QuantizedWeight(q.fmt, q.codes, self.scale().reshape(q.scale.shape).half(), q.zero)


def e2e_scales_(
    model: nn.Module,
    qweights: dict[str, QWeight],
    windows: torch.Tensor,
    config: E2EConfig,
    reference: nn.Module | None = None,
    progress: bool = True,
) -> E2ERecord:
    """Tune the scales of ``model``'s quantized layers end to end, in place (``qweights`` updated)."""
    if config.loss == "kl" and reference is None:
        raise AutompError("E2E-QP on KL needs the full-precision model")
    start = time.perf_counter()
    layers = {name: q for name, q in qweights.items() if _tunable(q)}
    scales = {name: _Scales(q.base if isinstance(q, CorrectedWeight) else q) for name, q in layers.items()}
    corrected = {name: q for name, q in layers.items() if isinstance(q, CorrectedWeight)}
    corrections = {name: q.correction.delta().to(q.base.scale.device) for name, q in corrected.items()}
    batches = list(windows.split(config.batch_size))
    if len(batches) < 2:
        raise AutompError(f"E2E-QP needs at least {2 * config.batch_size} windows")
    held_out = max(1, round(len(batches) * config.val_fraction))
    train, val = batches[:-held_out], batches[-held_out:]
    device = next(model.parameters()).device

    dtypes = {name: model.get_submodule(name).weight.dtype for name in scales}  # a bf16/fp16 model computes in its own

    def weights() -> dict[str, torch.Tensor]:
        return {f"{name}.weight": (s() + corrections.get(name, 0)).to(dtypes[name]) for name, s in scales.items()}

    def loss_on(ids: torch.Tensor, params: dict[str, torch.Tensor] | None) -> torch.Tensor:
        ids = ids.to(device)
        logits = functional_call(model, params or {}, (), {"input_ids": ids, "use_cache": False}).logits.float()
        if config.loss == "lm":
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        with torch.no_grad():
            ref = F.log_softmax(reference(input_ids=ids, use_cache=False).logits.float(), -1)
        return F.kl_div(F.log_softmax(logits, -1), ref, log_target=True, reduction="none").sum(-1).mean()

    def validate(params: dict[str, torch.Tensor] | None = None) -> float:
        with torch.no_grad():
            return sum(loss_on(ids, params).item() for ids in val) / len(val)

    model.requires_grad_(False)
    loss_start = validate()
    steps = max(1, round(config.epochs * len(train)))
    params = [s.factor for s in scales.values()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(config.seed)
    every = max(1, len(train) // config.validations_per_epoch)
    best_loss, best, queue = loss_start, None, []
    for step in tqdm(range(steps), desc="e2e-qp", disable=not progress, leave=False):
        if not queue:
            queue = torch.randperm(len(train), generator=order).tolist()
        optimizer.param_groups[0]["lr"] = config.lr * cosine_lr(step, steps)
        loss = loss_on(train[queue.pop()], weights())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % every and step + 1 < steps:
            continue
        current = validate(weights())
        if current < best_loss:
            best_loss, best = current, [p.detach().clone() for p in params]
    if best is not None:
        for param, value in zip(params, best, strict=True):
            param.data.copy_(value)
        for name, s in scales.items():
            frozen = s.freeze()
            q = layers[name]
            qweights[name] = CorrectedWeight(q.fmt, frozen, q.correction) if isinstance(q, CorrectedWeight) else frozen
            model.get_submodule(name).weight.data.copy_(qweights[name].dequantize())
    loss_end = validate() if best is not None else loss_start
    return E2ERecord(steps, len(scales), loss_start, loss_end, best is None, time.perf_counter() - start)


def _tunable(qweight: QWeight) -> bool:
    base = qweight.base if isinstance(qweight, CorrectedWeight) else qweight
    return isinstance(base, QuantizedWeight)
