"""Block reconstruction: train each decoder block's quantized layers to reproduce the full-precision block.

Blocks run in order (llm-compressor's sequential pipeline, ``execution/blocks.py``). Block ``i`` trains
on the outputs of the already repaired blocks ``0..i-1``; its target is the full-precision model's
hidden state after block ``i`` (EfficientQAT's Block-AP), and the loss is their mean squared error.
Only the quantized layers train (``trainable.py``): ``block-ap`` with AdamW on the latent weights and
scales, ``sign-round`` with signed gradient descent on rounding offsets and clip factors (AutoRound);
16-bit layers and norms stay as they are. Every step size decays on a cosine.

The inner loop has HQQ's shape: parameters unpacked up front, the last calibration batches held out
and validated ``validations`` times per block, an early stop after ``patience`` validations without
improvement, and the best state restored. The stored starting weights are the first candidate, so a
block never ends worse on the held-out windows than it started. At the end every layer is frozen
back into exactly its format (same bytes).

Each finished block is written to ``state_dir`` (its layers' stored tensors and its record); a rerun
loads those and continues at the first unfinished block, reaching the same weights as an
uninterrupted run: batch order is seeded per block, and the inputs of the next block are recomputed
from the loaded weights. One block's training state is held at a time.

A streamed model (``execution/offload.py``) keeps every block's inputs and targets on the host, a batch at a time
going to the device; a block trains as a plain copy on the device (``materialized``) and its repaired weights are
written through to the offload.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from automp.errors import AutompError
from automp.execution.blocks import (
    BlockInputs,
    batches_on,
    capture_block_inputs,
    model_device,
    propagate,
    run_block,
    to_device,
)
from automp.execution.offload import is_streamed, keep_onloaded, materialized
from automp.io import write_file_atomic
from automp.model import decoder_blocks, inventory, set_linear_weight
from automp.quantizers.qweight import QWeight, load_qweights, save_qweights
from automp.repair.schedules import BlockBudget, cosine_lr
from automp.repair.trainable import TrainableWeight, why_untrainable

METHODS = ("block-ap", "sign-round")


@dataclass
class ReconstructConfig:
    """Block reconstruction's settings (defaults chosen on held-out calibration windows of bench-a)."""

    method: str = "block-ap"
    epochs: float = 8.0  # block-ap: passes over the training windows per block (before the schedule)
    iters: int = 200  # sign-round: steps per block (AutoRound's default)
    lr: float = 1e-2  # block-ap: latent weights, in units of each group's starting scale
    scale_lr: float = 1e-2  # block-ap: scales (as a factor) and zero-points
    adapter_lr: float = 1e-4  # block-ap: a +rN correction's A and B
    sign_lr: float | None = None  # sign-round: default 1 / iters, AutoRound's
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    batch_size: int = 4  # windows per step
    val_fraction: float = 0.125  # calibration batches held out for validation and early stopping
    validations: int = 20  # held-out checks per block, evenly spaced (patience counts these)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AutompError(f"unknown reconstruction {self.method!r}: use one of {', '.join(METHODS)}")
        if self.epochs <= 0 or self.iters <= 0:
            raise AutompError("block reconstruction needs a positive number of epochs / iterations")
        if not 0 < self.val_fraction < 1:
            raise AutompError("val_fraction must lie strictly between 0 and 1")


@dataclass
class BlockRecord:
    """What training one block did, as saved in ``repair.json``."""

    block: int
    steps: int
    budget: dict
    loss_start: float  # held-out block-output MSE of the stored weights
    loss_end: float  # ... of the delivered weights
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    kept_start: bool = False  # training never beat the stored weights on the held-out batches
    stopped_early: bool = False
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)  # layers with no trainable parametrisation

    @classmethod
    def from_json(cls, data: dict) -> BlockRecord:
        return cls(**data)


def block_steps(config: ReconstructConfig, budget: BlockBudget, train_batches: int) -> int:
    """Optimizer steps for a block: ``epochs`` passes (block-ap) or ``iters`` scaled as the schedule's epochs."""
    if config.method == "sign-round":
        return max(1, round(config.iters * budget.epochs / config.epochs))
    return max(1, round(budget.epochs * train_batches))


