"""automp against its peers at matched real bytes, on any Hugging Face causal LM and any text files.

    python bench/peers.py --model DIR --calib FILE --eval FILE [--indomain FILE] --targets 2.5,3.125,4.125 \
        --work DIR [--json] [--methods automp,uniform,...] [--nsamples 128] [--seqlen N]

Every row is the model quantized within one target: average stored bits per weight of the decoder's
linear layers, in automp's exact accounting (codes, fp16 scales and zero-points counted,
``automp.formats.Format.storage_bits``). ``bytes`` is the whole model as automp would store it: those
layers packed, every other tensor in 16 bits. The rows at one target:

* ``automp``: ``automp run`` as delivered (``automp.pipeline.run``: profile, knapsack, verified delivery,
  GPTQ; every setting at its default), its checkpoint loaded back. The first target's run measures the
  sensitivity profile; later targets' runs find it in their output directory and reuse it, as ``automp
  run`` does, so their ``seconds`` leave it out.
* ``uniform-<format>``: the widest of ``--formats`` within the target, quantized by automp's GPTQ.
* ``autoscheme-rtn``, ``autoscheme-tuned``: AutoRound's AutoScheme (``pip install auto-round``) choosing
  per layer among the counterparts of ``automp run``'s formats (w2g64 = W2A16G64, w3g128 = W3A16,
  w4g128 = W4A16, w8 = 8-bit symmetric per channel, fp16 = BF16, which leaves a layer as it is), then
  AutoRound with ``iters=0`` (its RTN) or its default tuning. AutoRound counts a zero-point per group
  even for symmetric integers, which automp's symmetric formats do not store, so its budget is the one
  found by bisection whose choice spends the most real bits within the target (``autoscheme_bits``).
* ``autoscheme+gptq``: AutoScheme's per-layer choice quantized by automp's GPTQ.
* ``llmcompressor-gptq-<format>``, ``llmcompressor-awq-<format>``: llmcompressor at the widest of w4g128
  and w3g128 within the target, as ``bench/uniform.py`` runs it.
* ``modelopt-autoquantize``: NVIDIA ModelOpt's ``auto_quantize`` (``pip install nvidia-modelopt``) over
  the same integer formats (its INT4 block-128 and INT8 per-channel weight-only presets, 2- and 3-bit
  custom ones), the output head kept in 16 bits. It counts code bits only (no scales), and the head in
  its average, so its budget too is found by bisection (``modelopt_bits``: its count of code bits per
  allocated weight). It groups q/k/v and gate/up into one choice.

AutoRound, AutoScheme and every GPTQ see automp's calibration windows (``--calib``, ``--nsamples``
random windows, seed 0), llmcompressor and ModelOpt too. Every model is evaluated by the same code
(``automp.evaluate.perplexity``) on the same windows of ``--eval`` and ``--indomain``, with its
unquantized tensors at their 16-bit stored values. ``delta_nll`` is the per-token NLL minus the
``automp`` row's at the same target (the uniform row's when ``automp`` is not among ``--methods``),
paired over windows; ``delta_se`` its standard error. ``seconds``: choosing and quantizing, not
evaluating. A peer that is not installed, or fails, gives no row: the reason is in ``skipped`` in
``<work>/peers.json``. Finished rows are cached in ``--work``, so a killed run resumes. With ``--json``
the last line of stdout is the JSON list of rows; without it, the payload and a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from automp.allocation import Allocation  # noqa: E402
from automp.checkpoint import QUANT_FILE, load_quantized, model_bytes  # noqa: E402
from automp.data import load_windows  # noqa: E402
from automp.errors import AutompError  # noqa: E402
from automp.evaluate import paired_delta, perplexity  # noqa: E402
from automp.formats import SCALE_BITS, Format, get_format  # noqa: E402
from automp.model import Inventory, inventory, load_model  # noqa: E402
from automp.pipeline import run, window_length  # noqa: E402
from automp.quantize import quantize_, round_to_storage  # noqa: E402
from automp.sensitivity.table import TABLE_FILE  # noqa: E402
from automp.settings import DEFAULT_FORMATS, RunSettings  # noqa: E402
from common import RowCache, Timer, markdown_table, per_window, report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: every peer gets the local model and windows
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("AR_DISABLE_DATASET_SUBPROCESS", "1")  # AutoRound would fork to tokenize a dataset

UNIFORM_FORMATS = "w2g64,w3g128,w4g128,w3g64,w4g64,w8"
LLMCOMPRESSOR_FORMATS = ("w4g128", "w3g128")
RUN_FORMATS = DEFAULT_FORMATS["transformers"]  # what `automp run` chooses from; the peers get the same menu
METHODS = (
    "automp", "uniform", "autoscheme-rtn", "autoscheme-tuned", "autoscheme+gptq",
    "llmcompressor-gptq", "llmcompressor-awq", "modelopt",
)  # fmt: skip
EPS = 1e-9
HIDDEN = ("nll", "indomain_nll")  # per-window NLLs: cached, used for the paired deltas, not printed


class Skip(Exception):
    """A row that cannot be made here: its reason goes to ``skipped`` in the payload."""


@dataclass
class Setup:
    """The model as loaded (float32), its calibration windows and evaluation texts, shared by every row."""

    model_dir: str
    model: nn.Module
    original: dict[str, torch.Tensor]
    tokenizer: object
    inv: Inventory
    calib: torch.Tensor  # (nsamples, seqlen)
    texts: dict[str, torch.Tensor]  # column prefix ("" or "indomain_") -> (windows, seqlen)
    dense_bytes: int  # every stored tensor except the allocated layers, in 16 bits

    @classmethod
    def load(cls, args: argparse.Namespace) -> Setup:
        model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
        seqlen = window_length(model, args.seqlen)
        inv = inventory(model)
        texts = {"": load_windows(args.eval, tokenizer, seqlen)}
        if args.indomain:
            texts["indomain_"] = load_windows(args.indomain, tokenizer, seqlen)[: args.indomain_windows]
        calib = load_windows(args.calib, tokenizer, seqlen, args.nsamples, seed=0)  # as `automp run` draws them
        dense = model_bytes(model, {}) - sum(2 * layer.numel for layer in inv.layers)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        return cls(args.model, model, original, tokenizer, inv, calib, texts, dense)

    def reset(self) -> nn.Module:
        self.model.load_state_dict(self.original)
        return self.model

    def fresh(self) -> nn.Module:
        """A copy of the model as loaded, for a peer that changes it in place."""
        return copy.deepcopy(self.reset())

    def bytes(self, allocation: Allocation) -> int:
        return self.dense_bytes + allocation.stored_bits(self.inv) // 8

    def describe(self, allocation: Allocation) -> dict:
        return {
            "formats": summary(allocation),
            "avg_bits": allocation.avg_bits(self.inv),
            "bytes": self.bytes(allocation),
            "allocation": allocation.formats,
        }

    def score(self, model: nn.Module) -> dict:
        """Perplexity and per-window NLLs on every text, with the unquantized tensors at their 16-bit values."""
        names = {layer.name for layer in self.inv.layers}
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[0] not in names and param.dtype == torch.float32:
                param.data.copy_(param.data.half().float())
        row = {}
        for prefix, windows in self.texts.items():
            result = perplexity(model.eval(), windows, progress=False)
            row |= {f"{prefix}ppl": result.ppl, f"{prefix}nll": result.window_nll}
        return row


def summary(allocation: Allocation) -> str:
    counts = Counter(allocation.formats.values())
    if len(counts) == 1:
        return next(iter(counts))
    return " ".join(f"{name}×{n}" for name, n in sorted(counts.items(), key=lambda kv: get_format(kv[0]).bits))


def widest(inv: Inventory, formats: list[str], target: float) -> tuple[str, Allocation]:
    """The uniform format with the most stored bits within ``target`` (the first one on a tie)."""
    fits = []
    for name in formats:
        with contextlib.suppress(AutompError):  # a group size that does not divide every layer
            allocation = Allocation.uniform(inv, name)
            if allocation.avg_bits(inv) <= target + EPS:
                fits.append((allocation.avg_bits(inv), -len(fits), name, allocation))
    if not fits:
        raise Skip(f"none of {', '.join(formats)} fits within {target:g} bits")
    _, _, name, allocation = max(fits)
    return name, allocation


def unstored_bits(inv: Inventory, formats: list[str], per_group: Callable[[Format], int]) -> float:
    """The most bits per weight a peer's count can differ from automp's over these formats and layers, when it
    differs by ``per_group(fmt)`` bits per group: the width of the budget range the bisection searches."""
    quantized = [get_format(name) for name in formats if get_format(name).quantized]
    return max(per_group(fmt) / fmt.group(layer.in_features) for fmt in quantized for layer in inv.layers)


def fit_budget(choose: Callable[[float], tuple], lo: float, hi: float, target: float, inv: Inventory) -> tuple:
    """A peer's own budget in [lo, hi] whose choice spends the most automp bits within ``target``, by bisection.
    ``choose(budget)`` returns ``(allocation, ...)``; the answer is ``(budget, *choice)``."""
    best = (lo, *choose(lo))
    if best[1].avg_bits(inv) > target + EPS:
        raise Skip(f"its smallest budget ({lo:.4f}) already spends more than {target:g} bits in automp's count")
    top = choose(hi)
    if top[0].avg_bits(inv) <= target + EPS:
        return (hi, *top)
    for _ in range(8):  # to (hi - lo) / 256 of a bit
        mid = (lo + hi) / 2
        choice = choose(mid)
        if choice[0].avg_bits(inv) <= target + EPS:
            lo, best = mid, (mid, *choice)
        else:
            hi = mid
    return best


# ----------------------------------------------------------------------------------------------------------
# automp


def automp_row(setup: Setup, target: float, args: argparse.Namespace) -> tuple[dict, nn.Module]:
    """``automp run`` at ``target``, every setting at its default, then its checkpoint loaded back."""
    runs = Path(args.work) / "runs"
    out = runs / f"{target:g}"
    if not (out / "metrics.json").is_file():
        profiled = [p for p in sorted(runs.glob(f"*/{TABLE_FILE}")) if (p.parent / "metrics.json").is_file()]
        if profiled:  # an earlier target's finished run: the same model, formats and windows
            out.mkdir(parents=True, exist_ok=True)
            (out / TABLE_FILE).write_bytes(profiled[0].read_bytes())
        settings = RunSettings(
            model=args.model, calib=args.calib, target_bits=target, method="gptq", out=out,
            nsamples=args.nsamples, seqlen=args.seqlen,
        )  # fmt: skip
        run(settings, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    allocation = Allocation.load(out / QUANT_FILE)
    info = {"method": "automp", **setup.describe(allocation), "seconds": metrics["seconds"]}
    info |= {"delivered": metrics.get("delivered"), "profiled": "profile" in metrics["stage_seconds"]}
    return info, load_quantized(out, torch.float32)


def gptq(setup: Setup, allocation: Allocation) -> tuple[nn.Module, float]:
    model = setup.reset()
    with Timer() as timer:
        quantize_(model, allocation, "gptq", setup.calib, progress=False)
    return model, timer.seconds


def uniform_row(setup: Setup, target: float, args: argparse.Namespace) -> tuple[dict, nn.Module]:
    name, allocation = widest(setup.inv, args.formats.split(","), target)
    model, seconds = gptq(setup, allocation)
    return {"method": f"uniform-{name}", **setup.describe(allocation), "seconds": seconds}, model


# ----------------------------------------------------------------------------------------------------------
# AutoRound's AutoScheme


def autoround_options(formats: list[str]) -> list:
    """AutoScheme's counterpart of each automp format."""
    from auto_round.schemes import QuantizationScheme

    options = []
    for name in formats:
        fmt = get_format(name)
        if not fmt.quantized:
            options.append("BF16")  # AutoScheme's 16-bit option: the layer is not quantized
        elif fmt.kind == "int":
            group = fmt.group_size or -1
            scheme = {"bits": fmt.bits, "group_size": group, "sym": fmt.symmetric, "data_type": "int", "act_bits": 16}
            options.append(QuantizationScheme.from_dict(scheme))
        else:
            raise Skip(f"AutoScheme has no counterpart of {name}")
    return options


