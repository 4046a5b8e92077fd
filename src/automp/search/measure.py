"""The real-quality steps of ``automp search``: the evaluator, ``--verify K`` and ``--refine``.

An evaluator is built only when something measures real quality: a solver that needs one
(reinforce, ppo, anneal), ``--verify`` or ``--refine``. It loads the model (by default the one the
table was profiled on) and cuts ``--eval-windows`` windows from the ``--eval`` text. The
evaluation text must not be the calibration text, neither the profile's nor ``--calib``. Otherwise
the measured quality would reward fitting the calibration data.

* ``--verify K`` evaluates the top K candidates (``verify.candidates``) and reports each proxy's
  Spearman correlation with the real loss. It keeps the candidate with the lowest real loss.
* ``--refine`` runs a swap-move local search on the real loss from the current solution, with at
  most ``--max-evals`` evaluations.

Every figure goes into the command's JSON. The final allocation's real loss is measured once more,
and the learning curve of a learned solver is written beside the output as ``<out>.curve.json``.

``--executor ray`` builds one evaluator per worker (``search/pooled.py``): ``--verify``'s candidates
and the speculative batches of ``--refine`` and anneal are measured in parallel, and every other
evaluation (reinforce and ppo episodes, which each depend on the last) runs on one worker. The
results, and so the allocation, are the serial run's for the same seed; ``total_evaluations`` also
counts the speculative evaluations a batch dropped.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from automp.data import load_windows, sources
from automp.errors import AutompError
from automp.execution.executor import Executor
from automp.io import write_file_atomic
from automp.search.evaluator import EVAL_BATCH, AllocationEvaluator
from automp.search.pooled import PooledEvaluator
from automp.search.problem import Problem, Solution
from automp.search.verify import candidates, proxy_scores, refine, verify

MEASURING_SOLVERS = ("reinforce", "ppo", "anneal")


def wants_evaluator(settings) -> bool:
    return settings.solver in MEASURING_SOLVERS or bool(settings.verify) or settings.refine


def solver_options(settings) -> dict:
    """Options of the measuring solvers, passed only when given (others reject them by name)."""
    options = {}
    if settings.episodes is not None:
        options["episodes"] = settings.episodes
    if settings.state is not None:
        options["state"] = settings.state
    if settings.solver == "anneal":
        options["max_evals"] = settings.max_evals
    return options


def build_evaluator(
    settings, problem: Problem, windows: torch.Tensor | None = None, executor: Executor | None = None
) -> AllocationEvaluator | PooledEvaluator | None:
    """The evaluator the settings ask for, or None when nothing measures real quality.

    ``windows``: held-out evaluation windows to use instead of ``settings.eval`` (``automp run``'s
    verification windows, held out from calibration by construction). With a remote ``executor``
    every worker loads the model and the windows itself and builds its own evaluator
    (``PooledEvaluator``); otherwise the evaluator lives in this process."""
    if not wants_evaluator(settings):
        if settings.seq_finetune:
            raise AutompError("--seq-finetune fine-tunes inside real evaluations: use it with --solver ppo, reinforce "
                              "or anneal, --verify or --refine")  # fmt: skip
        return None
    table = problem.table
    if windows is None:  # held-out text given as --eval: check it is not calibration text
        if settings.eval is None:
            raise AutompError(
                f"--solver {settings.solver} / --verify / --refine measure real quality: give --eval TEXT (held out)"
            )
        calib_spec = settings.calib or table.calib.spec
        for spec in {*sources(table.calib.spec), *sources(calib_spec)}:
            if any(_same_text(text, spec) for text in sources(settings.eval)):
                raise AutompError(f"--eval {settings.eval} is the calibration text; evaluate on held-out text")
        if settings.eval_windows < 1:
            raise AutompError("--eval-windows must be at least 1")
    if settings.seq_finetune and (settings.method != "gptq" or settings.switchable is not None):
        raise AutompError("--seq-finetune quantizes each candidate with GPTQ while fine-tuning: give --method gptq "
                          "(and no --switchable)")  # fmt: skip
    if settings.seq_finetune and executor is not None and executor.remote:
        raise AutompError("--seq-finetune trains inside every evaluation in this process: leave out --executor ray")
    local = _switchable_evaluator if settings.switchable is not None else _local_evaluator
    build = partial(local, settings, problem, windows)
    if executor is None or not executor.remote:
        return build()
    return PooledEvaluator(executor.pool(build))


def _local_evaluator(settings, problem: Problem, windows: torch.Tensor | None) -> AllocationEvaluator:
    """The ``AllocationEvaluator`` of ``build_evaluator``, with the model loaded here."""
    from automp.model import load_model

    table = problem.table
    calib_spec = settings.calib or table.calib.spec
    formats = problem.allowed or table.formats
    nsamples = settings.nsamples if settings.calib else table.calib.nsamples
    seqlen = windows.shape[1] if windows is not None else settings.seqlen or table.calib.seqlen
    if not settings.seq_finetune:  # the cached-weight evaluator; RTN caches without calibration windows
        calibrated = nsamples if settings.method == "gptq" else 1
        _check_memory(settings, settings.model or table.model, formats, calibrated, seqlen)
    model, tokenizer = load_model(settings.model or table.model, dtype=settings.dtype, device=settings.device)
    if windows is None:
        windows = load_windows(settings.eval, tokenizer, seqlen)[: settings.eval_windows]
    calib = None
    if settings.method == "gptq":
        calib = load_windows(calib_spec, tokenizer, windows.shape[1], nsamples, table.calib.seed)
    if settings.seq_finetune:  # the PPO prototype's quantize-then-fine-tune step (repair/seq_finetune.py)
        from automp.repair.seq_finetune import FinetunedEvaluator

        return FinetunedEvaluator(model, windows, formats, calib=calib, metric=settings.metric)
    return AllocationEvaluator(model, windows, formats, calib=calib, method=settings.method, metric=settings.metric)


def _check_memory(settings, model: str, formats: list[str], nsamples: int, seqlen: int) -> None:
    """Refuse up front when the evaluator's memory plan does not fit (it runs in memory only). A model the plan
    cannot describe is loaded as asked, unless a memory limit was given."""
    from automp.execution.plan import check_mode, plan_if_known

    stage = "evaluator.kl" if settings.metric == "kl" else "evaluator"
    batch = min(EVAL_BATCH, settings.eval_windows)  # the windows one evaluation runs at once
    plan = plan_if_known(
        model, formats=",".join(formats), nsamples=nsamples, seqlen=seqlen, batch_size=batch, device=settings.device,
        dtype=settings.dtype, device_memory=settings.device_memory, cpu_memory=settings.cpu_memory,
        stages=f"load,{stage}",
    )  # fmt: skip
    if plan is not None:
        check_mode(plan, "in-memory", "the search's evaluator holds the model and every format's weights in memory, "
                   f"and runs up to {EVAL_BATCH} windows at once; give fewer --formats or --eval-windows, a shorter "
                   "--seqlen, or a machine with more memory")  # fmt: skip


def _switchable_evaluator(settings, problem: Problem, windows: torch.Tensor | None):
    """The switchable model's evaluator. Every searchable format must be one the model was trained in, named
    ``F+rR`` (R its adapters' rank) so that the budget counts the adapters it delivers."""
    from automp.switchable.commands import open_switchable
    from automp.switchable.evaluator import SwitchableEvaluator

    sw, tokenizer = open_switchable(settings.switchable, settings.dtype, settings.device)
    suffix = f"+r{sw.spec.rank}"
    wrong = [f for f in problem.allowed or problem.table.formats if f != "fp16" and not f.endswith(suffix)]
    if wrong:
        raise AutompError(
            f"--switchable {settings.switchable} delivers rank-{sw.spec.rank} adapters: search formats named "
            f"F{suffix} (profile with --ranks {sw.spec.rank}, search with --formats), not {', '.join(wrong[:3])}"
        )
    for name in problem.allowed or problem.table.formats:
        sw.resolve({layer: name for layer in sw.layers})  # one error for a format the model was not built with
    if windows is None:
        seqlen = settings.seqlen or problem.table.calib.seqlen
        windows = load_windows(settings.eval, tokenizer, seqlen)[: settings.eval_windows]
    return SwitchableEvaluator(sw, windows, metric=settings.metric)


def check_and_refine(
    settings, problem: Problem, solution: Solution, evaluator: AllocationEvaluator | PooledEvaluator
) -> tuple[Solution, dict]:
    """``--verify`` and ``--refine`` on ``solution``; the (possibly better) solution and the figures."""
    extra: dict = {
        "evaluator": {
            "metric": evaluator.metric,
            "windows": len(evaluator.windows),
            "seqlen": evaluator.windows.shape[1],
            "baseline": evaluator.baseline,
            "fp_ppl": evaluator.fp.ppl,
        }
    }
    learned_curve = solution.curve  # the solver's own; refine's curve is summarised below
    if settings.verify:
        pool = candidates(problem, solution, settings.verify)
        report = verify(pool, evaluator, proxy_scores(pool, problem.table))
        solution = pool[report["best"]]
        extra["verify"] = {**report, "solvers": [c.solver for c in pool], "avg_bits": [c.avg_bits for c in pool]}
    if settings.refine:
        refined = refine(solution, problem, evaluator, settings.max_evals)
        extra["refine"] = {
            "evaluations": refined.evaluations,
            "start": refined.curve[0]["loss"],
            "best": min(row["loss"] for row in refined.curve),
        }
        solution = refined
    extra["real_loss"] = evaluator(solution.allocation)
    extra["total_evaluations"] = evaluator.evaluations  # the solver's own, verify's and refine's
    if learned_curve and settings.out is not None:
        path = Path(settings.out).with_name(Path(settings.out).name + ".curve.json")
        write_file_atomic(path, json.dumps(learned_curve, indent=1))
        extra["curve"] = str(path)
    return solution, extra


def _same_text(a: str, b: str) -> bool:
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve() or a == b