@torch.no_grad()
def reconstruct_(
    model: nn.Module,
    fp_model: nn.Module,
    qweights: MutableMapping[str, QWeight],
    calib: torch.Tensor,
    config: ReconstructConfig,
    budgets: list[BlockBudget],
    state_dir: Path | None = None,
    progress: bool = True,
) -> list[BlockRecord]:
    """Repair ``model`` (quantized as ``qweights``) towards ``fp_model`` block by block, in place.

    ``qweights`` is updated with the repaired layers; ``budgets`` has one entry per decoder block."""
    blocks, fp_blocks = decoder_blocks(model), decoder_blocks(fp_model)
    if len(budgets) != len(blocks):
        raise AutompError(f"{len(budgets)} block budgets for {len(blocks)} decoder blocks")
    batches = math.ceil(len(calib) / config.batch_size)
    if batches < 2:
        raise AutompError(f"block reconstruction needs at least {2 * config.batch_size} calibration windows")
    block_of = {layer.name: layer.block for layer in inventory(model).layers}
    model.requires_grad_(False)  # only the trainable weights get gradients, never the model's own parameters
    inputs = capture_block_inputs(model, blocks[0], calib, config.batch_size)
    fp_inputs = capture_block_inputs(fp_model, fp_blocks[0], calib, config.batch_size)
    device, streamed = model_device(model), is_streamed(model) or is_streamed(fp_model)
    if streamed:  # every cache waits on the host, a batch at a time goes to the device
        inputs, fp_inputs = to_device(inputs, torch.device("cpu")), to_device(fp_inputs, torch.device("cpu"))

    def outputs(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
        if not streamed:
            return list(run_block(block, inputs))
        with keep_onloaded():  # the block read once
            return [output.cpu() for output in run_block(block, batches_on(inputs, device))]

    records = []
    for index, block in enumerate(tqdm(blocks, desc=f"{config.method} blocks", disable=not progress, leave=False)):
        targets = outputs(fp_blocks[index], fp_inputs)
        names = [name for name in qweights if block_of.get(name) == index]
        record = _load_block(state_dir, index, qweights) if state_dir else None
        if record is None:
            with keep_onloaded() if streamed else contextlib.nullcontext():
                fp_weights = {name: fp_model.get_submodule(name).weight for name in names}
                trained = materialized(block) if streamed else block  # autograd through an offloaded block: no
            batches = _Batches(inputs, targets, device if streamed else None)
            record = _train_block(model, block, trained, index, names, qweights, fp_weights, batches, config,
                                  budgets[index])  # fmt: skip
            del trained, fp_weights
            if state_dir:
                _save_block(state_dir, index, record, {name: qweights[name] for name in names})
        for name in names:
            set_linear_weight(model.get_submodule(name), qweights[name].dequantize())
        records.append(record)
        inputs = propagate(inputs, outputs(block, inputs))
        fp_inputs = propagate(fp_inputs, targets)
    return records


@dataclass
class _Batches:
    """A block's training batches: its inputs and the full-precision block's outputs, the targets. With a
    ``device`` they wait on the host and each goes there when used."""

    inputs: BlockInputs
    targets: list[torch.Tensor]
    device: torch.device | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[tuple, dict, torch.Tensor]:
        if self.device is None:
            return (*self.inputs[i], self.targets[i])
        args, kwargs = next(batches_on(self.inputs[i : i + 1], self.device))
        return args, kwargs, self.targets[i].to(self.device)


def _train_block(
    model: nn.Module,
    block: nn.Module,
    trained: nn.Module,
    index: int,
    names: list[str],
    qweights: MutableMapping[str, QWeight],
    fp_weights: dict[str, torch.Tensor],
    batches: _Batches,
    config: ReconstructConfig,
    budget: BlockBudget,
) -> BlockRecord:
    """Train the quantized layers of ``block`` (in ``trained``: the block itself, or a streamed block's plain copy;
    the parameter names are the same) on ``batches``."""
    start = time.perf_counter()
    relative = {module: name for name, module in block.named_modules()}
    skipped = [name for name in names if why_untrainable(qweights[name], config.method)]
    layer_of = {relative[model.get_submodule(name)] + ".weight": name for name in names if name not in skipped}
    device = model_device(trained)  # a streamed run's stored weights wait on the host
    trainables = {
        key: TrainableWeight(qweights[name].to(device), config.method, fp_weights[name])
        for key, name in layer_of.items()
    }
    held_out = max(1, round(len(batches) * config.val_fraction))
    train, val = list(range(len(batches) - held_out)), list(range(len(batches) - held_out, len(batches)))

    dtypes = {key: trained.get_parameter(key).dtype for key in layer_of}  # a bf16/fp16 block computes in its own

    def loss_on(i: int, weights: dict[str, torch.Tensor] | None) -> torch.Tensor:
        args, kwargs, target = batches[i]
        weights = {key: weight.to(dtypes[key]) for key, weight in (weights or {}).items()}
        output = functional_call(trained, weights, args, kwargs)
        output = output[0] if isinstance(output, tuple) else output
        return F.mse_loss(output.float(), target.float())

    def validate(weights: dict[str, torch.Tensor] | None = None) -> float:
        return sum(loss_on(i, weights).item() for i in val) / len(val)

    loss_start = validate()
    steps = block_steps(config, budget, len(train))
    record = BlockRecord(index, steps, asdict(budget), loss_start, loss_start, skipped=skipped)
    if trainables:
        best = _optimize(trainables, train, loss_on, validate, loss_start, steps, config, budget, index, record)
        if best is not None:
            for key, trainable in trainables.items():
                trainable.load_state_dict(best[key])
                qweights[layer_of[key]] = trainable.freeze()
            record.loss_end = validate({key: qweights[name].dequantize() for key, name in layer_of.items()})
        record.kept_start = best is None
    record.seconds = time.perf_counter() - start
    return record


def _optimize(
    trainables: dict[str, TrainableWeight],
    train: list[int],
    loss_on,
    validate,
    loss_start: float,
    steps: int,
    config: ReconstructConfig,
    budget: BlockBudget,
    index: int,
    record: BlockRecord,
) -> dict[str, dict] | None:
    """The training loop; returns the best state by held-out loss, or None when the start was best."""
    optimizer = _optimizer(trainables, config, budget)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    order = torch.Generator().manual_seed(config.seed * 100_003 + index)  # per block: resumes reproduce it
    every = max(1, steps // config.validations)
    best_loss, best, waited, own_best = loss_start, None, 0, math.inf
    queue: list[int] = []
    with torch.enable_grad():
        for step in range(steps):
            if not queue:
                queue = [train[i] for i in torch.randperm(len(train), generator=order).tolist()]
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * cosine_lr(step, steps)
            weights = {key: trainable() for key, trainable in trainables.items()}
            loss = loss_on(queue.pop(), weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.method == "block-ap":
                nn.utils.clip_grad_norm_([p for t in trainables.values() for p in t.parameters()], config.clip_grad)
            optimizer.step()
            for trainable in trainables.values():
                trainable.project_()
            record.train_loss_first = record.train_loss_first or loss.item()
            record.train_loss_last = loss.item()
            if (step + 1) % every and step + 1 < steps:
                continue
            with torch.no_grad():
                current = validate({key: trainable() for key, trainable in trainables.items()})
            if current < best_loss:  # the best state yet, the stored start included: the one restored
                best_loss = current
                best = {key: {k: v.clone() for k, v in t.state_dict().items()} for key, t in trainables.items()}
            # patience counts the training's own progress (sign rounding starts far above the stored weights)
            waited = 0 if current < own_best else waited + 1
            own_best = min(own_best, current)
            if waited > budget.patience:
                record.stopped_early = True
                break
    return best


class SignSGD(torch.optim.Optimizer):
    """Signed gradient descent (AutoRound): every parameter moves by ``lr · sign(grad)``."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad.sign(), alpha=-group["lr"])


def _optimizer(trainables: dict[str, TrainableWeight], config: ReconstructConfig, budget: BlockBudget):
    modules = list(trainables.values())
    if config.method == "sign-round":
        for module in modules:  # a correction's factors are not sign-rounded: they stay as fitted
            for factor in (module.A, module.B):
                if factor is not None:
                    factor.requires_grad_(False)
        params = [p for m in modules for p in (m.offset, m.clip_hi, m.clip_lo) if p is not None]
        return SignSGD(params, (config.sign_lr or 1 / config.iters) * budget.lr_scale)
    groups = [
        ([m.latent for m in modules], config.lr),
        ([p for m in modules for p in (m.gain, m.zero) if p is not None], config.scale_lr),
        ([p for m in modules for p in (m.A, m.B) if p is not None], config.adapter_lr),
    ]
    param_groups = [{"params": params, "lr": lr * budget.lr_scale} for params, lr in groups if params]
    return torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)


# ---- resumable state ----------------------------------------------------------------------


def _block_files(state_dir: Path, index: int) -> tuple[Path, Path]:
    return state_dir / f"block_{index:03d}.safetensors", state_dir / f"block_{index:03d}.json"


def _save_block(state_dir: Path, index: int, record: BlockRecord, layers: dict[str, QWeight]) -> None:
    """The block's repaired layers (stored tensors) and record; the record last, so it marks completion."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors_file, record_file = _block_files(state_dir, index)
    save_qweights(tensors_file, layers)
    write_file_atomic(record_file, json.dumps(asdict(record), indent=1))


def _load_block(state_dir: Path, index: int, qweights: MutableMapping[str, QWeight]) -> BlockRecord | None:
    """A finished block's record, its layers put into ``qweights``; None when the block is unfinished."""
    tensors_file, record_file = _block_files(state_dir, index)
    if not record_file.is_file():
        return None
    loaded = load_qweights(tensors_file)
    for name, qweight in loaded.items():
        if qweight.fmt.name != qweights[name].fmt.name:
            raise AutompError(
                f"{state_dir} belongs to another allocation ({name}: {qweight.fmt.name}); remove it to start over"
            )
    qweights.update(loaded)
    return BlockRecord.from_json(json.loads(record_file.read_text()))