def automp_format(config: dict) -> str:
    """The automp format that stores one layer of AutoRound's layer config."""
    if config.get("bits", 16) >= 16:
        return "fp16"
    group = config["group_size"]
    return get_format(f"w{config['bits']}" + (f"g{group}" if group > 0 else "") + ("" if config["sym"] else "a")).name


def autoround_dataset(calib: torch.Tensor) -> str:
    """Register automp's calibration windows as an AutoRound dataset, so that AutoScheme and AutoRound see
    exactly them; the name holds their hash, as AutoScheme caches its scores by dataset name."""
    import datasets
    from auto_round.calib_dataset import register_dataset

    name = "automp-calib-" + hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:12]
    rows = {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    register_dataset(name)(lambda tokenizer, seqlen, **_: datasets.Dataset.from_dict(rows))
    return name


def autoround(setup: Setup, scheme: object, **options) -> object:
    from auto_round import AutoRound

    return AutoRound(
        setup.fresh(), tokenizer=setup.tokenizer, scheme=scheme, nsamples=len(setup.calib),
        seqlen=setup.calib.shape[1], dataset=autoround_dataset(setup.calib), amp=False,  # float32, as every row
        enable_torch_compile=False, **options,
    )  # fmt: skip


def autoscheme(setup: Setup, budget: float) -> object:
    from auto_round import AutoScheme

    options = autoround_options(RUN_FORMATS.split(","))
    return AutoScheme(avg_bits=budget, options=options, nsamples=len(setup.calib), seqlen=setup.calib.shape[1])


def as_allocation(setup: Setup, layer_config: dict) -> Allocation:
    names = [layer.name for layer in setup.inv.layers]
    allocation = Allocation(formats={name: automp_format(layer_config.get(name, {})) for name in names})
    allocation.check(setup.inv)
    return allocation


def autoscheme_choice(setup: Setup, target: float, cache: RowCache) -> dict:
    """AutoScheme's per-layer choice at the budget that spends the most real bits within ``target`` (cached)."""
    key = f"{target}/autoscheme-choice"
    if (choice := cache.get(key)) is not None:
        return choice

    def choose(budget: float) -> tuple[Allocation]:
        tool = autoround(setup, autoscheme(setup, budget), iters=0)
        tool.post_init()  # AutoScheme's choice; its scores are cached on disk, so each later budget is fast
        return (as_allocation(setup, tool.layer_config),)

    extra = unstored_bits(setup.inv, RUN_FORMATS.split(","), lambda fmt: fmt.bits if fmt.symmetric else 0)
    with Timer() as timer:  # AutoRound also counts a symmetric format's zero-points: its budget is the larger
        budget, allocation = fit_budget(choose, target, target + extra, target, setup.inv)
    return cache.put(key, {"budget": budget, "allocation": allocation.formats, "seconds": timer.seconds})


def autoscheme_row(setup: Setup, target: float, cache: RowCache, tuned: bool) -> tuple[dict, nn.Module]:
    choice = autoscheme_choice(setup, target, cache)
    with Timer() as timer:
        tool = autoround(setup, autoscheme(setup, choice["budget"]), **({} if tuned else {"iters": 0}))
        model, layer_config = tool.quantize()
    allocation = as_allocation(setup, layer_config)
    if allocation.formats != choice["allocation"]:
        raise Skip("AutoScheme chose differently when quantizing than when its budget was fitted")
    info = {"method": f"autoscheme-{'tuned' if tuned else 'rtn'}", **setup.describe(allocation)}
    info |= {"seconds": choice["seconds"] + timer.seconds, "autoscheme_bits": choice["budget"]}
    return info, model.float()


def autoscheme_gptq_row(setup: Setup, target: float, cache: RowCache) -> tuple[dict, nn.Module]:
    choice = autoscheme_choice(setup, target, cache)
    allocation = Allocation(formats=choice["allocation"])
    model, seconds = gptq(setup, allocation)
    info = {"method": "autoscheme+gptq", **setup.describe(allocation), "autoscheme_bits": choice["budget"]}
    return info | {"seconds": choice["seconds"] + seconds}, model


# ----------------------------------------------------------------------------------------------------------
# llmcompressor and ModelOpt


def llmcompressor_row(setup: Setup, target: float, method: str) -> tuple[dict, nn.Module]:
    from baselines import llmcompressor_quantize

    name, allocation = widest(setup.inv, list(LLMCOMPRESSOR_FORMATS), target)
    with Timer() as timer:
        model = llmcompressor_quantize(setup.model_dir, name, setup.calib, method)
    return {"method": f"llmcompressor-{method}-{name}", **setup.describe(allocation), "seconds": timer.seconds}, model


def modelopt_formats(formats: list[str]) -> tuple[list, dict]:
    """ModelOpt's weight-only counterparts of the quantized formats (its presets where one matches), and the
    automp format of each (num_bits, block) it can leave on a layer."""
    presets = {"w4g128": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "w8": "INT8_WEIGHT_ONLY_CFG"}
    choices, names = [], {}
    for name in formats:
        fmt = get_format(name)
        if not fmt.quantized:
            continue  # auto_quantize always keeps "not quantized" as a choice
        if fmt.kind != "int" or not fmt.symmetric:
            raise Skip(f"ModelOpt has no counterpart of {name}")
        shape = {"block_sizes": {-1: fmt.group_size}} if fmt.group_size else {"axis": 0}
        weights = {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": fmt.bits, **shape}}
        custom = {"quant_cfg": [weights, {"quantizer_name": "*input_quantizer", "enable": False}], "algorithm": "max"}
        choices.append(presets.get(name, custom))
        names[(fmt.bits, fmt.group_size)] = name
    return choices, names


def modelopt_allocation(setup: Setup, model: nn.Module, names: dict) -> Allocation:
    formats = {}
    for layer in setup.inv.layers:
        quantizer = model.get_submodule(layer.name).weight_quantizer
        block = (quantizer.block_sizes or {}).get(-1)
        formats[layer.name] = names[(quantizer.num_bits, block)] if quantizer.is_enabled else "fp16"
    return Allocation(formats=formats)


def modelopt_row(setup: Setup, target: float, work: Path) -> tuple[dict, nn.Module]:
    import modelopt.torch.quantization as mtq

    choices, names = modelopt_formats(RUN_FORMATS.split(","))
    allocated = {layer.name for layer in setup.inv.layers}
    linears = [(name, m) for name, m in setup.model.named_modules() if isinstance(m, nn.Linear)]
    head = sum(m.weight.numel() for name, m in linears if name not in allocated)  # the output head, kept 16-bit
    weights = sum(layer.numel for layer in setup.inv.layers)
    batches = [window[None] for window in setup.calib]
    checkpoint = work / "modelopt" / f"{target:g}.pt"  # its scores: each later budget only re-solves
    checkpoint.parent.mkdir(exist_ok=True)

    def choose(bits: float) -> tuple[Allocation, nn.Module]:
        effective = (bits * weights + 16 * head) / (weights + head)  # its average counts the 16-bit head too
        model, _ = mtq.auto_quantize(
            setup.fresh(), constraints={"effective_bits": effective}, quantization_formats=choices,
            data_loader=batches, forward_step=lambda m, ids: m(input_ids=ids, labels=ids),
            loss_func=lambda output, ids: output.loss, disabled_layers=["*lm_head*"],
            num_calib_steps=1,  # weight-only max calibration: the weights alone set it
            num_score_steps=len(batches), checkpoint=str(checkpoint),
        )  # fmt: skip
        return modelopt_allocation(setup, model, names), model

    lowest = min(get_format(name).bits for name in names.values())
    scales = unstored_bits(setup.inv, list(names.values()), lambda fmt: SCALE_BITS)  # it counts codes only
    with Timer() as timer:
        budget, allocation, model = fit_budget(choose, max(lowest, target - scales), target, target, setup.inv)
    info = {"method": "modelopt-autoquantize", **setup.describe(allocation), "seconds": timer.seconds}
    return info | {"modelopt_bits": budget}, model


# ----------------------------------------------------------------------------------------------------------


def make_rows(method: str, setup: Setup, target: float, args: argparse.Namespace, cache: RowCache) -> list[dict]:
    """The rows of one method family at one target: from the cache, or made and evaluated now."""
    work = Path(args.work)
    makers = {
        "automp": lambda: automp_row(setup, target, args),
        "uniform": lambda: uniform_row(setup, target, args),
        "autoscheme-rtn": lambda: autoscheme_row(setup, target, cache, tuned=False),
        "autoscheme-tuned": lambda: autoscheme_row(setup, target, cache, tuned=True),
        "autoscheme+gptq": lambda: autoscheme_gptq_row(setup, target, cache),
        "llmcompressor-gptq": lambda: llmcompressor_row(setup, target, "gptq"),
        "llmcompressor-awq": lambda: llmcompressor_row(setup, target, "awq"),
        "modelopt": lambda: modelopt_row(setup, target, work),
    }
    key = f"{target}/{method}"
    if (row := cache.get(key)) is None:
        peer = method not in ("automp", "uniform")
        try:
            with contextlib.redirect_stdout(sys.stderr):  # peers print; stdout ends with our JSON
                info, model = makers[method]()
        except Skip:
            raise
        except ImportError as err:
            raise Skip(f"not installed ({err})") from err
        except Exception as err:
            if not peer:
                raise
            traceback.print_exc()
            raise Skip(f"failed: {type(err).__name__}: {err}") from err
        row = cache.put(key, {"target_bits": target, **info, **setup.score(model)})
        print({k: v for k, v in row.items() if k not in (*HIDDEN, "allocation")}, file=sys.stderr, flush=True)
    return [row]


def paired(group: list[dict], texts: list[str]) -> list[dict]:
    """Each row's per-token NLL difference to the reference row of its target (automp, else uniform)."""
    reference = next((r for r in group if r["method"] == "automp"), None)
    reference = reference or next((r for r in group if r["method"].startswith("uniform-")), None)
    for row in group:
        row["reference"] = reference["method"] if reference else None
        for prefix in texts:
            if reference is not None:
                delta, se = paired_delta(per_window(reference[f"{prefix}nll"]), per_window(row[f"{prefix}nll"]))
                row[f"{prefix}delta_nll"], row[f"{prefix}delta_se"] = delta, se
    return group


def parse_methods(spec: str) -> list[str]:
    """Method names, or a family's prefix (``autoscheme``, ``llmcompressor``) for all of its rows."""
    methods = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        found = [m for m in METHODS if m == item or m.startswith(item + "-") or m.startswith(item + "+")]
        if not found:
            raise argparse.ArgumentTypeError(f"unknown method {item!r}: use {', '.join(METHODS)}")
        methods += [m for m in found if m not in methods]
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face causal LM directory")
    parser.add_argument("--calib", required=True, help="calibration text")
    parser.add_argument("--eval", required=True, help="evaluation text (never used to choose anything)")
    parser.add_argument("--indomain", help="a second evaluation text")
    parser.add_argument("--indomain-windows", type=int, help="only the first N windows of --indomain")
    parser.add_argument("--targets", default="2.5,3.125,4.125", help="average stored bits per weight")
    parser.add_argument("--work", required=True, help="cache: every finished row, the runs, peers' scores")
    parser.add_argument("--methods", type=parse_methods, default=list(METHODS), help=f"of {', '.join(METHODS)}")
    parser.add_argument("--formats", default=UNIFORM_FORMATS, help="the uniform row's candidates")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, help="default: the model's maximum positions, at most 2048")
    parser.add_argument("--json", action="store_true", help="end stdout with the JSON list of rows")
    args = parser.parse_args()
    work = Path(args.work)
    cache = RowCache(work)
    os.environ.setdefault("AR_AUTO_SCHEME_CACHE", str(work / "autoscheme-cache"))  # AutoScheme's scores
    os.environ.setdefault("AR_WORK_SPACE", str(work / "autoround"))  # AutoRound's offload folder

    setup = Setup.load(args)
    if (fp16 := cache.get("fp16")) is None:  # the model as a 16-bit checkpoint stores it
        model = setup.fresh()
        round_to_storage(model)
        fp16 = cache.put("fp16", setup.score(model))
    texts = list(setup.texts)
    rows, skipped = [], {}
    for target in [float(t) for t in args.targets.split(",")]:
        group = []
        for method in args.methods:
            try:
                group += make_rows(method, setup, target, args, cache)
            except Skip as why:
                skipped[f"{method} @ {target:g}"] = str(why)
                print(f"skipped {method} at {target:g} bits: {why}", file=sys.stderr, flush=True)
        rows += paired(group, texts)

    public = [{k: v for k, v in row.items() if k not in (*HIDDEN, "allocation")} for row in rows]
    payload = {
        "model": args.model,
        "calib": {"text": args.calib, "nsamples": args.nsamples, "seed": 0},
        "seqlen": setup.calib.shape[1],
        "eval": {"text": args.eval, "windows": len(setup.texts[""]), "fp16_ppl": fp16["ppl"]},
        "indomain": {"text": args.indomain, "windows": len(setup.texts["indomain_"]), "fp16_ppl": fp16["indomain_ppl"]}
        if args.indomain
        else None,
        "rows": public,
        "allocations": {f"{row['target_bits']}/{row['method']}": row["allocation"] for row in rows},
        "skipped": skipped,
    }
    (work / "peers.json").write_text(json.dumps(payload, indent=1))
    if args.json:
        print(json.dumps(public))
        return
    columns = [
        ("target_bits", "target", ".3f"), ("method", "method", ""), ("formats", "formats", ""),
        ("avg_bits", "avg bits", ".4f"), ("bytes", "bytes", "d"), ("ppl", "PPL", ".2f"),
        ("delta_nll", "ΔNLL vs ref", "+.5f"), ("delta_se", "±", ".5f"),
        *([("indomain_ppl", "in-domain PPL", ".2f"), ("indomain_delta_nll", "ΔNLL vs ref", "+.5f"),
           ("indomain_delta_se", "±", ".5f")] if args.indomain else []),
        ("seconds", "seconds", ".1f"),
    ]  # fmt: skip
    table = markdown_table(public, columns)
    table += f"\n\nref: {rows[0]['reference'] if rows else '-'} at the same target; FP16 PPL {fp16['ppl']:.2f}"
    table += f" (in-domain {fp16['indomain_ppl']:.2f})." if args.indomain else "."
    for key, why in skipped.items():
        table += f"\nskipped {key}: {why}"
    report("peers at matched real bytes", {k: v for k, v in payload.items() if k != "allocations"}, table, None)


if __name__ == "__main__":
    main()
