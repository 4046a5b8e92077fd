"""Perplexity with the GPTQ/AWQ papers' protocol: the evaluation text tokenized once, cut into
non-overlapping windows, the token NLL averaged over all windows, the remainder dropped.

Per-window NLLs are kept so that two models evaluated on the same windows can be compared with a
paired standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class Perplexity:
    ppl: float
    windows: int
    tokens: int
    seqlen: int
    window_nll: list[float] = field(repr=False)  # mean token NLL of each window

    def summary(self) -> dict:
        return {"ppl": self.ppl, "windows": self.windows, "tokens": self.tokens, "seqlen": self.seqlen}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> Perplexity:
    device = next(model.parameters()).device
    nll: list[float] = []
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        nll.extend(loss.view(len(ids), -1).mean(dim=1).tolist())
    seqlen = windows.shape[1]
    return Perplexity(math.exp(sum(nll) / len(nll)), len(nll), len(nll) * seqlen, seqlen, nll)


@torch.no_grad()
def kl_to_reference(model, reference, windows: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Each window's mean per-token KL(reference ‖ model) of the next-token distributions, in nats.

    The distance to the full-precision model: unlike perplexity, it cannot improve by chance on one
    text, so it is reported beside it."""
    device = next(model.parameters()).device
    kl: list[float] = []
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        log_q = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        log_p = F.log_softmax(reference(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        kl.extend(F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean(dim=1).tolist())
    return kl


def paired_delta(a: Perplexity, b: Perplexity) -> tuple[float, float]:
    """Mean per-window NLL difference b - a and its standard error (same windows, same order)."""
    diffs = torch.tensor(b.window_nll) - torch.tensor(a.window_nll)
    se = diffs.std(unbiased=True).item() / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return diffs.mean().item(), se
