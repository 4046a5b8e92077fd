"""Self-generated training data (LLM-QAT): windows sampled from the full-precision model itself.

Each window starts at a random vocabulary token; the next ``greedy`` tokens (3–5 in LLM-QAT; default 4)
are the model's greedy choices, the rest are sampled from its next-token distribution. Generation is
seeded, and the windows are cached on disk (safetensors) under a key of the model's weights and the
options, so a rerun reads them back. The result has the shape the data loader returns: ``(n, seqlen)``
token ids, usable wherever calibration or training windows are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from automp.errors import AutompError
from automp.execution.blocks import model_device


@torch.no_grad()
def generate_windows(
    model: nn.Module,
    n: int,
    seqlen: int,
    *,
    greedy: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens sampled from ``model`` (see the module docstring)."""
    if n <= 0 or seqlen < 2:
        raise AutompError("self-generated data needs at least one window of at least 2 tokens")
    if temperature <= 0:
        raise AutompError(f"temperature must be positive, not {temperature}")
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    windows = []
    for start in tqdm(range(0, n, batch_size), desc="self-generating", disable=not progress, leave=False):
        rows = min(batch_size, n - start)
        ids = torch.randint(vocab, (rows, 1), generator=generator)
        past = None
        for position in range(1, seqlen):
            step = ids if past is None else ids[:, -1:]  # (B, T) the first time, then (B, 1) with the cache
            out = model(input_ids=step.to(device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1].float().cpu()
            if position <= greedy:
                token = logits.argmax(-1, keepdim=True)
            else:
                token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
            ids = torch.cat([ids, token], dim=1)
        windows.append(ids)
    return torch.cat(windows)


def cached_windows(model: nn.Module, cache_dir: Path, n: int, seqlen: int, seed: int = 0, **options) -> torch.Tensor:
    """:func:`generate_windows`, read from ``cache_dir`` when this model and these options made them before."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().flatten()[:1024].float().cpu().numpy().tobytes())  # a fingerprint of each
    digest.update(repr((n, seqlen, seed, sorted(options.items()))).encode())
    path = Path(cache_dir) / f"selfgen-{digest.hexdigest()[:16]}.safetensors"
    if path.is_file():
        return load_file(path)["windows"]
    windows = generate_windows(model, n, seqlen, seed=seed, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"windows": windows.contiguous()}, partial)
    partial.replace(path)
    return windows
