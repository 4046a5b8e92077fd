"""An automp output directory read for export: allocation, layer inventory, packed weights, dense tensors.

Exports need the stored codes and scales exactly as ``automp quantize`` (or ``automp run``) wrote them,
not a dequantized model, so the checkpoint files are read directly. The layer inventory (blocks, roles,
fused groups) comes from the model built on the ``meta`` device: no weight memory, no computation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from automp.allocation import Allocation
from automp.checkpoint import DENSE_TENSORS, QUANT_FILE, read_qweights
from automp.errors import AutompError
from automp.model import EMBED_ROLE, Inventory, inventory_for
from automp.quantizers.qweight import QWeight

SETTINGS_FILE = "automp_config.json"  # the settings the run was made with (written by the pipeline)


@dataclass
class RunDir:
    path: Path
    config: object  # transformers PretrainedConfig
    allocation: Allocation
    skeleton: nn.Module  # the model on the meta device: module types and names only

    @classmethod
    def open(cls, path: Path) -> RunDir:
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(path)
        if not (path / QUANT_FILE).is_file():
            raise AutompError(f"{path} is not an automp output directory (no {QUANT_FILE}); run automp quantize first")
        allocation = Allocation.load(path / QUANT_FILE)
        try:
            config = AutoConfig.from_pretrained(path)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)
        except Exception as err:  # unknown architectures and broken configs raise many types
            raise AutompError(f"could not rebuild the model described by {path / 'config.json'}: {err}") from err
        run = cls(path, config, allocation, skeleton)
        allocation.check(run.inventory)
        return run

    @cached_property
    def inventory(self) -> Inventory:
        return inventory_for(self.skeleton, self.allocation.formats)

    @cached_property
    def settings(self) -> dict:
        """The run's own settings (method, act-order, damping); empty when the file is absent."""
        file = self.path / SETTINGS_FILE
        return json.loads(file.read_text()) if file.is_file() else {}

    def quantized_weights(self) -> dict[str, QWeight]:
        """Every quantized layer's codes, scales and zero-points, exactly as stored."""
        return read_qweights(self.path, self.allocation)

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        """Every other tensor (embeddings, norms, unquantized layers) in its stored 16-bit dtype."""
        try:
            return load_file(self.path / DENSE_TENSORS)
        except Exception as err:
            raise AutompError(f"corrupt automp checkpoint in {self.path}: {err}") from err


def refuse_quantized_embedding(run: RunDir, export_format: str, loaders: str) -> None:
    """One error, before anything is written, when ``run`` quantized its token embedding (``--embeddings``):
    ``export_format`` quantizes linear layers only, and ``loaders`` read a 16-bit embedding."""
    quantized = [f"{layer.name} ({run.allocation.formats[layer.name]})" for layer in run.inventory.layers
                 if layer.role == EMBED_ROLE and run.allocation.format_of(layer.name).quantized]  # fmt: skip
    if quantized:
        raise AutompError(
            f"--format {export_format} quantizes linear layers only ({loaders} load a 16-bit token embedding), "
            f"but this run quantized its token embedding {quantized[0]}: quantize without --embeddings for this "
            "export, or export it for llama.cpp with --format gguf or gguf-map"
        )


def listing(items: list[str], limit: int = 8) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are (for error messages)."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
