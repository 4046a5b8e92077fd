"""Switchable precision on a benchmark model: post-hoc GPTQ against one switchable model per training style.

    python bench/switchable.py --model ../shared/models/bench-a --data ../shared/data --work /tmp/switch

One switchable model is built (``automp.switchable``): every layer holds GPTQ codes in w2g64, w3g128 and
w4g128 (each made by uniform GPTQ of that format) and one rank-``--rank`` LoRA adapter per format,
started at the activation-aware correction (EoRA). Each style (spnet, cyclic, instantnet) then trains a
copy of the adapters for the same ``--steps`` optimizer steps on the calibration windows
(``--styles ...,instantnet-kl`` adds instantnet without its cross-entropy term). For each bitmap
(uniform w2g64, w3g128, w4g128, and a 2.5-bit mix: attention w3g128, MLP w2g64) the rows are:

* ``gptq``: post-hoc GPTQ of the bitmap, no adapters (fewer bits);
* ``gptq+eora``: post-hoc GPTQ with the same-rank correction fitted after each layer: the *same real bits*
  as the switchable rows (the switchable model's start at a uniform bitmap);
* one row per style: the trained switchable model switched to the bitmap.

``ΔNLL`` is against ``gptq+eora`` at the same bitmap (equal bits, adapters counted), ``±`` its paired SE
over the evaluation windows, ``*`` beyond 2 SE. Timing: one candidate evaluation (``--heldout-windows``
held-out windows) on the switchable model (``set_config`` + forward) against re-quantizing the 2.5-bit
mix with GPTQ and the same forward. The measured-budget greedy runs on the spnet model with
``--max-drop``. Finished rows and trained models are cached in ``--work``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from automp.allocation import Allocation  # noqa: E402
from automp.data import load_heldout_windows, load_windows  # noqa: E402
from automp.evaluate import perplexity  # noqa: E402
from automp.model import inventory  # noqa: E402
from automp.quantize import quantize_  # noqa: E402
from automp.switchable.evaluator import SwitchableEvaluator  # noqa: E402
from automp.switchable.greedy import measured_greedy  # noqa: E402
from automp.switchable.model import SwitchableSpec, build_switchable, load_switchable  # noqa: E402
from automp.switchable.train import TrainConfig, train_adapters  # noqa: E402
from common import CALIB, IN_DOMAIN, Bench, RowCache, mark_deltas, markdown_table, report, score_both  # noqa: E402

FORMATS = ["w2g64", "w3g128", "w4g128"]
STYLES = ("spnet", "cyclic", "instantnet")  # also instantnet-kl: instantnet with ce_weight 0
MIX = "mix2.5"  # attention w3g128, MLP w2g64


def bitmap_of(name: str, layers: list[str]) -> dict[str, str]:
    if name == MIX:
        return {layer: "w2g64" if ".mlp." in layer else "w3g128" for layer in layers}
    return dict.fromkeys(layers, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", required=True, help="cache: the switchable models and every finished row")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--styles", default=",".join(STYLES))
    parser.add_argument("--bitmaps", default=",".join([*FORMATS, MIX]))
    parser.add_argument("--indomain-windows", type=int, default=128)
    parser.add_argument("--heldout-windows", type=int, default=16)
    parser.add_argument("--max-drop", type=float, default=5.0, help="the greedy's perplexity budget, percent")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    work = Path(args.work)
    cache = RowCache(work)
    bench = Bench.load(args.model, args.data, args.nsamples)
    seqlen = bench.eval_windows.shape[1]
    indomain = load_windows(str(Path(args.data) / IN_DOMAIN), bench.tokenizer, seqlen)[: args.indomain_windows]
    indomain_fp = perplexity(bench.model, indomain, progress=False)
    heldout = load_heldout_windows(str(Path(args.data) / CALIB), bench.tokenizer, seqlen, args.heldout_windows,
                                   args.nsamples, 0, 2)  # fmt: skip
    inv = inventory(bench.model)
    layers = [layer.name for layer in inv.layers]
    spec = SwitchableSpec(model=args.model, formats=FORMATS, method="gptq", rank=args.rank, calib=CALIB,
                          nsamples=args.nsamples, seqlen=seqlen)  # fmt: skip

    def switchable(style: str | None):
        """The built model (style None) or a style's trained copy, from the cache when made before."""
        folder = work / (style or "built")
        if (folder / "switchable.json").is_file():
            return load_switchable(folder, copy.deepcopy(bench.reset()))
        if style is None:
            start = time.perf_counter()
            sw = build_switchable(copy.deepcopy(bench.reset()), spec, bench.calib, progress=False)
            sw.spec.training = {"build_seconds": time.perf_counter() - start}
        else:
            sw = switchable(None)
            name, _, variant = style.partition("-")  # instantnet-kl: cascade distillation without cross-entropy
            config = TrainConfig(style=name, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                 ce_weight=0.0 if variant == "kl" else 1.0)  # fmt: skip
            start = time.perf_counter()
            sw.spec.training = train_adapters(sw, bench.calib, config, work / f"state-{style}", progress=False)
            sw.spec.training["seconds"] = time.perf_counter() - start
        sw.save(folder)
        return sw

    def posthoc(bitmap: str, rank: int) -> dict:
        key = f"{bitmap}/gptq" + (f"+r{rank}" if rank else "")
        if (row := cache.get(key)) is None:
            suffix = f"+r{rank}" if rank else ""
            allocation = Allocation(formats={n: f + suffix for n, f in bitmap_of(bitmap, layers).items()})
            model = bench.reset()
            quantize_(model, allocation, "gptq", bench.calib, progress=False)
            row = {"key": key, "bitmap": bitmap, "row": "gptq" + ("+eora" if rank else ""),
                   "avg_bits": allocation.avg_bits(inv)}  # fmt: skip
            row = cache.put(key, row | score_both(model, bench, indomain, indomain_fp))
            print({k: v for k, v in row.items() if "nll" not in k}, file=sys.stderr, flush=True)
        return row

    rows = []
    styles = [s for s in args.styles.split(",") if s]
    trained = {}
    for bitmap in args.bitmaps.split(","):
        group = [posthoc(bitmap, 0), posthoc(bitmap, args.rank)]
        for style in styles:
            key = f"{bitmap}/{style}"
            if (row := cache.get(key)) is None:
                sw = trained.get(style) or trained.setdefault(style, switchable(style))
                sw.set_config(bitmap_of(bitmap, layers))
                row = {"key": key, "bitmap": bitmap, "row": f"switchable {style}",
                       "avg_bits": sw.avg_bits(bitmap_of(bitmap, layers)),
                       "train_seconds": sw.spec.training.get("seconds")}  # fmt: skip
                row = cache.put(key, row | score_both(sw.model, bench, indomain, indomain_fp))
                print({k: v for k, v in row.items() if "nll" not in k}, file=sys.stderr, flush=True)
            group.append(row)
        mark_deltas(group, reference=group[1])
        rows.extend(group)

    timing = cache.get("timing")
    if timing is None and "spnet" in styles:
        sw = trained.get("spnet") or switchable("spnet")
        mix = Allocation(formats=bitmap_of(MIX, layers))
        with SwitchableEvaluator(sw, heldout) as evaluator:
            start = time.perf_counter()
            for _ in range(3):
                evaluator(mix)
            switch_seconds = (time.perf_counter() - start) / 3
            greedy = measured_greedy(evaluator, args.max_drop)
        start = time.perf_counter()
        model = bench.reset()
        quantize_(model, mix, "gptq", bench.calib, progress=False)
        perplexity(model, heldout, progress=False)
        requantize_seconds = time.perf_counter() - start
        chosen = sw.allocation(greedy.bitmap)
        sw.set_config(greedy.bitmap)
        timing = cache.put("timing", {
            "switch_seconds": switch_seconds, "requantize_seconds": requantize_seconds,
            "speedup": requantize_seconds / switch_seconds,
            "greedy": {"max_drop": args.max_drop, "avg_bits": chosen.avg_bits(inv), "heldout_ppl": greedy.ppl,
                       "heldout_fp_ppl": greedy.fp_ppl, "evaluations": greedy.evaluations,
                       "formats": {f: list(greedy.bitmap.values()).count(f) for f in FORMATS}}
            | {k: v for k, v in score_both(sw.model, bench, indomain, indomain_fp).items() if "nll" not in k},
        })  # fmt: skip
    columns = [
        ("bitmap", "bitmap", ""), ("row", "row", ""), ("avg_bits", "bits", ".3f"), ("ppl", "WikiText PPL", ".2f"),
        ("wiki_delta", "ΔNLL vs gptq+eora", "+.5f"), ("wiki_se", "±", ".5f"), ("wiki_mark", "", ""),
        ("indomain_ppl", "in-domain PPL", ".2f"), ("indomain_delta", "ΔNLL vs gptq+eora", "+.5f"),
        ("indomain_se", "±", ".5f"), ("indomain_mark", "", ""), ("train_seconds", "train s", ".0f"),
    ]  # fmt: skip
    payload = {"model": args.model, "fp16_ppl": bench.baseline.ppl, "fp16_indomain_ppl": indomain_fp.ppl,
               "rank": args.rank, "steps": args.steps, "lr": args.lr, "timing": timing,
               "rows": [{k: v for k, v in r.items() if k not in ("nll", "indomain_nll")} for r in rows]}  # fmt: skip
    report("switchable precision", payload, markdown_table(rows, columns), args.out)


if __name__ == "__main__":
    main()
