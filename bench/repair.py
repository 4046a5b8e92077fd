"""Low-rank error correction (``+rN``) on a benchmark model: what a rank buys at its real bits.

    python bench/repair.py --model ../shared/models/bench-a --data ../shared/data --work /tmp/repair

Two parts, every allocation GPTQ-quantized for real block by block (``quantize_``, as ``automp run``
does) and evaluated in full:

* ``uniform <scheme>``: the whole model in one scheme (``--schemes``, w2g64 and w3g128), first with
  no correction, then with each estimator (``--methods``: the data-free ``svd``, ``diag`` and the
  activation-aware ``exact``, ``quantizers/lowrank.py``) at each rank (``--ranks``: 8, 16, 32).
* ``knapsack``: at each target (``--targets``: 2.5 and 3.125 real bits per weight) the exact knapsack
  under ``--proxy`` (``outgrad``, the run default) over the bits-only formats of bench/allocation.py
  (``bits-only``), and over those plus every quantized one with each rank in ``--joint-ranks`` (1, 2,
  4, 8: ``joint``, bits and rank chosen together, corrections fitted with ``exact``). One profile of
  all formats (cached in ``--work``) serves both: bits-only is the same problem restricted to the
  rank-free formats. The second table gives every proxy's knapsack's perplexity (all but ``kl``: KL is
  not profiled, a forward pass per layer x format) on a held-out slice of an unseen Wikipedia shard
  (each layer GPTQ-quantized alone on full-precision inputs, as bench/allocation.py's evaluator does),
  so one sees whether the conclusion depends on the proxy.

"avg bits" are real stored bits per weight over the quantized layers, scales and the corrections'
fp16 ``A`` and ``B`` counted; "adapter bits" is the corrections' share of it, ``16 r (in + out)``
summed over the layers and divided by their weight count. "quantize s" is the wall time of
``quantize_``. PPL is on the full WikiText-2 test text and, "in-domain", on ``--indomain-windows``
windows of a Wikipedia shard bench-a never saw (its WikiText-2 format differs from the raw Wikipedia
it was trained on). ``ΔNLL`` is the mean per-window NLL difference (nats per token) against the
*reference* row: the uncorrected row of the same scheme, or the bits-only knapsack at the same
target; negative means the correction helped. ``±`` is its paired standard error over the windows;
``*`` marks a difference larger than 2 SE (a real one), no mark a difference within the noise.
Uniform corrected rows cost more bits than their reference (see "avg bits"); the knapsack rows are
at equal real bits. Finished rows (and the profile) are cached in ``--work``, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from allocation import FORMATS, HELD_OUT, KL_WINDOWS  # noqa: E402
from automp.allocation import Allocation  # noqa: E402
from automp.data import load_windows  # noqa: E402
from automp.evaluate import Perplexity, paired_delta, perplexity  # noqa: E402
from automp.formats import get_format, parse_formats, with_ranks  # noqa: E402
from automp.model import Inventory, inventory  # noqa: E402
from automp.quantize import GPTQConfig, quantize_  # noqa: E402
from automp.search.evaluator import AllocationEvaluator  # noqa: E402
from automp.search.problem import Problem  # noqa: E402
from automp.search.registry import get_solver  # noqa: E402
from automp.sensitivity.profile import profile_model  # noqa: E402
from automp.sensitivity.table import PROXIES, CalibInfo  # noqa: E402
from automp.settings import RunSettings  # noqa: E402
from common import CALIB, IN_DOMAIN, Bench, RowCache, Timer, markdown_table, report, score_both  # noqa: E402

SCHEMES = "w2g64,w3g128"
METHODS = "svd,diag,exact"
RANKS = "8,16,32"
TARGETS = "2.5,3.125"
JOINT_RANKS = "1,2,4,8"
KINDS = ("bits-only", "joint")
PROXY_NAMES = tuple(p for p in PROXIES if p != "kl")  # no KL profile: a forward pass per layer x each of ~50 formats
SIGNIFICANT_SE = 2.0  # '*' marks a difference beyond this many standard errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", required=True, help="cache: the profile and every finished row")
    parser.add_argument("--schemes", default=SCHEMES, help="uniform schemes ('' skips the uniform part)")
    parser.add_argument("--methods", default=METHODS, help="correction estimators of the uniform part")
    parser.add_argument("--ranks", default=RANKS, help="correction ranks of the uniform part")
    parser.add_argument("--targets", default=TARGETS, help="knapsack targets in real bits ('' skips the knapsack)")
    parser.add_argument("--joint-ranks", default=JOINT_RANKS, help="the ranks the joint knapsack may add")
    parser.add_argument("--proxy", default=RunSettings.model_fields["proxy"].default, help="the knapsack's proxy")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--heldout-windows", type=int, default=16)
    parser.add_argument("--indomain-windows", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=0, help="first N WikiText-2 windows only (0: all)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    work = Path(args.work)
    cache = RowCache(work)

    bench = Bench.load(args.model, args.data, args.nsamples)
    if args.eval_windows:  # a smoke run: fewer WikiText-2 windows, baseline measured on the same ones
        bench.eval_windows = bench.eval_windows[: args.eval_windows]
        bench.baseline = perplexity(bench.model, bench.eval_windows, progress=False)
    inv = inventory(bench.model)
    seqlen = bench.eval_windows.shape[1]
    indomain = load_windows(str(Path(args.data) / IN_DOMAIN), bench.tokenizer, seqlen)[: args.indomain_windows]
    indomain_fp = perplexity(bench.model, indomain, progress=False)

    def evaluate(key: str, allocation: Allocation, extra: dict, correction: str = "exact") -> dict:
        """GPTQ-quantize ``allocation`` block by block, then WikiText-2 and in-domain perplexity (cached)."""
        if (row := cache.get(key)) is not None:
            return row
        model = bench.reset()
        with Timer() as timer:
            quantize_(model, allocation, "gptq", bench.calib, gptq=GPTQConfig(correction=correction), progress=False)
        row = {"key": key, **extra, **_bits(allocation, inv), "seconds": timer.seconds}
        row |= score_both(model, bench, indomain, indomain_fp)
        row["formats"] = dict(allocation.formats)
        bench.reset()
        print({k: v for k, v in row.items() if k not in ("nll", "indomain_nll", "formats")}, file=sys.stderr)
        return cache.put(key, row)

    rows = []
    for scheme in [s for s in args.schemes.split(",") if s]:
        reference = evaluate(
            f"uniform/{scheme}/none", Allocation.uniform(inv, scheme), {"label": f"uniform {scheme}", "rank": 0}
        )
        group = [reference]
        for method in args.methods.split(","):
            for rank in [int(r) for r in args.ranks.split(",")]:
                fmt = f"{scheme}+r{rank}"
                extra = {"label": f"uniform {fmt} ({method})", "correction": method, "rank": rank}
                group.append(
                    evaluate(f"uniform/{scheme}/{method}-r{rank}", Allocation.uniform(inv, fmt), extra, method)
                )
        rows += _versus(group, reference)

    targets = [float(t) for t in args.targets.split(",") if t]
    proxy_rows = []
    timings = cache.get("timings") or {}
    if targets:
        plain = parse_formats(FORMATS)
        formats = with_ranks(plain, [int(r) for r in args.joint_ranks.split(",")])
        heldout = load_windows(str(Path(args.data) / HELD_OUT), bench.tokenizer, seqlen)
        heldout = heldout[: KL_WINDOWS + args.heldout_windows]
        bench.reset()
        with Timer() as profile_timer:
            table = profile_model(
                bench.model, formats, bench.calib, model_name=args.model,
                calib_info=CalibInfo(spec=CALIB, nsamples=args.nsamples, seqlen=seqlen, seed=0),
                work_dir=work / "profile", progress=False,
            )  # fmt: skip
        timings = cache.get("timings") or cache.put("timings", {"profile_seconds": profile_timer.seconds})
        allowed = {"bits-only": [fmt.name for fmt in plain], "joint": None}
        solutions = {
            (target, kind, proxy): get_solver("knapsack").solve(
                Problem(table, proxy=proxy, target_bits=target, allowed=allowed[kind])
            )
            for target in targets
            for kind in KINDS
            for proxy in PROXY_NAMES
        }
        heldout_ppl = _heldout(bench, cache, heldout[KL_WINDOWS:], solutions, timings)
        for target in targets:
            group = []
            for kind in KINDS:
                solution = solutions[(target, kind, args.proxy)]
                path = work / "allocations" / f"{target}_{kind}.json"
                path.parent.mkdir(exist_ok=True)
                solution.allocation.save(path)
                extra = {"label": f"knapsack {kind} @ {target:g} ({args.proxy})", "target_bits": target}
                extra |= {"predicted_loss": solution.predicted_loss, "search_seconds": solution.seconds}
                row = evaluate(f"knapsack/{target}/{kind}-{args.proxy}", solution.allocation, extra)
                row["heldout_ppl"] = heldout_ppl[(target, kind, args.proxy)]
                group.append(row)
            rows += _versus(group, group[0])
            for proxy in PROXY_NAMES:
                row = {"target_bits": target, "proxy": proxy}
                for kind in KINDS:
                    row[f"{kind}_heldout_ppl"] = heldout_ppl[(target, kind, proxy)]
                    row |= {
                        f"{kind}_{k}": v for k, v in _bits(solutions[(target, kind, proxy)].allocation, inv).items()
                    }
                row["joint_minus_bits_only"] = row["joint_heldout_ppl"] - row["bits-only_heldout_ppl"]
                proxy_rows.append(row)

    columns = [
        ("label", "allocation", ""),
        ("avg_bits", "avg bits", ".3f"),
        ("adapter_bits", "adapter bits", ".3f"),
        ("ranked_layers", "layers +r", "d"),
        ("heldout_ppl", "held-out PPL", ".2f"),
        ("ppl", "PPL", ".2f"),
        ("delta_ppl_pct", "ΔPPL % vs FP16", "+.2f"),
        ("vs_text", "ΔNLL vs reference ± SE", ""),
        ("indomain_ppl", "in-domain PPL", ".2f"),
        ("indomain_delta_pct", "in-domain ΔPPL % vs FP16", "+.2f"),
        ("indomain_vs_text", "in-domain ΔNLL vs reference ± SE", ""),
        ("seconds", "quantize s", ".1f"),
    ]
    table_md = markdown_table(rows, columns)
    if proxy_rows:
        table_md += (
            f"\n\nHeld-out PPL ({args.heldout_windows} windows of {HELD_OUT}) of the knapsack under every proxy, "
            "bits-only against joint at the same real bits (negative difference: joint is better):\n\n"
        )
        table_md += markdown_table(proxy_rows, [
            ("target_bits", "target", ".3f"), ("proxy", "proxy", ""),
            ("bits-only_heldout_ppl", "bits-only PPL", ".3f"), ("bits-only_avg_bits", "its bits", ".3f"),
            ("joint_heldout_ppl", "joint PPL", ".3f"), ("joint_avg_bits", "its bits", ".3f"),
            ("joint_adapter_bits", "joint adapter bits", ".3f"), ("joint_ranked_layers", "joint layers +r", "d"),
            ("joint_minus_bits_only", "joint − bits-only", "+.3f"),
        ])  # fmt: skip
    table_md += (
        f"\n\nFP16: WikiText-2 PPL {bench.baseline.ppl:.2f} ({bench.baseline.windows} windows), in-domain PPL "
        f"{indomain_fp.ppl:.2f} ({len(indomain)} windows of {IN_DOMAIN}). `*`: |ΔNLL| > {SIGNIFICANT_SE:g} SE."
    )
    if "profile_seconds" in timings:
        table_md += f" Profile {timings['profile_seconds']:.0f} s (once, every format and target)"
        table_md += f"; held-out evaluator set-up {timings.get('evaluator_seconds', 0):.0f} s."
    payload = {
        "model": args.model,
        "fp16_ppl": bench.baseline.ppl,
        "eval_windows": bench.baseline.windows,
        "indomain": {"text": IN_DOMAIN, "windows": len(indomain), "fp16_ppl": indomain_fp.ppl},
        "heldout": {"text": HELD_OUT, "windows": args.heldout_windows, "kl_windows": KL_WINDOWS},
        "bits_only_formats": FORMATS,
        "joint_ranks": args.joint_ranks,
        "proxy": args.proxy,
        **timings,
        "rows": [{k: v for k, v in row.items() if k not in ("nll", "indomain_nll", "vs_text", "indomain_vs_text")}
                 for row in rows],
        "heldout_by_proxy": proxy_rows,
    }  # fmt: skip
    report("low-rank error correction", payload, table_md, args.out)


def _bits(allocation: Allocation, inv: Inventory) -> dict:
    """Real bits per weight, the corrections' share of them, and how many layers carry one."""
    formats = [allocation.format_of(layer.name) for layer in inv.layers]
    adapter = sum(
        fmt.correction_bits(layer.out_features, layer.in_features)
        for fmt, layer in zip(formats, inv.layers, strict=True)
    )
    return {
        "avg_bits": allocation.avg_bits(inv),
        "adapter_bits": adapter / sum(layer.numel for layer in inv.layers),
        "ranked_layers": sum(1 for fmt in formats if fmt.rank),
    }


