"""Streaming against in-memory execution on one model: peak memory per stage, the memory plan's figure for it,
and whether the outputs are identical.

    python bench/streaming.py --model ../shared/models/bench-a --data ../shared/data --work /tmp/streaming

Each stage runs in a fresh process, once in memory (``--offload none``) and once streamed with the blocks on disk
(``--offload disk``). "auto picks" is what ``--offload auto`` would choose for the stage under ``--device-memory``
(default: 5 % above the stage's streaming figure: streaming when that is below the in-memory one). A process
loads its texts first, reads its resident memory, resets the peak (``/proc/self/clear_refs``), then loads the
model and runs the stage. The measured figure is the peak resident memory above that baseline (Python, torch
and the texts excluded, as the plan excludes them). Both modes run with glibc returning freed buffers over 1 MiB
to the system at once (``MALLOC_MMAP_THRESHOLD_``): by default glibc raises that threshold as large buffers are
freed and keeps them mapped, so the streamed profile, which allocates and frees window-sized logits and block
outputs, measured 1.5 GB of peak resident memory where it holds 0.2 GB. On a CPU the plan's figure is the device
and host bytes together. Stages:

* ``gptq``: ``quantize_`` with GPTQ, every linear in ``--format``, ``--nsamples`` calibration windows, then the
  checkpoint saved (streamed: the codes wait on disk as ``automp quantize`` has them, and are saved in shards);
* ``profile``: ``profile_model`` (the pre-pass of the hessian, outgrad, fisher and grad proxies, then every layer x
  format), formats ``--formats``;
* ``perplexity``: the first ``--eval-windows`` windows of WikiText-2 in batches of ``--batch-size``;
* ``repair``: GPTQ as in ``gptq``, then Block-AP (``repair_``, ``--repair-epochs`` per block: memory does not depend
  on it) towards the full-precision model, a second copy in memory or streamed from its own offload; the plan's
  figure is the larger of its ``gptq`` and ``repair`` stages.

"identical" compares the streamed run's stored codes / sensitivity table / NLL with the in-memory run's, exactly.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import CALIB, WIKITEXT, markdown_table, report  # noqa: E402

STAGES = ("gptq", "profile", "perplexity", "repair")
PLAN_STAGES = {"gptq": ("gptq",), "profile": ("profile",), "perplexity": ("perplexity",), "repair": ("gptq", "repair")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--format", default="w3g128")
    parser.add_argument("--formats", default="w2g64,w3g128,w4g128,fp16")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--repair-epochs", type=float, default=1.0)
    parser.add_argument("--device-memory", help="default: 5 %% above each stage's streaming figure")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "OFFLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        return _child(args, *args.child)

    from automp.budget import parse_size
    from automp.execution.plan import memory_plan

    stages = args.stages.split(",")
    workload = dict(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, device="cpu")
    planned = sorted({name for stage in stages for name in PLAN_STAGES[stage]})
    plan = memory_plan(args.model, formats=args.formats, stages=",".join(planned), **workload)

    def total(mode: str, stage: str) -> int:
        return max(
            plan.modes[mode][name].device_bytes + plan.modes[mode][name].cpu_bytes for name in PLAN_STAGES[stage]
        )

    rows = []
    for stage in stages:
        given = args.device_memory and parse_size(args.device_memory, "--device-memory")
        budget = str(given or int(1.05 * total("streaming", stage)))
        runs = {offload: _run_child(args, stage, offload, budget) for offload in ("none", "disk")}
        for offload, run in runs.items():
            mode = "in-memory" if offload == "none" else "streaming"
            rows.append({
                "stage": stage, "offload": offload, "device_memory_mb": int(budget) / 1e6,
                "plan_mb": total(mode, stage) / 1e6, "peak_mb": run["peak"] / 1e6,
                "ratio": run["peak"] / total(mode, stage), "seconds": run["seconds"], "digest": run["digest"],
                "auto": run["auto"], "identical": runs["disk"]["digest"] == runs["none"]["digest"],
            })  # fmt: skip
    payload = {"model": args.model, "workload": workload, "rows": rows}
    columns = [
        ("stage", "stage", ""), ("offload", "--offload", ""), ("device_memory_mb", "--device-memory MB", ".1f"),
        ("auto", "auto picks", ""), ("plan_mb", "plan MB", ".1f"),
        ("peak_mb", "measured peak MB", ".1f"), ("ratio", "measured / plan", ".2f"), ("seconds", "seconds", ".1f"),
        ("identical", "identical outputs", ""),
    ]  # fmt: skip
    report("Streaming vs in-memory (peak resident memory above the process's baseline)", payload,
           markdown_table(rows, columns), args.out)  # fmt: skip


def _run_child(args, stage: str, offload: str, budget: str) -> dict:
    command = [sys.executable, __file__, "--model", args.model, "--data", args.data, "--work", args.work,
               "--format", args.format, "--formats", args.formats, "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size), "--eval-windows",
               str(args.eval_windows), "--repair-epochs", str(args.repair_epochs), "--device-memory", budget,
               "--child", stage, offload]  # fmt: skip
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # see the module docstring
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{stage} --offload {offload} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(args, stage: str, offload: str) -> None:
    import torch
    from transformers import AutoTokenizer

    from automp.allocation import Allocation
    from automp.checkpoint import SpilledWeights, read_qweights, save_quantized
    from automp.data import load_windows
    from automp.evaluate import perplexity
    from automp.execution.offload import plan_offload
    from automp.model import inventory, load_model
    from automp.quantize import quantize_
    from automp.repair import ReconstructConfig, RepairConfig, repair_
    from automp.sensitivity.profile import profile_model
    from automp.sensitivity.table import CalibInfo

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calib = load_windows(str(Path(args.data) / CALIB), tokenizer, args.seqlen, args.nsamples, 0)
    windows = load_windows(str(Path(args.data) / WIKITEXT), tokenizer, args.seqlen)[: args.eval_windows]
    workload = dict(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, device="cpu")
    auto = plan_offload(args.model, "auto", ("load", *PLAN_STAGES[stage]), formats=args.formats,
                        device_memory=args.device_memory, **workload)  # fmt: skip
    baseline = _rss()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
    began = time.perf_counter()
    work = Path(args.work) / f"{stage}-{offload}"
    shutil.rmtree(work, ignore_errors=True)  # a profile resumes from its work directory: start afresh
    model, _ = load_model(args.model, device="cpu", offload=offload, offload_dir=work / "offload")
    if stage in ("gptq", "repair"):
        reference = None
        if stage == "repair":  # the full-precision model repair trains towards, as `automp quantize --repair` has it
            reference = copy.deepcopy(model) if offload == "none" else load_model(
                args.model, device="cpu", offload=offload, offload_dir=work / "reference")[0]  # fmt: skip
        allocation = Allocation.uniform(inventory(model), args.format)
        codes = SpilledWeights(work / "codes") if offload != "none" else None  # as `automp quantize` streams them
        stored = quantize_(model, allocation, "gptq", calib, batch_size=args.batch_size, progress=False, codes=codes)
        if reference is not None:
            config = RepairConfig(("block-ap",), reconstruct=ReconstructConfig(epochs=args.repair_epochs))
            repair_(model, stored, reference, calib, config, progress=False)
        save_quantized(work / "checkpoint", model, tokenizer, allocation, stored)
        saved = read_qweights(work / "checkpoint", allocation)
        digest = _digest(b"".join(_bytes(q) for _, q in sorted(saved.items())))
    elif stage == "profile":
        from automp.formats import parse_formats

        info = CalibInfo(spec=CALIB, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
        table = profile_model(model, parse_formats(args.formats), calib, model_name=args.model, calib_info=info,
                              work_dir=work / "profile", batch_size=args.batch_size, progress=False)  # fmt: skip
        digest = _digest(json.dumps(table.model_dump(mode="json")["costs"], sort_keys=True).encode())
    else:
        result = perplexity(model, windows, args.batch_size, progress=False)
        digest = _digest(json.dumps(result.window_nll).encode())
    seconds = time.perf_counter() - began
    print(json.dumps({"peak": _peak() - baseline, "seconds": seconds, "digest": digest, "auto": auto}))


def _bytes(qweight) -> bytes:
    """Every tensor the stored weight holds (codes, scales, zero-points), as raw bytes."""
    import torch

    tensors = [value for value in vars(qweight).values() if isinstance(value, torch.Tensor)]
    return b"".join(t.contiguous().cpu().numpy().tobytes() for t in tensors)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _rss() -> int:
    return _status("VmRSS")


def _peak() -> int:
    return max(_status("VmHWM"), 0) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
