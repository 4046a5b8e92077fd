"""Sequential post-quantization fine-tuning (the PPO prototype's step, during quantization).

As GPTQ (or AWQ) finishes decoder block ``i``, the blocks after it, still in full precision, train a
few steps towards the full-precision model's next-token distributions (KL, distillation) with the
blocks up to ``i`` quantized and frozen, so they adapt to the error upstream before they are quantized
in their turn. :func:`downstream_tuner` returns the callback ``quantize_(..., after_block=...)`` calls.
AdamW with a cosine decay within each block's steps; batches cycle through the windows in a seeded
order. The result is quantized like any model: same formats, same bytes.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.execution.blocks import model_device
from automp.model import decoder_blocks
from automp.quantize import quantize_
from automp.repair.schedules import cosine_lr
from automp.search.evaluator import AllocationEvaluator


@dataclass
class SeqFinetuneConfig:
    steps: int = 8  # per quantized block, on the blocks after it
    lr: float = 1e-4
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise AutompError("sequential fine-tuning needs a positive number of steps per block")


@dataclass
class SeqFinetuneRecord:
    blocks: list[dict] = field(default_factory=list)  # per quantized block: steps, first and last loss
    seconds: float = 0.0


def downstream_tuner(
    model: nn.Module, reference: nn.Module, windows: torch.Tensor, config: SeqFinetuneConfig, record: SeqFinetuneRecord
) -> Callable[[int], None]:
    """The ``after_block`` callback: after block ``i`` is quantized, train blocks ``i+1..`` on KL to ``reference``."""
    blocks = decoder_blocks(model)
    batches = list(windows.split(config.batch_size))
    order = torch.Generator().manual_seed(config.seed)
    queue: list[int] = []

    def tune(index: int) -> None:
        downstream = [p for block in blocks[index + 1 :] for p in block.parameters()]
        if not downstream:
            return
        start = time.perf_counter()
        model.requires_grad_(False)
        for param in downstream:
            param.requires_grad_(True)
        # a 16-bit model trains fp32 master copies: AdamW's second moments and lr-sized steps vanish in 16 bits
        masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True) for p in downstream]
        optimizer = torch.optim.AdamW(masters, lr=config.lr, weight_decay=0.0)
        losses = []
        with torch.enable_grad():
            for step in range(config.steps):
                if not queue:
                    queue.extend(torch.randperm(len(batches), generator=order).tolist())
                ids = batches[queue.pop()].to(model_device(model))
                optimizer.param_groups[0]["lr"] = config.lr * cosine_lr(step, config.steps)
                with torch.no_grad():
                    target = F.log_softmax(reference(input_ids=ids, use_cache=False).logits.float(), -1)
                log_q = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
                loss = F.kl_div(log_q, target, log_target=True, reduction="none").sum(-1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for param, master in zip(downstream, masters, strict=True):
                    if master is not param:
                        master.grad = param.grad.float()
                optimizer.step()
                for param, master in zip(downstream, masters, strict=True):
                    if master is not param:
                        param.data.copy_(master)
                        param.grad = None
                losses.append(loss.item())
        model.requires_grad_(False)
        record.blocks.append({"block": index, "steps": config.steps, "loss_first": losses[0], "loss_last": losses[-1]})
        record.seconds += time.perf_counter() - start

    return tune


class FinetunedEvaluator(AllocationEvaluator):
    """The PPO prototype's environment step inside the search's evaluator (``automp search --seq-finetune``).

    Each evaluated allocation is quantized with GPTQ from full precision, block by block in model order, and
    after each block the downstream blocks train towards the full-precision model (:func:`downstream_tuner`),
    exactly as ``--repair seq-finetune`` does; then it is measured as ``AllocationEvaluator`` measures, and the
    model returns to full precision. That is the prototype's episode (quantize a group, fine-tune, next group)
    with one real evaluation at its end. Nothing is cached between evaluations, so each costs a GPTQ pass and
    ``steps`` training steps per block: ``seconds`` totals it, ``evaluations`` counts it.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, formats, *, calib: torch.Tensor,
                 config: SeqFinetuneConfig | None = None, **options) -> None:  # fmt: skip
        self.config = config or SeqFinetuneConfig()
        self.seconds = 0.0
        self._full = {key: value.detach().clone() for key, value in model.state_dict().items()}
        self._reference = copy.deepcopy(model).eval()
        super().__init__(model, windows, formats, calib=calib, method="gptq", **options)

    def _prequantize(self, layers) -> None:  # every evaluation quantizes from full precision
        for layer in layers:
            for fmt in self.formats:
                if fmt.quantized:
                    fmt.check_shape(layer.out_features, layer.in_features)

    def apply(self, allocation: Allocation) -> None:
        self._admit(allocation)
        allocation.check(self.inventory)
        self.restore()
        start = time.perf_counter()
        tuner = downstream_tuner(self.model, self._reference, self._calib, self.config, SeqFinetuneRecord())
        quantize_(self.model, allocation, "gptq", self._calib, gptq=self._gptq, progress=False, after_block=tuner)
        self.seconds += time.perf_counter() - start

    def restore(self) -> None:
        self.model.load_state_dict(self._full)

    @contextlib.contextmanager
    def _original_weights(self):
        current = {key: value.detach().clone() for key, value in self.model.state_dict().items()}
        self.restore()
        try:
            yield
        finally:
            self.model.load_state_dict(current)
