"""Mixed precision on a benchmark model: uniform GPTQ against every solver at the same real bits.

    python bench/allocation.py --model ../shared/models/bench-a --data ../shared/data --work /tmp/alloc

One sensitivity profile (cached in ``--work``) serves every target and solver. Targets are the bits
of uniform formats, so each solver has a uniform baseline at exactly its budget:
w2g64 = 2.25, w2g32 = 2.5, w3g128 = 3.125, w3g32 = 3.5 and w4g128 = 4.125 bits per weight (fp16
scales counted). Per-channel w2 (about 2.03 bits) is profiled too, so 2.25 bits has a real choice.

* ``knapsack (<proxy>)``: the exact knapsack under each proxy. The *selected* proxy at each target
  is the one whose allocation has the lowest perplexity on a held-out slice of an unseen Wikipedia
  shard. It is chosen there, never on the WikiText-2 test text. Only its allocation is evaluated
  in full, unless ``--all-proxies``.
* ``greedy`` and ``quantile`` use the selected proxy. ``anneal`` starts from its knapsack allocation
  and spends ``--anneal-evals`` real evaluations on the held-out slice.
* ``reinforce`` and ``ppo`` (``--episodes``, 300 as in the prototype) at w4g128's bits with the
  prototype's bit options (3, 4, 8: w3g128, w4g128, w8), next to the knapsack restricted to the
  same options (``--no-rl`` skips them).
* ``delivered``: what ``automp run`` delivers after verification (``automp.delivery``), with the
  run's defaults: the knapsack under ``--run-proxy`` as the search's own answer, every proxy's
  knapsack, uniform and the uniform mix, each GPTQ-quantized and measured on 32 windows of the
  calibration text that no calibration window touches (``automp run``'s default verification text).
  "changed" marks the targets where verification delivered something else than the search's answer.
  The selection table checks, split-half on the verification windows only, how well picking the lowest
  mean generalises against keeping the search's own unless beaten by more than ``TIE_SE`` SE.
* ``--bootstrap N``: each target's knapsack (``--run-proxy``) re-solved on N resamples of the
  calibration windows: each layer's format stability and the predicted loss's 95 % interval.

Every allocation is then quantized for real with GPTQ (block by block, as ``automp run`` does) and
evaluated on the full WikiText-2 test text, and on ``--indomain-windows`` windows of a second unseen
Wikipedia shard (in-domain text: bench-a's WikiText-2 format differs from the raw Wikipedia it was
trained on). ``±`` is the paired standard error of the per-window NLL difference against uniform
GPTQ at the same bits. "evals" counts the solver's real evaluations
on the held-out slice. Finished rows are cached in ``--work``, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from automp.allocation import Allocation  # noqa: E402
from automp.data import load_heldout_windows, load_windows  # noqa: E402
from automp.delivery import RealQuality, verify_delivery  # noqa: E402
from automp.evaluate import Perplexity, kl_to_reference, paired_delta, perplexity  # noqa: E402
from automp.formats import parse_formats  # noqa: E402
from automp.model import inventory  # noqa: E402
from automp.quantize import quantize_  # noqa: E402
from automp.search.bootstrap import bootstrap  # noqa: E402
from automp.search.evaluator import AllocationEvaluator  # noqa: E402
from automp.search.problem import Problem  # noqa: E402
from automp.search.registry import get_solver  # noqa: E402
from automp.sensitivity.profile import profile_model  # noqa: E402
from automp.sensitivity.table import PROXIES, CalibInfo  # noqa: E402
from automp.sensitivity.windows import WindowCosts  # noqa: E402
from automp.settings import RunSettings  # noqa: E402
from common import CALIB, IN_DOMAIN, Bench, RowCache, Timer, markdown_table, report, score_both  # noqa: E402

FORMATS = "w2,w2g64,w2g32,w3g128,w3g64,w3g32,w4g128,w4g64,w8,fp16"
TARGETS = {2.25: "w2g64", 2.5: "w2g32", 3.125: "w3g128", 3.5: "w3g32", 4.125: "w4g128"}
HELD_OUT = "corpus/wikipedia/enwiki2015_AD_wiki_93.txt"  # a shard bench-a never saw in training
HIDDEN = ("nll", "indomain_nll", "window_kl", "indomain_window_kl", "curve")  # per-window lists
KL_WINDOWS = 8  # the first held-out windows measure the profile's KL proxy, the next ones the solvers
RL_TARGET, RL_FORMATS = 4.125, ["w3g128", "w4g128", "w8"]
TIE_SE = 2.0  # the alternative selection rule the split-half table tests: keep the search's own within this many SE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", required=True, help="cache: the profile and every finished row")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--heldout-windows", type=int, default=16)
    parser.add_argument("--indomain-windows", type=int, default=128)
    parser.add_argument("--anneal-evals", type=int, default=40)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--all-proxies", action="store_true", help="also evaluate every proxy's knapsack in full")
    parser.add_argument("--no-rl", action="store_true", help="skip the reinforce / ppo rows")
    parser.add_argument("--delivery-only", action="store_true", help="skip the greedy, quantile and anneal rows")
    parser.add_argument("--run-proxy", default=RunSettings.model_fields["proxy"].default, help="the run's search proxy")
    parser.add_argument("--verify-windows", type=int, default=RunSettings.model_fields["verify_windows"].default)
    parser.add_argument("--bootstrap", type=int, default=0, help="resamples for the stability table")
    parser.add_argument("--kl", action="store_true", help="also each row's KL to FP16 on both texts (2x the eval)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    work = Path(args.work)
    cache = RowCache(work)

    bench = Bench.load(args.model, args.data, args.nsamples)
    inv = inventory(bench.model)
    seqlen = bench.eval_windows.shape[1]
    heldout = load_windows(str(Path(args.data) / HELD_OUT), bench.tokenizer, seqlen)
    heldout = heldout[: KL_WINDOWS + args.heldout_windows]
    indomain = load_windows(str(Path(args.data) / IN_DOMAIN), bench.tokenizer, seqlen)[: args.indomain_windows]
    indomain_fp = perplexity(bench.model, indomain, progress=False)
    fp_model = copy.deepcopy(bench.model).eval() if args.kl else None
    with Timer() as profile_timer:
        table = profile_model(
            bench.model, parse_formats(FORMATS), bench.calib, model_name=args.model,
            calib_info=CalibInfo(spec=CALIB, nsamples=args.nsamples, seqlen=seqlen, seed=0),
            kl_windows=heldout[:KL_WINDOWS], work_dir=work / "profile", progress=False, per_window=True,
        )  # fmt: skip
    timings = cache.get("timings") or cache.put("timings", {"profile_seconds": profile_timer.seconds})
    windows_costs = WindowCosts.load(work / "profile") if args.bootstrap else None
    with Timer() as evaluator_timer:
        evaluator = AllocationEvaluator(
            bench.model, heldout[KL_WINDOWS:], table.formats, calib=bench.calib, method="gptq"
        )
    timings.setdefault("evaluator_seconds", evaluator_timer.seconds)
    cache.put("timings", timings)

    def evaluate(key: str, allocation: Allocation | None, extra: dict, full: bool = True) -> dict:
        """Perplexity on the held-out slice (the evaluator's cached weights); with ``full``, also
        GPTQ-quantize the allocation block by block and evaluate on the WikiText-2 test text."""
        path = work / "allocations" / f"{key.replace('/', '_')}.json"  # bench/deploy.py reads these too
        if (row := cache.get(key)) is None:
            path.parent.mkdir(exist_ok=True)
            allocation.save(path)
            row = {"key": key, **extra, "avg_bits": allocation.avg_bits(inv), "heldout_ppl": evaluator(allocation)}
            evaluator.restore()
            cache.put(key, row)
        wanted = {"ppl", "indomain_ppl"} | ({"kl"} if args.kl else set())
        if full and not wanted <= set(row) and (twin := _evaluated_twin(work, path, wanted)):
            row |= {k: v for k, v in twin.items() if k not in row}  # same weights, same scores
            cache.put(key, row)
        if full and not wanted <= set(row):
            model = bench.reset()
            quantize_(model, Allocation.load(path), "gptq", bench.calib, progress=False)
            row |= score_both(model, bench, indomain, indomain_fp)
            if args.kl:  # the distance to FP16, which no text can flatter by chance
                row["window_kl"] = kl_to_reference(model, fp_model, bench.eval_windows)
                row["indomain_window_kl"] = kl_to_reference(model, fp_model, indomain)
                row["kl"] = float(np.mean(row["window_kl"]))
                row["indomain_kl"] = float(np.mean(row["indomain_window_kl"]))
            bench.reset()
            print({k: v for k, v in row.items() if k not in HIDDEN}, file=sys.stderr)
            cache.put(key, row)
        return row

    def solve(solver: str, problem: Problem, **options) -> tuple[Allocation, dict]:
        evaluator.evaluations = 0
        solution = get_solver(solver, **options).solve(problem, seed=0, evaluator=evaluator)
        info = {"solver": solver, "proxy": problem.proxy, "seconds": solution.seconds}
        info["evaluations"] = solution.evaluations or evaluator.evaluations
        if solution.curve:
            info["curve"] = solution.curve
        return solution.allocation, info

    verify_windows = load_heldout_windows(
        str(Path(args.data) / CALIB), bench.tokenizer, seqlen, args.verify_windows, args.nsamples, 0, 2
    )  # as `automp run` draws them by default: calibration text that no calibration window touches

    def deliver(target: float) -> tuple[Allocation, dict]:
        """``automp run``'s verified delivery at ``target`` (GPTQ), from the knapsack under ``--run-proxy``."""
        problem = Problem(table, proxy=args.run_proxy, target_bits=target)
        searched = get_solver("knapsack").solve(problem)
        model = bench.reset()
        measure = RealQuality(model, verify_windows, lambda m, a: quantize_(m, a, "gptq", bench.calib, progress=False))

        def refine_evaluator():
            return AllocationEvaluator(model, verify_windows, table.formats, calib=bench.calib, method="gptq")

        with Timer() as timer:
            record = verify_delivery(
                problem, searched, measure, text=CALIB, method="gptq", refine_evaluator=refine_evaluator,
                progress=False,
            )  # fmt: skip
        bench.reset()
        info = {"solver": "delivered", "proxy": record.delivered, "seconds": timer.seconds}
        info |= {"evaluations": len(record.candidates) + (record.refine or {}).get("evaluations", 0)}
        info["changed"] = record.delivered != record.candidates[0].label
        info["verification"] = record.model_dump(exclude={"candidates": {"__all__": {"formats"}}})
        return record.allocation, info

    rows, proxy_rows, selected_proxy, stability_rows, selection_rows = [], [], {}, [], []
    for target in [float(t) for t in args.targets.split(",")]:
        scheme = TARGETS[target]
        uniform = evaluate(f"{target}/uniform", Allocation.uniform(inv, scheme), {"solver": f"uniform {scheme}"})
        by_proxy = {}
        for proxy in PROXIES:  # held-out slice only: it picks the proxy
            key = f"{target}/knapsack-{proxy}"
            if cache.get(key) is None:
                evaluate(key, *solve("knapsack", Problem(table, proxy=proxy, target_bits=target)), full=False)
            by_proxy[proxy] = cache.get(key)
        selected = selected_proxy[target] = min(by_proxy, key=lambda proxy: by_proxy[proxy]["heldout_ppl"])
        proxy_rows.append({"target_bits": target, **{p: row["heldout_ppl"] for p, row in by_proxy.items()}})
        proxy_rows[-1]["uniform"] = uniform["heldout_ppl"]
        shown = PROXIES if args.all_proxies else dict.fromkeys([selected, args.run_proxy])
        group = [uniform, *(evaluate(f"{target}/knapsack-{proxy}", None, {}) for proxy in shown)]
        problem = Problem(table, proxy=selected, target_bits=target)
        others = (
            []
            if args.delivery_only
            else [("greedy", {}), ("quantile", {}), ("anneal", {"max_evals": args.anneal_evals})]
        )
        for solver, options in others:
            key = f"{target}/{solver}"
            group.append(evaluate(key, *(solve(solver, problem, **options) if cache.get(key) is None else (None, {}))))
        key = f"{target}/delivered-{args.run_proxy}"
        group.append(evaluate(key, *(deliver(target) if cache.get(key) is None else (None, {}))))
        if "window_nll" in group[-1]["verification"]["candidates"][0]:
            selection_rows.append({"target_bits": target, **selection_regret(group[-1]["verification"])})
        if args.bootstrap:
            found = bootstrap(Problem(table, proxy=args.run_proxy, target_bits=target), windows_costs, args.bootstrap)
            stability_rows.append({"target_bits": target, **found.summary()})
        for row in group:
            row["target_bits"] = target
        rows += _versus(group, uniform)

    if RL_TARGET in selected_proxy and not args.no_rl:
        problem = Problem(table, proxy=selected_proxy[RL_TARGET], target_bits=RL_TARGET, allowed=RL_FORMATS)
        uniform = cache.get(f"{RL_TARGET}/uniform")
        group = [uniform]
        for solver, options in [
            ("knapsack", {}),
            ("reinforce", {"episodes": args.episodes, "formats": RL_FORMATS}),
            ("ppo", {"episodes": args.episodes, "formats": RL_FORMATS}),
        ]:
            key = f"rl/{solver}"
            allocation, info = solve(solver, problem, **options) if cache.get(key) is None else (None, {})
            group.append(evaluate(key, allocation, info | {"proxy": "3/4/8 bits"}))
        for row in group:
            row["target_bits"] = RL_TARGET
        rows += _versus(group, uniform)[1:]

    columns = [
        ("target_bits", "target", ".3f"),
        ("label", "allocation", ""),
        ("avg_bits", "avg bits", ".3f"),
        ("heldout_ppl", "held-out PPL", ".2f"),
        ("ppl", "PPL", ".2f"),
        ("delta_ppl_pct", "ΔPPL % vs FP16", "+.3f"),
        ("delta_ratio", "ΔPPL / uniform ΔPPL", ".2f"),
        ("vs_uniform_nll", "ΔNLL vs uniform", "+.5f"),
        ("vs_uniform_se", "±", ".5f"),
        ("indomain_delta_pct", "in-domain ΔPPL %", "+.3f"),
        ("indomain_vs_uniform_nll", "in-domain ΔNLL vs uniform", "+.5f"),
        ("indomain_vs_uniform_se", "±", ".5f"),
        *([("kl", "KL to FP16 (WikiText)", ".5f"), ("indomain_kl", "KL (in-domain)", ".5f")] if args.kl else []),
        ("changed", "verification changed it", ""),
        ("seconds", "search s", ".2f"),
        ("evaluations", "evals", "d"),
    ]
    payload = {
        "model": args.model,
        "fp16_ppl": bench.baseline.ppl,
        "eval_windows": bench.baseline.windows,
        "heldout": {"text": HELD_OUT, "windows": args.heldout_windows, "kl_windows": KL_WINDOWS},
        "formats": FORMATS,
        **timings,
        "indomain": {"text": IN_DOMAIN, "windows": len(indomain), "fp16_ppl": indomain_fp.ppl},
        "rows": [{k: v for k, v in row.items() if k not in HIDDEN} for row in rows],
        "curves": {row["key"]: row["curve"] for row in rows if "curve" in row},
        "heldout_ppl_by_proxy": proxy_rows,
        "verification": {row["key"]: row["verification"] for row in rows if "verification" in row},
        "selection": selection_rows,
        "bootstrap": stability_rows,
    }
    table_md = markdown_table(rows, columns)
    if selection_rows:
        table_md += (
            "\n\nSelection among the verified mixed candidates, split-half on the verification windows: pick on "
            "one half, score on the other; regret is the picked candidate's mean NLL minus the best one's on the "
            "scoring half (1e-4 nats per token, mean over 2000 random splits):\n\n"
        )
        table_md += markdown_table(selection_rows, [
            ("target_bits", "target", ".3f"), ("lowest", "lowest NLL", ".2f"),
            ("tie_rule", f"search's own unless beaten by > {TIE_SE:g} SE", ".2f"), ("own", "search's own", ".2f"),
        ])  # fmt: skip
    proxy_columns = [("target_bits", "target", ".3f"), ("uniform", "uniform", ".3f")]
    table_md += "\n\nHeld-out PPL of the knapsack allocation under each proxy (the lowest is selected):\n\n"
    table_md += markdown_table(proxy_rows, proxy_columns + [(p, f"knapsack ({p})", ".3f") for p in PROXIES])
    if stability_rows:
        table_md += (
            f"\n\nBootstrap ({args.bootstrap} calibration resamples) of the knapsack under {args.run_proxy}:\n\n"
        )
        for row in stability_rows:
            row["ci"] = f"[{row['allocation_loss']['low']:.4g}, {row['allocation_loss']['high']:.4g}]"
            row["unstable"] = len(row["unstable_layers"])
        table_md += markdown_table(stability_rows, [
            ("target_bits", "target", ".3f"), ("mean_stability", "mean stability", ".3f"),
            ("stable_share", "layers always the same", ".2f"), ("unstable", "layers that change", "d"),
            ("predicted_loss", "predicted loss", ".4g"), ("ci", "95 % interval under resampling", ""),
        ])  # fmt: skip
    table_md += f"\n\nFP16 PPL {bench.baseline.ppl:.2f}; profile {timings['profile_seconds']:.0f} s "
    table_md += f"(once, all targets); held-out evaluator set-up {timings['evaluator_seconds']:.0f} s."
    report("mixed-precision allocation", payload, table_md, args.out)


def _evaluated_twin(work: Path, path: Path, wanted: set[str]) -> dict | None:
    """A finished row of the same allocation, so identical GPTQ weights are not quantized and scored twice."""
    for other in sorted(path.parent.glob("*.json")):
        row_path = work / "rows" / other.name
        if other != path and row_path.is_file() and other.read_text() == path.read_text():
            row = json.loads(row_path.read_text())
            if wanted <= set(row):
                return row
    return None


def _versus(group: list[dict], uniform: dict) -> list[dict]:
    """Each row's paired difference to uniform GPTQ at the same bits."""
    for row in group:
        row["vs_uniform_nll"], row["vs_uniform_se"] = paired_delta(_nll(uniform), _nll(row))
        row["vs_uniform_sigmas"] = row["vs_uniform_nll"] / row["vs_uniform_se"] if row["vs_uniform_se"] else 0.0
        if "indomain_nll" in row and "indomain_nll" in uniform:
            delta, se = paired_delta(_nll(uniform, "indomain_nll"), _nll(row, "indomain_nll"))
            row["indomain_vs_uniform_nll"], row["indomain_vs_uniform_se"] = delta, se
        row["delta_ratio"] = row["delta_ppl_pct"] / uniform["delta_ppl_pct"] if uniform["delta_ppl_pct"] else math.nan
        row["label"] = row["solver"] + (f" ({row['proxy']})" if row.get("proxy") else "")
    return group


def selection_regret(verification: dict, splits: int = 2000, seed: int = 0) -> dict[str, float]:
    """How well each rule for picking among the mixed candidates generalises to unseen windows: pick on a
    random half of the verification windows, score on the other half (no test text involved)."""
    mixed = [c for c in verification["candidates"] if c["kind"] == "mixed"]
    nll = np.array([c["window_nll"] for c in mixed])  # (candidates, windows)
    own = 0 if verification["candidates"][0]["kind"] == "mixed" else None
    rng, half = np.random.default_rng(seed), nll.shape[1] // 2
    regret = {"lowest": [], "tie_rule": [], "own": []}
    for _ in range(splits):
        order = rng.permutation(nll.shape[1])
        pick, score = nll[:, order[:half]], nll[:, order[half:]].mean(axis=1)
        lowest = tie = int(pick.mean(axis=1).argmin())
        if own is not None and lowest != own:
            lead = pick[own] - pick[lowest]
            if lead.mean() <= TIE_SE * lead.std(ddof=1) / math.sqrt(half):
                tie = own
        for rule, j in (("lowest", lowest), ("tie_rule", tie), ("own", own if own is not None else lowest)):
            regret[rule].append((score[j] - score.min()) * 1e4)
    return {rule: float(np.mean(values)) for rule, values in regret.items()}


def _nll(row: dict, key: str = "nll") -> Perplexity:
    return Perplexity(math.exp(float(np.mean(row[key]))), len(row[key]), 0, 0, row[key])


if __name__ == "__main__":
    main()
