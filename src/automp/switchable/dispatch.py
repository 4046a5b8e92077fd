"""PEFT's LoRA on a ``SwitchableLinear``: one adapter per format, registered as a custom LoRA module.

PEFT builds, saves and loads the adapters (``inject_adapter_in_model``, ``get_peft_model_state_dict``,
``set_peft_model_state_dict``); this file only tells it how to wrap the switchable layer. The adapter
named like a format is the one that runs with that format: ``set_format`` switches the weight and the
adapter together. ``lora_alpha`` equals ``r``, so an adapter adds exactly ``B A x``, and a delivered
``+rN`` layer (``W = Q + B A``, ``quantizers/lowrank.py``) computes the same thing.
"""

from __future__ import annotations

from torch import nn

from automp.errors import AutompError
from automp.switchable.layer import FULL, SwitchableLinear


def _lora_linear():
    from peft.tuners.lora import Linear

    class SwitchableLoraLinear(Linear):
        """PEFT's LoRA ``Linear`` over a switchable base: adapters keyed by format name."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def merge(self, *args, **kwargs) -> None:
            # Merging would add one format's adapter to the full-precision weight, which every format shares.
            raise AutompError("a switchable layer's adapters cannot be merged: deliver a bitmap instead")

    return SwitchableLoraLinear


def lora_config(names: list[str], rank: int):
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=names)
    config._register_custom_module({SwitchableLinear: _lora_linear()})
    return config


def add_adapters(model: nn.Module, names: list[str], formats: list[str], rank: int) -> None:
    """One LoRA adapter of ``rank`` per format on every switchable layer in ``names``, through PEFT."""
    from peft import inject_adapter_in_model

    for fmt in formats:
        inject_adapter_in_model(lora_config(names, rank), model, adapter_name=fmt)


def set_format(module: nn.Module, fmt: str, adapters: bool = True) -> None:
    """Run ``module`` (PEFT's wrapper of a switchable layer) in ``fmt``, with that format's adapter when
    ``adapters`` (full precision never has one)."""
    module.base_layer.switch(fmt)
    use = adapters and fmt != FULL
    module.enable_adapters(use)
    module.set_adapter([fmt] if use else [])
