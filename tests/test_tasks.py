"""Zero-shot tasks: scores against an independent computation, acc_norm, WinoGrande, file errors, the CLI."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from automp.cli import app
from automp.errors import AutompError
from automp.model import load_model
from automp.tasks import accuracy, evaluate_tasks, load_task, score

runner = CliRunner()

MC = [
    {"query": "The function returns", "choices": ["a list of strings.", "None.", "the module"], "gold": 0},
    {"query": "Question: which keyword defines a function?", "choices": ["def", "class"], "gold": 0},
    {"query": "Open the file and", "choices": ["read it", "close the socket quickly", "x"], "gold": 2},
]
SCHEMA = [
    {"context_options": ["The list was empty so the list", "The list was empty so the loop"], "continuation": "ended.",
     "gold": 1},
    {"context_options": ["Import the module, then the", "Import the module, then a"], "continuation": "call works.",
     "gold": 0},
]  # fmt: skip


def _write(directory, name, rows):
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return load_model(tiny_dirs["llama"], device="cpu", dtype="float32")


@torch.no_grad()
def _reference_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """One unpadded forward of EOS + context + continuation (this tokenizer adds no BOS)."""
    ctx = [tokenizer.eos_token_id] + tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[len(ctx) - 1 + i, token].item() for i, token in enumerate(cont))


def test_scores_match_an_independent_computation(tiny, tmp_path):
    model, tokenizer = tiny
    _write(tmp_path, "copa", MC)
    items = load_task("copa", tmp_path)
    assert items[0].requests[1] == ("The function returns", " None.")  # " " delimiter moved onto the choice
    requests = [request for item in items for request in item.requests]
    scores = score(model, tokenizer, requests, batch_size=3, progress=False)  # batches mix lengths: padding
    expected = [_reference_loglik(model, tokenizer, *request) for request in requests]
    assert scores.loglik == pytest.approx(expected, abs=1e-4)
    assert scores.tokens > 0 and scores.seconds > 0
    # gold = independent argmax for items 0 and 2, deliberately not for item 1: acc must be 2/3
    chunks, at = [], 0
    for item in items:
        chunks.append(expected[at : at + len(item.requests)])
        at += len(item.requests)
    argmax = [max(range(len(c)), key=c.__getitem__) for c in chunks]
    for item, best, gold_ok in zip(items, argmax, (True, False, True), strict=True):
        item.gold = best if gold_ok else (best + 1) % len(item.requests)
    result = accuracy(items, scores.loglik)
    assert result["acc"] == pytest.approx(2 / 3)
    assert result["stderr"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 2))
    assert result["count"] == 3 and result["chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)


def test_acc_norm_divides_by_the_choice_characters_as_lm_eval_does(tmp_path):
    # lm-eval: len(choice) without the delimiter's space. " ab" / " abcd" would give -2/3 > -3.5/5 (pick 0);
    # "ab" / "abcd" give -2/2 = -1.0 < -3.5/4 = -0.875 (pick 1)
    _write(tmp_path, "copa", [{"query": "q", "choices": ["ab", "abcd"], "gold": 1},
                              {"query": "q", "choices": ["a", "b"], "gold": 0}])  # fmt: skip
    items = load_task("copa", tmp_path)
    assert items[0].requests[1] == ("q", " abcd") and items[0].lengths == [2, 4]
    result = accuracy(items, [-2.0, -3.5, -1.0, -2.0])
    assert result["acc"] == 0.5 and result["acc_norm"] == 1.0
    assert result["acc_norm_stderr"] == 0.0 and result["stderr"] == pytest.approx(math.sqrt(0.25 / 1))


def test_schema_tasks_report_acc_only(tmp_path):
    _write(tmp_path, "winogrande", SCHEMA)
    items = load_task("winogrande", tmp_path)
    result = accuracy(items, [-1.0 - i for i in range(sum(len(item.requests) for item in items))])
    assert "acc_norm" not in result and result["acc"] == sum(item.gold == 0 for item in items) / len(items)


def test_delimiters_follow_the_gauntlet(tmp_path):
    _write(tmp_path, "arc_easy", [{"query": "Question: why?", "choices": ["A b", "C"], "gold": 1}])
    _write(tmp_path, "openbook_qa", [{"query": "Predators eat", "choices": ["lions", "bunnies"], "gold": 1}])
    assert load_task("arc_easy", tmp_path)[0].requests[0] == ("Question: why?\nAnswer:", " A b")
    assert load_task("openbook_qa", tmp_path)[0].requests[1] == ("Predators eat", " bunnies")


def test_winogrande_scores_the_continuation_after_each_option(tiny, tmp_path):
    model, tokenizer = tiny
    _write(tmp_path, "winogrande", SCHEMA)
    items = load_task("winogrande", tmp_path)
    assert items[0].requests == [(option, " ended.") for option in SCHEMA[0]["context_options"]]
    requests = [request for item in items for request in item.requests]
    scores = score(model, tokenizer, requests, batch_size=4, progress=False)
    # partial scoring: only the shared continuation's tokens count, not the differing option words
    expected = [_reference_loglik(model, tokenizer, *request) for request in requests]
    assert scores.loglik == pytest.approx(expected, abs=1e-4)
    assert len({len(tokenizer(cont)["input_ids"]) for _, cont in requests[:2]}) == 1


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"query": "q", "choices": ["a"], "gold": 0}', "'choices'"),
        ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "'gold'"),
        ('{"context_options": ["a", "b"], "gold": 0}', "'continuation'"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_lines_are_named(tmp_path, line, problem):
    good = json.dumps(MC[0])
    (tmp_path / "bad.jsonl").write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(AutompError, match=rf"bad\.jsonl:3: .*{problem}"):
        load_task("bad", tmp_path)


def test_limit_and_missing_task(tiny, tmp_path):
    model, tokenizer = tiny
    _write(tmp_path, "copa", MC)
    results, cost = evaluate_tasks(model, tokenizer, ["copa"], tmp_path, limit=2, progress=False)
    assert results["copa"]["count"] == 2 and cost.tokens > 0
    with pytest.raises(AutompError, match="available: copa"):
        load_task("piqa", tmp_path)


def _eval(*args):
    result = runner.invoke(app, ["eval", *map(str, args)])
    return result, (json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else None)


def test_cli_json_has_one_entry_per_task(tiny_dirs, corpus, tmp_path):
    _write(tmp_path, "copa", MC)
    _write(tmp_path, "winogrande", SCHEMA)
    (tmp_path / "eval.txt").write_text(corpus[1][:4000])
    result, out = _eval(
        "--model", tiny_dirs["llama"], "--tasks", "copa,winogrande", "--tasks-dir", tmp_path, "--limit", "2",
        "--ppl", tmp_path / "eval.txt", "--seqlen", "64", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(out["tasks"]) == {"copa", "winogrande"}
    for task in out["tasks"].values():
        assert {"acc", "stderr", "count"} <= set(task) and task["count"] == 2
    assert "acc_norm" in out["tasks"]["copa"] and "acc_norm" not in out["tasks"]["winogrande"]
    assert out["ppl"] > 1 and out["peak_memory_mb"] > 10 and out["tokens_per_s"] > 0
    assert out["memory_kind"] == "cpu_peak_rss"


def test_log_samples_lets_anyone_recompute_the_scores(tiny_dirs, tmp_path):
    _write(tmp_path, "copa", MC)
    _write(tmp_path, "winogrande", SCHEMA)
    log = tmp_path / "samples.jsonl"
    result, out = _eval("--model", tiny_dirs["llama"], "--tasks", "copa,winogrande", "--tasks-dir", tmp_path,
                        "--log-samples", log, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for name, task in out["tasks"].items():
        mine = [r for r in records if r["task"] == name]
        assert len(mine) == task["count"]
        picks = [_argmax(r["loglik"]) for r in mine]
        assert [r["pick"] for r in mine] == picks
        assert sum(pick == r["gold"] for pick, r in zip(picks, mine, strict=True)) / len(mine) == task["acc"]
        if "acc_norm" in task:
            norm = [_argmax([ll / n for ll, n in zip(r["loglik"], r["chars"], strict=True)]) for r in mine]
            assert sum(pick == r["gold"] for pick, r in zip(norm, mine, strict=True)) / len(mine) == task["acc_norm"]
    result, _ = _eval("--model", tiny_dirs["llama"], "--ppl", tmp_path / "copa.jsonl", "--log-samples", log)
    assert result.exit_code == 2 and "--log-samples" in result.output
    result, _ = _eval("--model", tiny_dirs["llama"], "--tasks", "copa", "--tasks-dir", tmp_path,
                      "--log-samples", tmp_path)  # fmt: skip
    assert result.exit_code == 2 and "existing directory" in result.output


def test_cli_errors(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data/eval here
    result, _ = _eval("--model", tiny_dirs["llama"], "--tasks", "copa")
    assert result.exit_code == 2 and "--tasks-dir" in result.output
    result, _ = _eval("--model", tiny_dirs["llama"])
    assert result.exit_code == 2 and "--tasks" in result.output
    (tmp_path / "copa.jsonl").write_text(json.dumps(MC[0]) + "\n{broken\n")
    result, _ = _eval("--model", tiny_dirs["llama"], "--tasks", "copa", "--tasks-dir", tmp_path)
    assert result.exit_code == 2 and "copa.jsonl:2:" in result.output


def test_lm_eval_backend_missing_is_a_clear_error(tiny_dirs):
    try:
        import lm_eval  # noqa: F401

        pytest.skip("lm-evaluation-harness is installed")
    except ImportError:
        pass
    result, _ = _eval("--model", tiny_dirs["llama"], "--tasks", "piqa", "--backend", "lm-eval")
    assert result.exit_code == 2 and "pip install lm-eval" in result.output


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
