"""Zero-shot multiple-choice tasks scored by log-likelihood, from local files in MosaicML's ICL layout.

Each line of ``<tasks-dir>/<task>.jsonl`` is one item, in one of two layouts:

* multiple choice: ``{"query": ..., "choices": [...], "gold": i}``; each choice is scored as the
  continuation of the query,
* schema (WinoGrande): ``{"context_options": [...], "continuation": ..., "gold": i}``; the shared
  continuation is scored after each context option (partial scoring).

The prompts follow MosaicML's gauntlet (llm-foundry ``tasks_v0.3.yaml``): the query, a task's
continuation delimiter (``"\\nAnswer: "`` for ARC, BoolQ and PIQA, else ``" "``) with trailing
whitespace moved onto the continuation as one space, and the tokenizer's BOS in front (EOS when it
has none, so the first continuation token is always predicted). Context and continuation
are tokenized separately; a too-long context loses tokens from its start.

``acc`` picks the choice with the highest summed continuation log-likelihood, ``acc_norm`` the
highest per character of the choice as written in the file, without the delimiter's space in front
(lm-evaluation-harness's ``acc_norm``: ``len(choice)``). Schema tasks (WinoGrande) score one shared
continuation, so per-character normalisation cannot change their pick: they report ``acc`` only, as
lm-eval does. ``stderr`` is the binomial standard error ``sqrt(p (1 - p) / (n - 1))``.

``evaluate_tasks(..., log_samples=FILE)`` writes one JSON line per item (task, index, each choice's
continuation, log-likelihood and characters, the picks, gold), so any score can be audited.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from automp.errors import AutompError
from automp.io import write_file_atomic
from automp.model import max_positions

DELIMITERS = {"arc_easy": "\nAnswer: ", "arc_challenge": "\nAnswer: ", "boolq": "\nAnswer: ", "piqa": "\nAnswer: "}
DEFAULT_TASKS_DIR = Path("data/eval")


@dataclass
class Item:
    requests: list[tuple[str, str]]  # (context, continuation), one per choice
    gold: int
    lengths: list[int] | None = None  # characters of each choice as written (acc_norm); None: a schema item


@dataclass
class Scores:
    """Log-likelihoods of every request, and what scoring them cost."""

    loglik: list[float]
    tokens: int  # tokens forwarded, padding excluded
    seconds: float  # wall time of the forwards


def resolve_tasks_dir(tasks_dir: Path | None) -> Path:
    if tasks_dir is not None:
        if not Path(tasks_dir).is_dir():
            raise AutompError(f"--tasks-dir {tasks_dir} is not a directory")
        return Path(tasks_dir)
    if DEFAULT_TASKS_DIR.is_dir():
        return DEFAULT_TASKS_DIR
    raise AutompError(f"no task files: ./{DEFAULT_TASKS_DIR} does not exist, pass --tasks-dir DIR")


def load_task(name: str, tasks_dir: Path, limit: int | None = None) -> list[Item]:
    """The first ``limit`` items of ``<tasks_dir>/<name>.jsonl``; a bad line is an error naming it."""
    if limit is not None and limit < 1:
        raise AutompError("--limit must be at least 1")
    path = Path(tasks_dir) / f"{name}.jsonl"
    if not path.is_file():
        available = sorted(p.stem for p in Path(tasks_dir).glob("*.jsonl"))
        raise AutompError(f"task {name!r}: no file {path} (available: {', '.join(available) or 'none'})")
    delimiter = DELIMITERS.get(name, " ")
    items: list[Item] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if limit is not None and len(items) >= limit:
                break
            if line.strip():
                items.append(_parse(line, delimiter, f"{path}:{number}"))
    if not items:
        raise AutompError(f"task file {path} has no items")
    return items


def _parse(line: str, delimiter: str, where: str) -> Item:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise AutompError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(row, dict):
        raise AutompError(f"{where}: expected a JSON object")
    if "context_options" in row:
        contexts, continuation = row["context_options"], row.get("continuation")
        if not _strings(contexts) or not isinstance(continuation, str):
            raise AutompError(f"{where}: 'context_options' must be a list of 2+ strings and 'continuation' a string")
        pairs = [_split(context + delimiter, continuation) for context in contexts]
    else:
        query, choices = row.get("query"), row.get("choices")
        if not isinstance(query, str) or not _strings(choices):
            raise AutompError(f"{where}: expected 'query' (a string) and 'choices' (a list of 2+ strings)")
        pairs = [_split(query + delimiter, choice) for choice in choices]
    gold = row.get("gold")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(pairs):
        raise AutompError(f"{where}: 'gold' must be an index into the {len(pairs)} choices, got {gold!r}")
    return Item(pairs, gold, None if "context_options" in row else [len(choice) for choice in choices])


def _strings(value: object) -> bool:
    return isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) and v.strip() for v in value)


def _split(context: str, continuation: str) -> tuple[str, str]:
    # a context ending in a space tokenizes badly; the space belongs to the continuation's first word
    stripped = context.rstrip()
    return stripped, (" " + continuation.lstrip() if stripped != context else continuation)


@torch.no_grad()
def score(
    model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8, desc: str = "", progress: bool = True
) -> Scores:
    """Summed log-probability of each continuation given its context (one forward per request)."""
    device = next(model.parameters()).device
    limit = max_positions(model) or 1 << 30
    prefix = _prefix(tokenizer)
    encoded = []
    for context, continuation in requests:
        ctx = prefix + tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not cont or len(cont) >= limit:
            raise AutompError(f"continuation {continuation[:40]!r} has {len(cont)} tokens; it must fit the model")
        encoded.append(((ctx + cont)[-limit:], len(cont)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths share a batch
    loglik = [0.0] * len(encoded)
    tokens, seconds = 0, 0.0
    for start in tqdm(range(0, len(order), batch_size), desc=desc or "score", disable=not progress, leave=False):
        batch = order[start : start + batch_size]
        width = len(encoded[batch[0]][0])
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # right padding: causal, so never attended
        for row, i in enumerate(batch):
            ids[row, : len(encoded[i][0])] = torch.tensor(encoded[i][0])
        began = time.perf_counter()
        logits = model(input_ids=ids.to(device), use_cache=False).logits
        for row, i in enumerate(batch):
            seq, n = encoded[i]
            logprobs = torch.log_softmax(logits[row, len(seq) - n - 1 : len(seq) - 1].float(), dim=-1)
            target = torch.tensor(seq[-n:], device=logprobs.device)
            loglik[i] = logprobs.gather(1, target.unsqueeze(1)).sum().item()
        seconds += time.perf_counter() - began
        tokens += sum(len(encoded[i][0]) for i in batch)
    return Scores(loglik, tokens, seconds)


def _prefix(tokenizer) -> list[int]:
    """What the tokenizer puts in front of a text (BOS for Llama-style ones), as MosaicML's preamble."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    if ids and ids[-1] == tokenizer.eos_token_id:  # some tokenizers also append EOS: not a prefix
        ids = ids[:-1]
    if not ids and tokenizer.eos_token_id is not None:  # nothing to condition the first token on otherwise
        ids = [tokenizer.eos_token_id]
    return ids


