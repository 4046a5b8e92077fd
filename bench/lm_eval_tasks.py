"""automp's task scorer against lm-evaluation-harness on the same local files and prompts.

    python bench/lm_eval_tasks.py --model ../shared/models/bench-a --tasks-dir ../shared/data/eval --work /tmp/lmeval

For each task file it writes an lm-eval task YAML itself (``dataset_path: json`` over the file, the
gauntlet's prompt: ``doc_to_text`` the query plus ``"\\nAnswer:"`` for ARC, BoolQ and PIQA, a space as the
target delimiter; WinoGrande as lm-eval's own partial scoring: ``doc_to_text`` the gold index field,
``doc_to_choice`` the context options, ``doc_to_target`` the shared continuation), runs
``lm_eval.simple_evaluate`` on the loaded model (BOS in front, as automp's scorer) with ``log_samples``,
and scores the same items with ``automp.tasks``. Per task it reports both tools' ``acc`` and ``acc_norm``,
how many items pick differently, and the largest per-choice log-likelihood difference.

Needs ``pip install lm-eval`` (0.4.13 was used); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from automp.model import load_model  # noqa: E402
from automp.tasks import DELIMITERS, accuracy, load_task, picks_per_item, score  # noqa: E402
from common import markdown_table, report  # noqa: E402


def task_yaml(name: str, path: Path) -> str:
    """An lm-eval task over the jsonl file ``path`` with automp's (the gauntlet's) prompt."""
    schema = "context_options" in path.open().readline()
    head = f"task: automp_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
    head += "test_split: test\noutput_type: multiple_choice\n"
    if schema:  # doc_to_text naming an int field makes lm-eval score the shared continuation (multiple inputs)
        body = 'doc_to_text: gold\ndoc_to_choice: "{{context_options}}"\ndoc_to_target: continuation\n'
        body += 'target_delimiter: " "\nmetric_list:\n  - metric: acc\n'
    else:
        text = "{{query}}" + DELIMITERS.get(name, " ").rstrip()
        body = f"doc_to_text: {json.dumps(text)}\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        body += 'target_delimiter: " "\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
    return head + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tasks-dir", required=True)
    parser.add_argument("--work", required=True, help="where the task YAMLs go")
    parser.add_argument("--tasks", help="comma-separated; default every .jsonl in --tasks-dir")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks_dir, work = Path(args.tasks_dir).resolve(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = args.tasks.split(",") if args.tasks else sorted(p.stem for p in tasks_dir.glob("*.jsonl"))
    for name in names:
        (work / f"automp_{name}.yaml").write_text(task_yaml(name, tasks_dir / f"{name}.jsonl"))
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    torch.manual_seed(0)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, add_bos_token=True)
    output = simple_evaluate(model=wrapped, tasks=[f"automp_{n}" for n in names], num_fewshot=0, limit=args.limit,
                             task_manager=TaskManager(include_path=str(work)), log_samples=True)  # fmt: skip
    rows = []
    for name in names:
        items = load_task(name, tasks_dir, args.limit)
        scores = score(model, tokenizer, [r for item in items for r in item.requests], args.batch_size, progress=False)
        mine = accuracy(items, scores.loglik)
        theirs = output["results"][f"automp_{name}"]
        samples = sorted(output["samples"][f"automp_{name}"], key=lambda s: s["doc_id"])
        their_ll = [float(choice[0]) for s in samples for choice in s["filtered_resps"]]  # (loglik, greedy)
        picks = picks_per_item(items, scores.loglik)
        their_picks = [_argmax([float(c[0]) for c in s["filtered_resps"]]) for s in samples]
        rows.append({
            "task": name, "items": len(items),
            "acc": mine["acc"], "lm_eval_acc": theirs["acc,none"],
            "acc_norm": mine.get("acc_norm"), "lm_eval_acc_norm": theirs.get("acc_norm,none"),
            "pick_differences": sum(a != b for (a, _), b in zip(picks, their_picks, strict=True)),
            "max_loglik_diff": max(abs(a - b) for a, b in zip(scores.loglik, their_ll, strict=True)),
        })  # fmt: skip
        print(rows[-1], file=sys.stderr, flush=True)
    columns = [
        ("task", "task", ""), ("items", "items", "d"), ("acc", "automp acc", ".4f"),
        ("lm_eval_acc", "lm-eval acc", ".4f"), ("acc_norm", "automp acc_norm", ".4f"),
        ("lm_eval_acc_norm", "lm-eval acc_norm", ".4f"), ("pick_differences", "picks differing", "d"),
        ("max_loglik_diff", "max |Δ loglik|", ".2e"),
    ]  # fmt: skip
    report("task scorer against lm-evaluation-harness", {"model": args.model, "rows": rows},
           markdown_table(rows, columns), args.out)  # fmt: skip


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # ties go to the first choice, as automp's


if __name__ == "__main__":
    main()