def _heldout(bench: Bench, cache: RowCache, windows, solutions: dict, timings: dict) -> dict:
    """Held-out-slice perplexity of every knapsack solution (cached; the evaluator is built only if needed)."""
    keys = {key: "heldout/{}/{}-{}".format(*key) for key in solutions}
    if any(cache.get(k) is None for k in keys.values()):
        used = sorted({fmt for s in solutions.values() for fmt in s.allocation.formats.values()})
        with Timer() as timer:
            evaluator = AllocationEvaluator(
                bench.reset(), windows, [get_format(f) for f in used], calib=bench.calib, method="gptq"
            )
        cache.put("timings", timings | {"evaluator_seconds": timer.seconds})
        timings["evaluator_seconds"] = timer.seconds
        for key, row_key in keys.items():
            if cache.get(row_key) is None:
                cache.put(row_key, {"heldout_ppl": evaluator(solutions[key].allocation)})
        evaluator.restore()
        bench.reset()
    return {key: cache.get(row_key)["heldout_ppl"] for key, row_key in keys.items()}


def _versus(group: list[dict], reference: dict) -> list[dict]:
    """Each row's paired NLL difference to ``reference`` on WikiText-2 and in-domain, '*' beyond 2 SE."""
    for row in group:
        for prefix in ("", "indomain_"):
            if row is reference:
                row[f"{prefix}vs_text"] = "reference"
                continue
            delta, se = paired_delta(_nll(reference, f"{prefix}nll"), _nll(row, f"{prefix}nll"))
            row[f"{prefix}vs_nll"], row[f"{prefix}vs_se"] = delta, se
            mark = " *" if abs(delta) > SIGNIFICANT_SE * se else ""
            row[f"{prefix}vs_text"] = f"{delta:+.4f} ± {se:.4f}{mark}"
    return group


def _nll(row: dict, key: str) -> Perplexity:
    return Perplexity(math.exp(float(np.mean(row[key]))), len(row[key]), 0, 0, row[key])


if __name__ == "__main__":
    main()
