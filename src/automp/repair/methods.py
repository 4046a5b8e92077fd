"""``repair_(model, qweights, reference, windows, config)``: training repairs of a quantized model, in order.

``config.methods`` names them (:func:`parse_methods`): at most one block method, ``block-ap`` or
``sign-round`` (``reconstruct.py``), then optionally ``e2e-qp`` (``e2e.py``). ``seq-finetune``
(``seq_finetune.py``) happens *during* quantization instead: ``quantize_``'s ``after_block`` runs it,
and ``repair_`` leaves it to that. Every one starts from
the quantized model as stored and ends in the same formats and bytes, so exports keep working.
``config.schedule`` shares training out over the blocks (``schedules.py``); ``sgra`` and ``joint``
need the sensitivity table and the allocation. The block methods also run on a streamed model
(``execution/offload.py``); ``e2e-qp`` and ``seq-finetune`` train through every block at once, in memory only.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.execution.offload import is_streamed
from automp.model import decoder_blocks, inventory
from automp.quantizers.qweight import QWeight
from automp.repair.e2e import E2EConfig, E2ERecord, e2e_scales_
from automp.repair.reconstruct import BlockRecord, ReconstructConfig, reconstruct_
from automp.repair.schedules import SCHEDULES, BlockBudget, block_budget, block_sensitivity, equal_total
from automp.sensitivity.table import SensitivityTable

BLOCK_METHODS = ("block-ap", "sign-round")
DURING_QUANTIZATION = "seq-finetune"
METHODS = (DURING_QUANTIZATION, *BLOCK_METHODS, "e2e-qp")  # in the order they run


def unstreamed(spec: str | None) -> str | None:
    """``--repair <the methods of spec that run in memory only>``, or None when every one streams."""
    methods = [m for m in parse_methods(spec) if m not in BLOCK_METHODS] if spec else []
    return f"--repair {','.join(methods)}" if methods else None


def parse_methods(spec: str) -> tuple[str, ...]:
    """``block-ap,e2e-qp`` → ``("block-ap", "e2e-qp")``, checked: known, at most one block method, no repeats."""
    methods = tuple(m.strip() for m in spec.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise AutompError(f"unknown repair method {', '.join(unknown) or repr(spec)}: use one of {', '.join(METHODS)}")
    if len(set(methods)) != len(methods) or sum(m in BLOCK_METHODS for m in methods) > 1:
        raise AutompError(f"--repair {spec}: each method once, and one of {' or '.join(BLOCK_METHODS)} at most")
    return tuple(sorted(methods, key=METHODS.index))


@dataclass
class RepairConfig:
    methods: tuple[str, ...]
    schedule: str = "uniform"
    equal_steps: bool = False  # rescale sgra/joint to uniform's total training steps
    proxy: str = "outgrad"  # the table's proxy that sets sgra/joint's block sensitivities
    patience: int = 2  # uniform's early-stopping patience, in validations
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    e2e: E2EConfig = field(default_factory=E2EConfig)

    def __post_init__(self) -> None:
        self.methods = parse_methods(",".join(self.methods))
        if self.schedule not in SCHEDULES:
            raise AutompError(f"unknown schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        block = [m for m in self.methods if m in BLOCK_METHODS]
        if block:
            self.reconstruct.method = block[0]


@dataclass
class RepairReport:
    """What the repair did: one record per block, the E2E-QP record, the budgets and the time."""

    methods: list[str]
    schedule: str
    budgets: list[dict] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)
    e2e: dict | None = None
    seq_finetune: dict | None = None  # filled by whoever ran quantize_ with downstream_tuner
    seconds: float = 0.0

    def summary(self) -> dict:
        out = {"methods": self.methods, "schedule": self.schedule, "seconds": self.seconds}
        if self.blocks:
            out["block_loss_start"] = sum(b["loss_start"] for b in self.blocks)
            out["block_loss_end"] = sum(b["loss_end"] for b in self.blocks)
            out["steps"] = sum(b["steps"] for b in self.blocks)
        if self.e2e:
            out |= {"e2e_loss_start": self.e2e["loss_start"], "e2e_loss_end": self.e2e["loss_end"]}
        if self.seq_finetune:
            out["seq_finetune_seconds"] = self.seq_finetune["seconds"]
        return out


def block_budgets(
    model: nn.Module, config: RepairConfig, table: SensitivityTable | None, allocation: Allocation | None
) -> list[BlockBudget]:
    """Each decoder block's training budget under ``config.schedule``."""
    blocks = len(decoder_blocks(model))
    base = BlockBudget(config.reconstruct.epochs, 1.0, config.patience)
    if config.schedule == "uniform":
        return [base] * blocks
    if table is None or allocation is None:
        raise AutompError(
            f"--schedule {config.schedule} needs the sensitivity profile (a run directory's sensitivity.json, "
            "or --profile FILE); --schedule uniform needs none"
        )
    sensitivity = block_sensitivity(table, allocation, config.proxy, blocks)
    bits = _block_bits(model, allocation, blocks)
    budgets = [block_budget(config.schedule, base, s, b) for s, b in zip(sensitivity, bits, strict=True)]
    return equal_total(budgets, base.epochs * blocks) if config.equal_steps else budgets


def _block_bits(model: nn.Module, allocation: Allocation, blocks: int) -> list[float]:
    """Each block's average allocated bits per weight (16 where nothing is quantized)."""
    bits, weights = [0.0] * blocks, [0] * blocks
    for layer in inventory(model).layers:
        if 0 <= layer.block < blocks:
            fmt = allocation.format_of(layer.name)
            bits[layer.block] += fmt.storage_bits(layer.out_features, layer.in_features)
            weights[layer.block] += layer.out_features * layer.in_features
    return [b / w if w else 16.0 for b, w in zip(bits, weights, strict=True)]


def repair_(
    model: nn.Module,
    qweights: MutableMapping[str, QWeight],
    reference: nn.Module,
    windows: torch.Tensor,
    config: RepairConfig,
    *,
    table: SensitivityTable | None = None,
    allocation: Allocation | None = None,
    state_dir: Path | None = None,
    progress: bool = True,
) -> RepairReport:
    """Repair ``model`` (its quantized layers stored as ``qweights``, both updated in place) towards the
    full-precision ``reference`` on ``windows``; resumable per block through ``state_dir``."""
    start = time.perf_counter()
    report = RepairReport(list(config.methods), config.schedule)
    if not qweights:
        raise AutompError("nothing to repair: the model has no quantized layer")
    if is_streamed(model) and (refused := unstreamed(",".join(config.methods))):
        raise AutompError(f"{refused} trains through the whole model at once: it does not run on a streamed model")
    if any(m in BLOCK_METHODS for m in config.methods):
        budgets = block_budgets(model, config, table, allocation)
        report.budgets = [asdict(b) for b in budgets]
        records: list[BlockRecord] = reconstruct_(
            model, reference, qweights, windows, config.reconstruct, budgets, state_dir, progress
        )
        report.blocks = [asdict(r) for r in records]
    if "e2e-qp" in config.methods:
        record: E2ERecord = e2e_scales_(model, qweights, windows, config.e2e, reference, progress)
        report.e2e = asdict(record)
    report.seconds = time.perf_counter() - start
    return report
