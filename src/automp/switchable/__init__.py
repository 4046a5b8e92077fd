"""Switchable precision: one model whose layers switch format at run time, with a LoRA adapter per format.

``layer.py`` is the switching linear layer; ``dispatch.py`` lets PEFT put one adapter per format on it;
``model.py`` builds, switches (``set_config``), saves and delivers; ``styles.py`` and ``train.py`` train
the adapters (spnet, cyclic, instantnet); ``evaluator.py`` measures allocations for the search;
``greedy.py`` is the measured-budget greedy; ``commands.py`` is ``automp switchable ...``.

    sw = build_switchable(model, SwitchableSpec(model="...", formats=["w2g64", "w3g128", "w4g128"]), calib)
    train_adapters(sw, calib, TrainConfig(style="spnet"))
    sw.set_config("w2g64")  # or an allocation file, or {layer: format}
"""

from automp.switchable.evaluator import SwitchableEvaluator
from automp.switchable.greedy import measured_greedy
from automp.switchable.model import SwitchableModel, SwitchableSpec, build_switchable, load_switchable
from automp.switchable.train import TrainConfig, train_adapters

__all__ = [
    "SwitchableEvaluator",
    "SwitchableModel",
    "SwitchableSpec",
    "TrainConfig",
    "build_switchable",
    "load_switchable",
    "measured_greedy",
    "train_adapters",
]
