"""Calibration and evaluation text, as token windows.

A text spec is a local ``.txt`` file, a ``.jsonl`` file with a ``text`` field per row (rows joined
with blank lines, as the perplexity protocol joins WikiText-2), or, with the hub reachable, the name
``wikitext2`` (wikitext-2-raw-v1 test) or ``c4`` (the first validation shard).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from automp.errors import AutompError

HUB_DATASETS = ("wikitext2", "c4")


def read_text(spec: str) -> str:
    path = Path(spec)
    if spec in HUB_DATASETS and not path.exists():
        return _hub_text(spec)
    if not path.is_file():
        raise AutompError(
            f"text file {spec} does not exist (give a .txt or .jsonl path, or {' / '.join(HUB_DATASETS)})"
        )
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise AutompError(f"{path}:{number}: expected a JSON object with a 'text' field") from err
        text = "\n\n".join(rows)
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise AutompError(f"text file {spec} is empty")
    return text


def _hub_text(name: str) -> str:
    try:
        from datasets import load_dataset

        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
            return "\n\n".join(rows)
        shard = "en/c4-validation.00000-of-00008.json.gz"
        rows = load_dataset("allenai/c4", data_files={"validation": shard}, split="validation")["text"]
        return " ".join(rows[:1100])  # the GPTQ paper's C4 evaluation slice
    except Exception as err:  # ImportError, connection errors, hub errors
        raise AutompError(
            f"could not fetch dataset {name!r} from the hub ({err.__class__.__name__}); "
            "install `datasets` and go online, or pass a local .txt/.jsonl file"
        ) from err


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """The whole text tokenized once, without special tokens, as a 1-D LongTensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (fixed seed): (nsamples, seqlen)."""
    if nsamples < 1:
        raise AutompError("--nsamples must be at least 1")
    if len(tokens) <= seqlen:
        raise AutompError(
            f"calibration text has {len(tokens)} tokens, fewer than one window of {seqlen}; "
            "give more text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seqlen, (nsamples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens, remainder dropped: (n, seqlen)."""
    n = len(tokens) // seqlen
    if n == 0:
        raise AutompError(
            f"evaluation text has {len(tokens)} tokens, fewer than one window of {seqlen}; "
            "give more text or a smaller --seqlen"
        )
    return tokens[: n * seqlen].reshape(n, seqlen)


def load_windows(spec: str, tokenizer, seqlen: int, nsamples: int | None = None, seed: int = 0) -> torch.Tensor:
    """Calibration windows when ``nsamples`` is given, else evaluation windows."""
    tokens = tokenize(read_text(spec), tokenizer)
    if nsamples is None:
        return eval_windows(tokens, seqlen)
    return calibration_windows(tokens, nsamples, seqlen, seed)
