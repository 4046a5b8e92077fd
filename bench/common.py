"""What every benchmark shares: the shared/ data conventions, paired comparisons, JSON + markdown."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from automp.data import load_windows
from automp.evaluate import Perplexity, paired_delta, perplexity
from automp.model import load_model, max_positions
from automp.quantize import round_to_storage

WIKITEXT = "wikitext-2-raw-v1/test.joined.txt"
IN_DOMAIN = "corpus/wikipedia/enwiki2015_AD_wiki_85.txt"  # a Wikipedia shard bench-a never saw: in-domain text
CALIB = "calib/wiki.txt"


@dataclass
class Bench:
    """A benchmark model in fp16-as-stored form, with its evaluation and calibration windows."""

    model: torch.nn.Module
    tokenizer: object
    original: dict[str, torch.Tensor]
    eval_windows: torch.Tensor
    calib: torch.Tensor
    baseline: Perplexity

    @classmethod
    def load(cls, model_dir: str, data_dir: str, nsamples: int = 128, seed: int = 0) -> Bench:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        model, tokenizer = load_model(model_dir, device="cpu", dtype="float32")
        seqlen = max_positions(model)
        eval_windows = load_windows(str(Path(data_dir) / WIKITEXT), tokenizer, seqlen)
        calib = load_windows(str(Path(data_dir) / CALIB), tokenizer, seqlen, nsamples, seed)
        round_to_storage(model)  # the FP16 baseline is the model as a 16-bit checkpoint stores it
        original = {k: v.clone() for k, v in model.state_dict().items()}
        baseline = perplexity(model, eval_windows, progress=False)
        return cls(model, tokenizer, original, eval_windows, calib, baseline)

    def reset(self) -> torch.nn.Module:
        self.model.load_state_dict(self.original)
        return self.model

    def compare(self, model: torch.nn.Module | None = None) -> dict:
        """Perplexity of ``model`` (default: the bench model as it is now) against the FP16 baseline."""
        result = perplexity(model or self.model, self.eval_windows, progress=False)
        delta, se = paired_delta(self.baseline, result)
        return {
            "ppl": result.ppl,
            "delta_ppl_pct": 100 * (result.ppl / self.baseline.ppl - 1),
            "delta_nll": delta,
            "delta_nll_se": se,
        }


def score_both(model: torch.nn.Module, bench: Bench, indomain: torch.Tensor, indomain_fp: Perplexity) -> dict:
    """WikiText-2 and in-domain perplexity of ``model``: PPL, ΔPPL % against FP16 and the per-window NLLs."""
    wiki = perplexity(model, bench.eval_windows, progress=False)
    local = perplexity(model, indomain, progress=False)
    return {
        "ppl": wiki.ppl,
        "delta_ppl_pct": 100 * (wiki.ppl / bench.baseline.ppl - 1),
        "nll": wiki.window_nll,
        "indomain_ppl": local.ppl,
        "indomain_delta_pct": 100 * (local.ppl / indomain_fp.ppl - 1),
        "indomain_nll": local.window_nll,
    }


def mark_deltas(rows: list[dict], reference: dict) -> None:
    """Each row's ΔNLL against ``reference`` on WikiText-2 and in-domain text (``score_both``'s per-window
    NLLs), its paired SE, and ``*`` when beyond 2 SE (and 1e-6): ``wiki_delta``, ``wiki_se``, ``wiki_mark``,
    ``indomain_*``."""
    for row in rows:
        for text, field in (("wiki", "nll"), ("indomain", "indomain_nll")):
            delta, se = paired_delta(per_window(reference[field]), per_window(row[field]))
            row[f"{text}_delta"], row[f"{text}_se"] = delta, se
            row[f"{text}_mark"] = "*" if abs(delta) > max(2 * se, 1e-6) else ""  # float noise is not a difference


def per_window(nll: list[float]) -> Perplexity:
    """A row's saved per-window NLLs in the form ``paired_delta`` takes."""
    return Perplexity(0.0, len(nll), 0, 0, nll)


class RowCache:
    """One JSON file per finished row, so a killed benchmark resumes where it stopped."""

    def __init__(self, work: Path) -> None:
        self.dir = work / "rows"
        self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict | None:
        path = self.dir / f"{key.replace('/', '_')}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, key: str, row: dict) -> dict:
        path = self.dir / f"{key.replace('/', '_')}.json"
        path.with_suffix(".tmp").write_text(json.dumps(row, indent=1))
        path.with_suffix(".tmp").replace(path)
        return row


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec). Missing values print as '-'."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[k], spec) if row.get(k) is not None else "-" for k, _, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(name: str, payload: dict, table: str, out: str | None) -> None:
    """Print the JSON and the markdown table; also save the JSON when ``out`` is given."""
    text = json.dumps(payload, indent=1, default=str)
    if out:
        Path(out).write_text(text)
    print(text)
    print(f"\n### {name}\n\n{table}")
