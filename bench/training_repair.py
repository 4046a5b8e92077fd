"""Training repair on a benchmark model: GPTQ alone against Block-AP, sign rounding and E2E-QP.

    python bench/training_repair.py --model ../shared/models/bench-a --data ../shared/data --work /tmp/trainrep

The model is GPTQ-quantized once in ``--scheme`` (w2g64: the regime where damage is clear), then each
row repairs a copy of it with ``automp.repair`` (``--rows``, in order):

* ``gptq``: GPTQ alone, the reference;
* ``block-ap``: Block-AP, uniform schedule, the defaults (8 epochs per block);
* ``sign-round``: AutoRound-style sign rounding, 200 steps per block;
* ``block-ap-sgra`` / ``block-ap-joint``: the sensitivity-guided schedules rescaled to uniform's total
  steps (``--equal-steps``); the block sensitivities come from the profile of bench/allocation.py
  (its ``--work`` profile directory, ``--profile-work``), proxy ``outgrad``. At a uniform scheme every
  block has the same bits, so joint differs from sgra only in its constant factors; under a mixed
  ``--allocation`` (e.g. bench/allocation.py's 2.5-bit knapsack) joint also follows each block's bits;
* ``block-ap+e2e-qp``: Block-AP, then end-to-end scale tuning on KL to the full-precision model;
* ``sign-round-selfgen``: sign rounding trained on windows sampled from the full-precision model
  (``--train-data self-generated``) instead of the calibration text;
* ``seq-finetune``: GPTQ again from full precision, the blocks downstream trained (8 steps of KL to the
  full-precision model, lr 1e-4) after each block is quantized (``--repair seq-finetune``);
* ``adapter-rN`` (e.g. ``adapter-r8``, ``adapter-r16``): no training; GPTQ again with every quantized layer's
  format given a rank-N low-rank correction (``+rN``, fitted with the activation-aware ``exact`` estimator,
  bench/repair.py). These rows cost more bits: their "bits" column counts the corrections' fp16 factors.

A row ``KEY@S`` (e.g. ``sign-round@1``) trains with seed ``S`` instead of 0 (the batch order of every block, and
E2E-QP's): the spread over seeds is the training's run-to-run variation, which the window-paired SE leaves out.

Training uses the 128 calibration windows of ``calib/wiki.txt`` (the last eighth held out for early
stopping); nothing is tuned on the test texts. Each row is evaluated on the full WikiText-2 test text
and on ``--indomain-windows`` windows of a Wikipedia shard bench-a never saw. ``ΔNLL`` is the mean
per-window NLL difference against GPTQ alone, ``±`` its paired SE, ``*`` a difference beyond 2 SE.
"seconds" is the repair's wall time. Finished rows are cached in ``--work``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from allocation import FORMATS  # noqa: E402
from automp.allocation import Allocation  # noqa: E402
from automp.data import load_windows  # noqa: E402
from automp.evaluate import perplexity  # noqa: E402
from automp.formats import get_format, parse_formats  # noqa: E402
from automp.model import inventory  # noqa: E402
from automp.quantize import quantize_  # noqa: E402
from automp.repair import E2EConfig, ReconstructConfig, RepairConfig, repair_  # noqa: E402
from automp.repair.selfgen import cached_windows  # noqa: E402
from automp.repair.seq_finetune import SeqFinetuneConfig, SeqFinetuneRecord, downstream_tuner  # noqa: E402
from automp.sensitivity.profile import profile_model  # noqa: E402
from automp.sensitivity.table import CalibInfo  # noqa: E402
from common import CALIB, IN_DOMAIN, Bench, RowCache, mark_deltas, markdown_table, report, score_both  # noqa: E402

ROWS = (
    "gptq,block-ap,sign-round,block-ap-sgra,block-ap-joint,block-ap+e2e-qp,sign-round-selfgen,seq-finetune,"
    "adapter-r8,adapter-r16"
)
CONFIGS = {  # row -> (methods, schedule, train data)
    "block-ap": (("block-ap",), "uniform", "calib"),
    "sign-round": (("sign-round",), "uniform", "calib"),
    "block-ap-sgra": (("block-ap",), "sgra", "calib"),
    "block-ap-joint": (("block-ap",), "joint", "calib"),
    "block-ap+e2e-qp": (("block-ap", "e2e-qp"), "uniform", "calib"),
    "sign-round-selfgen": (("sign-round",), "uniform", "self-generated"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", required=True, help="cache: the quantized model and every finished row")
    parser.add_argument("--profile-work", default="/tmp/alloc/profile", help="bench/allocation.py's profile cache")
    parser.add_argument("--scheme", default="w2g64")
    parser.add_argument("--allocation", help="a saved allocation instead of --scheme")
    parser.add_argument("--rows", default=ROWS)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--indomain-windows", type=int, default=128)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    work = Path(args.work)
    cache = RowCache(work)
    bench = Bench.load(args.model, args.data, args.nsamples)
    reference = copy.deepcopy(bench.model).eval()
    seqlen = bench.eval_windows.shape[1]
    indomain = load_windows(str(Path(args.data) / IN_DOMAIN), bench.tokenizer, seqlen)[: args.indomain_windows]
    indomain_fp = perplexity(bench.model, indomain, progress=False)
    inv = inventory(bench.model)
    allocation = Allocation.load(Path(args.allocation)) if args.allocation else Allocation.uniform(inv, args.scheme)
    model = bench.reset()
    gptq = quantize_(model, allocation, "gptq", bench.calib, progress=False)
    gptq_state = copy.deepcopy(model.state_dict())
    table = None

    def evaluate(key: str, repaired: torch.nn.Module, extra: dict, scored: Allocation = allocation) -> dict:
        row = {"key": key, "label": key, "avg_bits": scored.avg_bits(inv), **extra}
        row |= score_both(repaired, bench, indomain, indomain_fp)
        return cache.put(key, row)

    rows = []
    for key in args.rows.split(","):
        if (row := cache.get(key)) is None:
            model.load_state_dict(gptq_state)
            qweights = dict(gptq)  # repair replaces entries, never the stored weights themselves
            if key == "gptq":
                row = evaluate(key, model, {"seconds": 0.0})
            elif key == "seq-finetune":
                model = bench.reset()
                tuner = downstream_tuner(model, reference, bench.calib, SeqFinetuneConfig(), SeqFinetuneRecord())
                start = time.perf_counter()
                quantize_(model, allocation, "gptq", bench.calib, progress=False, after_block=tuner)
                row = evaluate(key, model, {"seconds": time.perf_counter() - start})
            elif key.startswith("adapter-r"):
                corrected = _with_rank(allocation, int(key.removeprefix("adapter-r")))
                model = bench.reset()
                start = time.perf_counter()
                quantize_(model, corrected, "gptq", bench.calib, progress=False)
                row = evaluate(key, model, {"seconds": time.perf_counter() - start}, corrected)
            else:
                base, _, seed = key.partition("@")
                methods, schedule, data = CONFIGS[base]
                if schedule != "uniform" and table is None:
                    table = profile_model(
                        bench.reset(), parse_formats(FORMATS), bench.calib, model_name=args.model,
                        calib_info=CalibInfo(spec=CALIB, nsamples=args.nsamples, seqlen=seqlen, seed=0),
                        work_dir=Path(args.profile_work), progress=False,
                    )  # fmt: skip
                    model.load_state_dict(gptq_state)
                seed = int(seed or 0)
                config = RepairConfig(methods, schedule, equal_steps=schedule != "uniform",
                                      reconstruct=ReconstructConfig(seed=seed), e2e=E2EConfig(seed=seed))  # fmt: skip
                windows = bench.calib
                if data == "self-generated":
                    windows = cached_windows(reference, work / "selfgen", len(bench.calib), seqlen, progress=False)
                start = time.perf_counter()
                done = repair_(model, qweights, reference, windows, config, table=table, allocation=allocation,
                               state_dir=work / f"state-{key}", progress=False)  # fmt: skip
                seconds = time.perf_counter() - start
                row = evaluate(key, model, {"seconds": seconds, "steps": done.summary().get("steps", 0)})
            print({k: v for k, v in row.items() if "nll" not in k}, file=sys.stderr, flush=True)
        rows.append(row)
    mark_deltas(rows, reference=rows[0])
    columns = [
        ("label", "row", ""), ("avg_bits", "bits", ".3f"), ("ppl", "WikiText PPL", ".2f"),
        ("wiki_delta", "ΔNLL vs GPTQ", "+.5f"), ("wiki_se", "±", ".5f"), ("wiki_mark", "", ""),
        ("indomain_ppl", "in-domain PPL", ".2f"), ("indomain_delta", "ΔNLL vs GPTQ", "+.5f"),
        ("indomain_se", "±", ".5f"), ("indomain_mark", "", ""), ("steps", "steps", "d"), ("seconds", "seconds", ".0f"),
    ]  # fmt: skip
    payload = {"model": args.model, "scheme": args.allocation or args.scheme, "fp16_ppl": bench.baseline.ppl,
               "rows": [{k: v for k, v in r.items() if k not in ("nll", "indomain_nll")} for r in rows]}  # fmt: skip
    report("training repair", payload, markdown_table(rows, columns), args.out)


def _with_rank(allocation: Allocation, rank: int) -> Allocation:
    """Every quantized layer's format with a rank-``rank`` low-rank correction."""
    return Allocation(
        formats={
            name: f"{fmt}+r{rank}" if get_format(fmt).quantized else fmt for name, fmt in allocation.formats.items()
        }
    )


if __name__ == "__main__":
    main()
