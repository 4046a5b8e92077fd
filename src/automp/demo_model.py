"""A small causal LM that automp owns: trained on first use from the standard library's own docs.

Examples, tests and benchmarks need a real trained model, but must not download one. Every Python
install carries thousands of docstrings, so we render them to text, train a byte-level BPE tokenizer
and a tiny ``LlamaForCausalLM`` on it (about a minute on two CPU cores) and cache the result.

Every linear layer has an input dimension that is a multiple of 128, so group sizes 32, 64 and 128
divide all of them.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from automp.evaluate import perplexity as windowed_perplexity

CACHE_SUBDIR = "demo-model-v2"
EVAL_FILE = "eval.txt"
SUMMARY_FILE = "train_summary.json"
BOS, EOS = "<s>", "</s>"
# About 100 s of single-core CPU time (less wall time on two cores). Small batches learn more
# per token here: at equal tokens, 200 x 16 reached perplexity 111, 400 x 8 75 and 800 x 4 67.
# The default init std of 0.02 is too small for 128-wide layers (held-out perplexity 60.6 -> 57.4
# with 0.05), and beta2 = 0.99 with a 15 % warmup beat beta2 = 0.95 with 5 %.
DEMO_SETTINGS: dict[str, Any] = {
    "steps": 800, "batch": 4, "lr": 3e-3, "init_std": 0.05, "beta2": 0.99, "warmup": 0.15
}  # fmt: skip

# Imported for their side effects (printing, opening a browser or a GUI, starting a REPL), or
# replaced by third-party shims (setuptools swaps in its own distutils), or pure test suites, or
# pure-Python twins of C modules whose docstrings would duplicate them across the split.
_SKIP_TOP = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "test",
        "ensurepip",
        "lib2to3",
        "distutils",
        "readline",
        "rlcompleter",
        "encodings",
        "venv",
        "pydoc_data",
        "_pydecimal",
        "_pyio",
        "_py_abc",
    }
)
_SKIP_PARTS = frozenset({"__main__", "test", "tests", "idle_test"})
_EVAL_FRACTION = 0.12
_LITERALS = (type(None), bool, int, float, complex, str, bytes)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_WEIGHT_DECAY = 0.1


# --- training ----------------------------------------------------------------------------------


def train_model(
    out_dir: Path,
    train_text: str,
    *,
    hidden: int = 128,
    layers: int = 4,
    intermediate: int = 384,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 2048,
    seqlen: int = 256,
    batch: int = 16,
    steps: int = 600,
    lr: float = 3e-3,
    init_std: float = 0.02,
    beta2: float = 0.95,
    warmup: float = 0.05,  # fraction of the steps
    seed: int = 0,
    eval_text: str | None = None,
    progress: bool = False,
) -> Path:
    """Train a BPE tokenizer and a small ``LlamaForCausalLM`` on ``train_text``; save to ``out_dir``.

    AdamW with linear warmup and cosine decay on random ``seqlen``-token windows; the same seed
    gives the same model on the same machine. Everything is written to a temporary sibling
    directory first and renamed into place at the end, so an interrupted run leaves no half model
    (an existing ``out_dir`` is replaced). ``train_summary.json`` records steps, seconds and the
    final training loss; with ``eval_text`` also its perplexity, and the text is saved as ``eval.txt``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(train_text, vocab)
    ids = _encode(tokenizer, train_text)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seqlen,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    model = LlamaForCausalLM(config)
    loss = _fit(model, ids, seqlen, batch, steps, lr, beta2, warmup, seed=seed, progress=progress)
    summary: dict[str, Any] = {
        "steps": steps,
        "batch": batch,
        "seqlen": seqlen,
        "lr": lr,
        "init_std": init_std,
        "beta2": beta2,
        "warmup": warmup,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(ids),
        "train_loss": round(loss, 4),
    }
    if eval_text is not None:
        summary["eval_ppl"] = round(perplexity(model, tokenizer, eval_text, seqlen=seqlen), 4)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    _save(Path(out_dir), model, tokenizer, summary, eval_text, progress=progress)
    return Path(out_dir)


def _save(out_dir: Path, model: Any, tokenizer: Any, summary: dict, eval_text: str | None, *, progress: bool) -> None:
    """Write everything into a temporary sibling, then rename it to ``out_dir`` in one step."""
    from transformers.utils import logging as hf_logging

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    if bars and not progress:  # save_pretrained draws its own bar
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if eval_text is not None:
            (tmp / EVAL_FILE).write_text(eval_text, encoding="utf-8")
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out_dir)
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)


