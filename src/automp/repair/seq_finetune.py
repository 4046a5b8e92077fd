"""Sequential post-quantization fine-tuning (the PPO prototype's step, during quantization).

As GPTQ (or AWQ) finishes decoder block ``i``, the blocks after it, still in full precision, train a
few steps towards the full-precision model's next-token distributions (KL, distillation) with the
blocks up to ``i`` quantized and frozen, so they adapt to the error upstream before they are quantized
in their turn. :func:`downstream_tuner` returns the callback ``quantize_(..., after_block=...)`` calls.
AdamW with a cosine decay within each block's steps; batches cycle through the windows in a seeded
order. The result is quantized like any model: same formats, same bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from automp.errors import AutompError
from automp.execution.blocks import model_device
from automp.model import decoder_blocks
from automp.repair.schedules import cosine_lr


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
        optimizer = torch.optim.AdamW(downstream, lr=config.lr, weight_decay=0.0)
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
                optimizer.step()
                losses.append(loss.item())
        model.requires_grad_(False)
        record.blocks.append({"block": index, "steps": config.steps, "loss_first": losses[0], "loss_last": losses[-1]})
        record.seconds += time.perf_counter() - start

    return tune
