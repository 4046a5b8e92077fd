"""Train a switchable model's adapters (only them) with a style, resumable, and measure what it did.

Each step draws a batch of training windows, runs the style's passes (``styles.py``) and takes one
AdamW step over every adapter, the learning rate decaying on a cosine. A pass's loss is the per-token
KL from its teacher (the full-precision model, or an earlier pass of the step), plus the next-token
cross-entropy where the style asks for it; ``loss="ce"`` trains spnet and cyclic on cross-entropy alone.

Held-out windows (the last ``val_fraction`` of the training windows) measure every uniform bitmap's
KL to the full-precision model ``validations`` times over the run, and each format keeps the adapter
with which its bitmap was closest (HQQ's restore-the-best; the start counts, so a format the mixes
pull away from its own optimum is not made worse). Before and after, KL and NLL, go in the report.

The batch order and the random bitmaps of step ``t`` come from a generator seeded with ``(seed, t)``,
so a run cut at any step and resumed from its state file (``state_dir/train_state.pt``, written every
``checkpoint_every`` steps) makes the same adapters as an uncut run.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from automp.errors import AutompError
from automp.execution.blocks import model_device
from automp.repair.schedules import cosine_lr
from automp.switchable.layer import FULL
from automp.switchable.model import SwitchableModel
from automp.switchable.styles import get_style

LOSSES = ("kl", "ce")
STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    style: str = "spnet"
    steps: int = 100
    lr: float = 3e-4  # not tuned; the best-state restore guards against too high a rate
    batch_size: int = 4  # windows per pass
    loss: str = "kl"  # spnet / cyclic: kl (to the full-precision model) or ce
    mixes: int = 2  # spnet: random per-layer mixes per step
    ce_weight: float = 1.0  # the cross-entropy's weight where it is used (instantnet, loss="ce")
    clip: float = 1.0  # gradient norm
    val_fraction: float = 1 / 8
    checkpoint_every: int = 25
    validations: int = 10  # held-out checks over the run; each format keeps its best adapter (the start included)
    seed: int = 0

    def __post_init__(self) -> None:
        get_style(self.style)
        if self.loss not in LOSSES:
            raise AutompError(f"unknown loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.mixes < 0 or self.ce_weight < 0:
            raise AutompError(
                "--steps and --batch-size must be at least 1, --lr positive, --mixes and --ce-weight at least 0"
            )
        if not 0 < self.val_fraction < 1:
            raise AutompError(f"val_fraction must be in (0, 1), not {self.val_fraction}")


def train_adapters(
    sw: SwitchableModel,
    windows: torch.Tensor,
    config: TrainConfig,
    state_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Train ``sw``'s adapters on ``windows`` (n, seqlen); returns the report the manifest keeps."""
    held = max(1, round(len(windows) * config.val_fraction))
    if len(windows) - held < 1:
        raise AutompError(f"training needs at least 2 windows (one held out), not {len(windows)}")
    train, val = windows[:-held], windows[-held:]
    formats, layers = sw.spec.formats, list(sw.layers)
    before = heldout_losses(sw, val, config.batch_size)
    params = sw.adapter_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    best = {fmt: (before[fmt]["kl"], 0, _clone(sw.adapter_state(fmt))) for fmt in formats}
    start, history, best = _resume(sw, optimizer, state_dir, best)
    every = max(1, config.steps // max(config.validations, 1))
    style = get_style(config.style)
    device = model_device(sw.model)
    sw.model.train()  # no dropout in these adapters; train mode only for PEFT's bookkeeping
    for step in tqdm(range(start, config.steps), desc=f"switchable {config.style}", disable=not progress,
                     initial=start, total=config.steps, leave=False):  # fmt: skip
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        ids = train[torch.randint(len(train), (config.batch_size,), generator=generator)].to(device)  # (B, T)
        passes = style(step, formats, layers, generator, config.mixes)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * cosine_lr(step, config.steps)
        optimizer.zero_grad(set_to_none=True)
        teachers: list[torch.Tensor] = []  # each pass's log-probabilities, detached
        fp = _full_precision(sw, ids) if any(p.teacher is None for p in passes) else None
        total = 0.0
        for p in passes:
            sw.set_config(p.bitmap)
            logits = sw.model(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)
            log_q = F.log_softmax(logits, dim=-1)
            teacher = fp if p.teacher is None else teachers[p.teacher]
            loss = _kl(log_q, teacher) if config.loss == "kl" or p.cross_entropy else 0.0  # instantnet: both
            if p.cross_entropy or config.loss == "ce":
                loss = loss + config.ce_weight * F.nll_loss(log_q[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            teachers.append(log_q.detach())
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        history.append(total)
        if (step + 1) % every == 0 or step + 1 == config.steps:
            best = _keep_best(sw, val, config.batch_size, step + 1, best)
        if state_dir is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            _save_state(sw, optimizer, step + 1, history, best, state_dir)
    sw.model.eval()
    for fmt, (_, _, state) in best.items():  # each format's best adapter on the held-out windows
        sw.load_adapter_state(fmt, state)
    with torch.no_grad():  # the adapters as delivered: fp16 factors (lora_alpha = r, so B A exactly)
        for param in params:
            param.copy_(param.half().float())
    after = heldout_losses(sw, val, config.batch_size)
    sw.set_config(FULL)
    return {
        "config": asdict(config),
        "heldout_windows": len(val),
        "before": before,
        "after": after,
        "best_step": {fmt: step for fmt, (_, step, _) in best.items()},
        "loss_history": history,
    }


@torch.no_grad()
def heldout_losses(sw: SwitchableModel, windows: torch.Tensor, batch_size: int = 4) -> dict[str, dict]:
    """Every uniform bitmap's mean per-token KL to the full-precision model and NLL on ``windows``."""
    device = model_device(sw.model)
    out: dict[str, dict] = {fmt: {"kl": 0.0, "nll": 0.0} for fmt in sw.spec.formats}
    for batch in windows.split(batch_size):
        ids = batch.to(device)
        fp = _full_precision(sw, ids)
        for fmt in sw.spec.formats:
            sw.set_config(fmt)
            log_q = F.log_softmax(sw.model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            out[fmt]["kl"] += _kl(log_q, fp).item() * len(ids) / len(windows)
            nll = F.nll_loss(log_q[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            out[fmt]["nll"] += nll.item() * len(ids) / len(windows)
    sw.set_config(FULL)
    return out


@torch.no_grad()
def _full_precision(sw: SwitchableModel, ids: torch.Tensor) -> torch.Tensor:
    sw.set_config(FULL)
    return F.log_softmax(sw.model(input_ids=ids, use_cache=False).logits.float(), dim=-1)


def _kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(p || q) of next-token distributions given as log-probabilities (B, T, V)."""
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()


def _keep_best(sw: SwitchableModel, val: torch.Tensor, batch_size: int, step: int, best: dict) -> dict:
    sw.model.eval()
    losses = heldout_losses(sw, val, batch_size)
    sw.model.train()
    for fmt, (kl, _, _) in list(best.items()):
        if losses[fmt]["kl"] < kl:
            best[fmt] = (losses[fmt]["kl"], step, _clone(sw.adapter_state(fmt)))
    return best


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


# ---- resumable state ---------------------------------------------------------------------------------


def _save_state(sw: SwitchableModel, optimizer, step: int, history: list[float], best: dict, state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    adapters = {fmt: sw.adapter_state(fmt) for fmt in sw.spec.formats}
    kept = {fmt: {"kl": kl, "step": at, "adapter": adapter} for fmt, (kl, at, adapter) in best.items()}
    state = {"step": step, "history": history, "adapters": adapters, "optimizer": optimizer.state_dict(), "best": kept}
    partial = state_dir / (STATE_FILE + ".partial")
    torch.save(state, partial)
    os.replace(partial, state_dir / STATE_FILE)


def _resume(sw: SwitchableModel, optimizer, state_dir: Path | None, best: dict) -> tuple[int, list[float], dict]:
    file = None if state_dir is None else state_dir / STATE_FILE
    if file is None or not file.is_file():
        return 0, [], best
    state = torch.load(file, weights_only=True)
    for fmt, adapter in state["adapters"].items():
        sw.load_adapter_state(fmt, adapter)
    optimizer.load_state_dict(state["optimizer"])
    best = {fmt: (kept["kl"], kept["step"], kept["adapter"]) for fmt, kept in state["best"].items()}
    return state["step"], list(state["history"]), best
