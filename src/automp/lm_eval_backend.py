"""``automp eval --backend lm-eval``: the same tasks through lm-evaluation-harness, on our loaded model.

lm-evaluation-harness downloads each task's dataset from the Hugging Face hub and uses its own
prompts, so its numbers are the ones papers quote; the local files (``automp.tasks``) need neither.
It is an optional dependency: ``pip install lm-eval``.
"""

from __future__ import annotations

from automp.errors import AutompError

# our task names -> lm-evaluation-harness's
LM_EVAL_NAMES = {"openbook_qa": "openbookqa", "siqa": "social_iqa"}


def evaluate_tasks_lm_eval(model, tokenizer, names: list[str], limit: int | None, batch_size: int) -> dict[str, dict]:
    """acc, acc_norm, stderr and count per task from ``lm_eval.simple_evaluate`` (zero-shot)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise AutompError(
            "--backend lm-eval needs lm-evaluation-harness, which is not installed: pip install lm-eval "
            "(or use the default backend with local task files)"
        ) from err
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    theirs = {name: LM_EVAL_NAMES.get(name, name) for name in names}
    try:
        output = simple_evaluate(model=wrapped, tasks=list(theirs.values()), num_fewshot=0, limit=limit)
    except Exception as err:  # unknown task names, hub unreachable, ... surface as many types
        raise AutompError(f"lm-evaluation-harness failed: {err}") from err
    results = {}
    for name, task in theirs.items():
        metrics = output["results"][task]
        results[name] = {
            "acc": metrics["acc,none"],
            "stderr": metrics["acc_stderr,none"],
            "count": output.get("n-samples", {}).get(task, {}).get("effective"),
        }
        if "acc_norm,none" in metrics:  # WinoGrande reports acc only
            results[name] |= {"acc_norm": metrics["acc_norm,none"], "acc_norm_stderr": metrics["acc_norm_stderr,none"]}
    return results