def train_tokenizer(text: str, vocab: int) -> Any:
    """A byte-level BPE tokenizer with ``<s>``/``</s>``, wrapped for ``transformers``.

    No BOS is prepended on encoding, so ``add_special_tokens`` makes no difference: training
    windows and evaluation see the same token stream whichever way a caller tokenizes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[BOS, EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_chunks(text), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=1 << 30,
    )


def _chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    # Line-aligned pieces let the Rust trainer and encoder work in parallel.
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    pieces = tokenizer(list(_chunks(text)), add_special_tokens=False)["input_ids"]
    return torch.tensor([t for piece in pieces for t in piece], dtype=torch.long)


def _fit(
    model: Any,
    ids: torch.Tensor,
    seqlen: int,
    batch: int,
    steps: int,
    lr: float,
    beta2: float,
    warmup: float,
    *,
    seed: int,
    progress: bool,
) -> float:
    """Train in place; returns the mean loss of the last (up to) 50 steps."""
    from transformers import get_cosine_schedule_with_warmup

    if len(ids) <= seqlen:
        raise ValueError(f"training text has {len(ids)} tokens, fewer than one {seqlen}-token window")
    # No weight decay on norms: shrinking their gains only fights the loss.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": _WEIGHT_DECAY}, {"params": other, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, beta2),
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, round(steps * warmup)), steps)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seqlen)
    recent: deque[float] = deque(maxlen=50)
    model.train()
    bar = tqdm(range(steps), desc="training demo model", file=sys.stderr, disable=not progress)
    for _ in bar:
        starts = torch.randint(0, len(ids) - seqlen, (batch, 1), generator=generator)
        inputs = ids[starts + offsets]
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss.item())
        bar.set_postfix(loss=f"{recent[-1]:.3f}", refresh=False)
    model.eval()
    return sum(recent) / len(recent)


def perplexity(model: Any, tokenizer: Any, text: str, *, seqlen: int = 256, batch: int = 16) -> float:
    """The held-out perplexity of ``text`` (tokenized once without special tokens) in ``seqlen`` windows."""
    ids = _encode(tokenizer, text)
    windows = ids[: len(ids) // seqlen * seqlen].view(-1, seqlen)
    if len(windows) == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one {seqlen}-token window")
    was_training = model.training
    model.eval()
    result = windowed_perplexity(model, windows, batch_size=batch, progress=False)
    model.train(was_training)
    return result.ppl


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``, replacing any previous model there."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# --- cache -------------------------------------------------------------------------------------


def demo_model_dir(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The cached demo model's directory (``$AUTOMP_CACHE`` or ``~/.cache/automp``), trained on
    first use: about a minute on two CPU cores.

    It holds the model and tokenizer (``from_pretrained`` loads both), ``eval.txt`` (held-out
    standard-library docs) and ``train_summary.json``.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / CACHE_SUBDIR
    if (target / SUMMARY_FILE).is_file():
        return target
    with _exclusive(root / f"{CACHE_SUBDIR}.lock"):
        if not (target / SUMMARY_FILE).is_file():  # another process may have just trained it
            train_text, eval_text = stdlib_corpus()
            train_model(target, train_text, **DEMO_SETTINGS, eval_text=eval_text, progress=progress)
    return target


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Let one process train while others (pytest-xdist workers, say) wait for its result."""
    try:
        import fcntl
    except ImportError:  # Windows: racing trainers still each publish a complete model
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_root() -> Path:
    """Where the demo keeps what it makes: ``$AUTOMP_CACHE``, or ``~/.cache/automp``."""
    env = os.environ.get("AUTOMP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "automp"


# --- corpus ------------------------------------------------------------------------------------


def stdlib_corpus() -> tuple[str, str]:
    """Return ``(train_text, eval_text)``: standard-library documentation split by package.

    Every importable module and submodule of the standard library is imported quietly and its
    docstrings and signatures rendered as plain text, in sorted order; the language reference
    topics that ``help()`` shows are added as one more package. Whole top-level packages are held
    out for evaluation (about 12% of the text), so the eval text documents unseen modules.

    Only docstrings and literal default values are rendered, never module data or arbitrary reprs:
    pydoc's own output leaks ``os.environ``, memory addresses and whatever ``sys.stdout`` was at
    import time, which would make the corpus differ between runs.
    """
    train: list[str] = []
    held_out: list[str] = []
    train_chars = held_chars = 0
    for top in _top_level_modules():
        text = _package_doc(top)
        if not text:
            continue
        # Greedy balancing keeps the held-out share near its target whatever the package sizes.
        if held_chars < _EVAL_FRACTION * (train_chars + held_chars + len(text)) - len(text) / 2:
            held_out.append(text)
            held_chars += len(text)
        else:
            train.append(text)
            train_chars += len(text)
    return "\n".join(train), "\n".join(held_out)


def _top_level_modules() -> list[str]:
    names = set(getattr(sys, "stdlib_module_names", sys.builtin_module_names)) - _SKIP_TOP
    return sorted({n for n in names if not n.startswith("__")} | {"pydoc_data.topics"})


def _package_doc(top: str) -> str:
    if top == "pydoc_data.topics":
        return _topics_doc()
    return "\n".join(doc for name in _walk(top) if (doc := _module_doc(name)))


def _topics_doc() -> str:
    """The language reference pages behind ``help('topics')``; plain text shipped with Python."""
    module = _quiet_import("pydoc_data.topics")
    topics = getattr(module, "topics", {})
    return "\n".join(f"Topic {key}\n\n{topics[key].strip()}\n" for key in sorted(topics))


def _walk(top: str) -> Iterator[str]:
    """``top`` and, if it is a package, its submodules, depth first in sorted order."""
    module = _quiet_import(top)
    if module is None:
        return
    yield top
    children = pkgutil.iter_modules(getattr(module, "__path__", None) or [])
    for name in sorted(info.name for info in children):
        if name not in _SKIP_PARTS:
            yield from _walk(f"{top}.{name}")


def _quiet_import(name: str) -> Any:
    """Import ``name`` with stdout, stderr and warnings silenced; ``None`` if it fails."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except (Exception, SystemExit):  # platform-specific or broken modules are just skipped
            return None


def _module_doc(name: str) -> str:
    module = sys.modules[name]
    parts = [f"Module {name}\n", _indent(_docstring(module), 4)]
    for attr in _member_names(module):
        obj = getattr(module, attr, None)
        # Only what the module defines itself: re-exports would repeat other modules' docs.
        if getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            parts.append(_class_doc(attr, obj, 0))
        elif inspect.isroutine(obj):
            parts.append(_routine_doc(attr, obj, 0))
    return _ADDRESS.sub("", "\n".join(p for p in parts if p).rstrip() + "\n")


def _member_names(module: Any) -> list[str]:
    names = getattr(module, "__all__", None)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        names = [n for n in vars(module) if not n.startswith("__")]
    return sorted(set(names))


def _class_doc(name: str, cls: type, indent: int) -> str:
    bases = ", ".join(_qualified(b) for b in cls.__bases__)
    parts = [" " * indent + f"class {name}({bases})", _indent(_docstring(cls), indent + 4)]
    for attr, value in sorted(vars(cls).items()):
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            head = " " * (indent + 4) + f"{attr} (property)\n"
            parts.append(head + _indent(_docstring(value), indent + 8))
        elif inspect.isclass(value) and value.__qualname__ == f"{cls.__qualname__}.{attr}":
            parts.append(_class_doc(attr, value, indent + 4))
        elif inspect.isroutine(value) and _shown_method(attr, value):
            parts.append(_routine_doc(attr, value, indent + 4))
    return "\n".join(p for p in parts if p) + "\n"


def _shown_method(name: str, func: Any) -> bool:
    if not name.startswith("__"):
        return True
    # Dunders only when written in Python and saying something (or giving the constructor's
    # signature): C slot wrappers all repeat the same one-line boilerplate.
    return inspect.isfunction(func) and (name in ("__init__", "__call__") or bool(_docstring(func)))


def _routine_doc(name: str, func: Any, indent: int) -> str:
    head = " " * indent + f"def {name}{_signature(func)}\n"
    return head + _indent(_docstring(func), indent + 4)


def _signature(func: Any) -> str:
    try:
        sig = inspect.signature(func)
        params = [
            p.replace(default=_Literal(p.default)) if p.default is not p.empty else p for p in sig.parameters.values()
        ]
        return str(sig.replace(parameters=params))
    except Exception:  # builtins often carry no (or a broken) introspectable signature
        return "(...)"


class _Literal:
    """A default value, shown as its repr only when that repr is the same in every run."""

    def __init__(self, value: object) -> None:
        stable = type(value) in _LITERALS or (type(value) is tuple and all(type(v) in _LITERALS for v in value))
        text = repr(value) if stable else "..."
        self.text = text if len(text) <= 60 else "..."

    def __repr__(self) -> str:
        return self.text


def _qualified(cls: type) -> str:
    module = getattr(cls, "__module__", "")
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _docstring(obj: object) -> str:
    # obj.__doc__, not inspect.getdoc: inherited docstrings would repeat the base class's text.
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) + "\n" if isinstance(doc, str) and doc.strip() else ""


def _indent(text: str, width: int) -> str:
    pad = " " * width
    return "".join(pad + line if line.strip() else line for line in text.splitlines(True))