def accuracy(items: list[Item], loglik: list[float]) -> dict:
    """acc, acc_norm (per choice character; multiple-choice tasks only), their binomial standard errors,
    count and chance."""
    picks = picks_per_item(items, loglik)
    n = len(items)
    acc = sum(pick == item.gold for item, (pick, _) in zip(items, picks, strict=True)) / n
    result = {"acc": acc, "stderr": _stderr(acc, n), "count": n}
    if all(item.lengths is not None for item in items):
        acc_norm = sum(pick == item.gold for item, (_, pick) in zip(items, picks, strict=True)) / n
        result |= {"acc_norm": acc_norm, "acc_norm_stderr": _stderr(acc_norm, n)}
    return result | {"chance": sum(1 / len(item.requests) for item in items) / n}


def picks_per_item(items: list[Item], loglik: list[float]) -> list[tuple[int, int | None]]:
    """Each item's pick by summed log-likelihood, and per choice character (None for schema items)."""
    picks = []
    for item, ll in zip(items, _per_item(items, loglik), strict=True):
        norm = None if item.lengths is None else _argmax([v / max(n, 1) for v, n in zip(ll, item.lengths, strict=True)])
        picks.append((_argmax(ll), norm))
    return picks


def _per_item(items: list[Item], loglik: list[float]) -> list[list[float]]:
    ends = list(itertools.accumulate(len(item.requests) for item in items))
    return [loglik[a:b] for a, b in itertools.pairwise([0, *ends])]


def sample_records(name: str, items: list[Item], loglik: list[float]) -> list[dict]:
    """One auditable record per item: each choice's continuation, log-likelihood and characters, the picks."""
    picks = picks_per_item(items, loglik)
    return [
        {"task": name, "index": index, "continuations": [cont for _, cont in item.requests], "loglik": ll,
         "chars": item.lengths, "pick": pick, "pick_norm": pick_norm, "gold": item.gold}
        for index, (item, ll, (pick, pick_norm)) in enumerate(zip(items, _per_item(items, loglik), picks, strict=True))
    ]  # fmt: skip


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # ties go to the first choice


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def evaluate_tasks(
    model,
    tokenizer,
    names: list[str],
    tasks_dir: Path,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    log_samples: Path | None = None,
) -> tuple[dict[str, dict], Scores]:
    """Accuracy per task, and the forward cost summed over tasks (its loglik list left empty). With
    ``log_samples``, every item's record (``sample_records``) as JSON lines in that file."""
    tasks = {name: load_task(name, tasks_dir, limit) for name in names}  # every file checked before scoring
    results, total, records = {}, Scores([], 0, 0.0), []
    for name, items in tasks.items():
        requests = [request for item in items for request in item.requests]
        scores = score(model, tokenizer, requests, batch_size, desc=name, progress=progress)
        results[name] = accuracy(items, scores.loglik)
        records += sample_records(name, items, scores.loglik) if log_samples is not None else []
        total.tokens += scores.tokens
        total.seconds += scores.seconds
    if log_samples is not None:
        write_file_atomic(Path(log_samples), "".join(json.dumps(record) + "\n" for record in records))
    return results, total
