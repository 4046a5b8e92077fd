"""Calibration and evaluation text, as token windows.

A text spec is a local ``.txt`` file, a ``.jsonl`` file with a ``text`` field per row (rows joined
with blank lines, as the perplexity protocol joins WikiText-2), or, with the hub reachable, the name
``wikitext2`` (wikitext-2-raw-v1 test) or ``c4`` (the first validation shard).

Calibration may mix several sources, ``a.txt,b.jsonl``: the windows are shared out equally between
them (the first sources take the remainder), so each source contributes the same number of tokens
whatever its size. Evaluation windows of a list are each source's windows, one after the other.

Held-out windows (``heldout_windows``) come from the same text as the calibration windows but never
overlap them: they are the text's aligned windows that share no token with any calibration window.
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


def sources(spec: str) -> list[str]:
    """The text specs of a comma-separated list (one spec is a list of one)."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise AutompError("no text given")
    return parts


def _shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal counts, the first ones taking the remainder."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _calibration_starts(length: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    if nsamples < 1:
        raise AutompError("--nsamples must be at least 1")
    if length <= seqlen:
        raise AutompError(
            f"calibration text has {length} tokens, fewer than one window of {seqlen}; "
            "give more text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, length - seqlen, (nsamples,), generator=generator).tolist()


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (fixed seed): (nsamples, seqlen)."""
    starts = _calibration_starts(len(tokens), nsamples, seqlen, seed)
    return torch.stack([tokens[s : s + seqlen] for s in starts])


def heldout_windows(
    tokens: torch.Tensor, count: int, seqlen: int, calib_nsamples: int, calib_seed: int, seed: int
) -> torch.Tensor:
    """Up to ``count`` aligned windows, drawn under ``seed``, that overlap none of the calibration
    windows ``calibration_windows(tokens, calib_nsamples, seqlen, calib_seed)`` takes: (n, seqlen)."""
    taken = torch.zeros(len(tokens), dtype=torch.bool)
    for start in _calibration_starts(len(tokens), calib_nsamples, seqlen, calib_seed):
        taken[start : start + seqlen] = True
    free = [k for k in range(len(tokens) // seqlen) if not taken[k * seqlen : (k + 1) * seqlen].any()]
    if not free:
        raise AutompError(
            "the calibration windows cover the whole calibration text: no held-out window is left; "
            "give held-out text (--verify-text) or fewer --nsamples"
        )
    order = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.stack([tokens[free[k] * seqlen : (free[k] + 1) * seqlen] for k in sorted(order.tolist())])


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
    """Calibration windows when ``nsamples`` is given (shared out over the sources), else evaluation windows."""
    specs = sources(spec)
    texts = [tokenize(read_text(part), tokenizer) for part in specs]
    if nsamples is None:
        return torch.cat([eval_windows(tokens, seqlen) for tokens in texts])
    if nsamples < len(specs):
        raise AutompError(f"--nsamples {nsamples} is fewer than the {len(specs)} calibration sources")
    shares = _shares(nsamples, len(specs))
    return torch.cat([calibration_windows(t, n, seqlen, seed) for t, n in zip(texts, shares, strict=True)])


def load_heldout_windows(
    spec: str, tokenizer, seqlen: int, count: int, calib_nsamples: int, calib_seed: int, seed: int
) -> torch.Tensor:
    """``count`` windows of the calibration text ``spec`` that the calibration windows do not touch,
    shared out over its sources as the calibration windows are."""
    specs = sources(spec)
    calib_shares = _shares(calib_nsamples, len(specs))
    windows = [
        heldout_windows(tokenize(read_text(part), tokenizer), n, seqlen, m, calib_seed, seed)
        for part, n, m in zip(specs, _shares(count, len(specs)), calib_shares, strict=True)
        if n > 0
    ]
    return torch.cat(windows)
