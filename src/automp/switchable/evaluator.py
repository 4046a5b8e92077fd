"""Real quality of an allocation on a trained switchable model: ``set_config`` and one forward pass.

Drop-in for ``search.evaluator.AllocationEvaluator`` in the measuring solvers (anneal, reinforce, ppo),
``--verify`` and ``--refine``: nothing is quantized per candidate, every format's weights and adapters are
already in the model. An allocation's formats are the model's (``F`` or ``F+rR``, both with the adapter);
its bits count the adapters only when it names ``F+rR``, so a table to search on is profiled with
``--ranks R`` (``automp search`` checks this).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.execution.blocks import model_device
from automp.search.evaluator import METRICS, Measurement
from automp.switchable.layer import FULL
from automp.switchable.model import SwitchableModel


class SwitchableEvaluator:
    def __init__(self, sw: SwitchableModel, windows: torch.Tensor, metric: str = "ppl", batch_size: int = 8):
        if metric not in METRICS:
            raise AutompError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
        if windows.dim() != 2 or len(windows) == 0:
            raise AutompError("the evaluator needs a non-empty (windows, seqlen) tensor of evaluation tokens")
        self.sw, self.windows, self.metric, self.batch_size = sw, windows, metric, batch_size
        self.evaluations = 0
        self.formats = sw.spec.formats
        self._reference: list[torch.Tensor] = []  # full-precision log-probabilities per batch, for KL
        self.fp = self._forward(sw.uniform(FULL), kl=False)
        if metric == "kl":
            self._reference = list(self._log_probs())
        self.baseline = self.fp.ppl if metric == "ppl" else 0.0

    def __call__(self, allocation: Allocation | dict) -> float:
        result = self.measure(allocation, kl=self.metric == "kl")
        return result.ppl if self.metric == "ppl" else result.kl

    def measure(self, allocation: Allocation | dict, *, kl: bool = False, attention: bool = False) -> Measurement:
        if attention:
            raise AutompError("the switchable evaluator does not measure attention entropy")
        self.evaluations += 1
        return self._forward(allocation, kl)

    @property
    def supports_attention(self) -> bool:
        return False

    def __enter__(self) -> SwitchableEvaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.sw.set_config(FULL)

    @torch.no_grad()
    def _forward(self, allocation, kl: bool) -> Measurement:
        self.sw.set_config(allocation)
        if kl and not self._reference:
            self.sw.set_config(FULL)
            self._reference = list(self._log_probs())
            self.sw.set_config(allocation)
        nll, divergence = 0.0, 0.0
        for index, (ids, log_q) in enumerate(zip(self.windows.split(self.batch_size), self._log_probs(), strict=True)):
            targets = ids[:, 1:].flatten().to(log_q.device)
            nll += F.nll_loss(log_q[:, :-1].flatten(0, 1), targets, reduction="sum").item()
            if kl:
                log_p = self._reference[index]
                divergence += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        tokens = self.windows.shape[0] * (self.windows.shape[1] - 1)
        positions = self.windows.numel()
        return Measurement(ppl=math.exp(nll / tokens), kl=divergence / positions if kl else None)

    def _log_probs(self):
        device = model_device(self.sw.model)
        for ids in self.windows.split(self.batch_size):
            yield F.log_softmax(self.sw.model(input_ids=ids.to(device), use_cache=False).logits.float(), dim=-1)
