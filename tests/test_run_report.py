"""`automp run` end to end (profile, search, GPTQ, eval in one directory) and `automp report` on its output."""

import json
import re

import pytest
from typer.testing import CliRunner

from automp.cli import app
from automp.report import seed_ppls

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, (json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else None)


@pytest.fixture(scope="module")
def run_dir(trained_dir, tmp_path_factory):
    data = trained_dir.parent
    out = tmp_path_factory.mktemp("run") / "out"
    result, metrics = _run(
        "run", "--model", trained_dir, "--target-bits", "5", "--formats", "w4g128,w8", "--calib", data / "calib.txt",
        "--nsamples", "4", "--seqlen", "64", "--eval", data / "eval.txt", "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, metrics


def test_run_meets_the_budget_and_its_checkpoint_evaluates_the_same(run_dir, trained_dir):
    out, metrics = run_dir
    assert {"ppl", "avg_bits", "bytes", "seconds", "solver", "predicted_loss"} <= set(metrics)
    assert 4.125 < metrics["avg_bits"] <= 5  # mixed: some w8, some w4g128
    formats = json.loads((out / "allocation.json").read_text())["formats"]
    assert set(formats.values()) == {"w4g128", "w8"}
    assert json.loads((out / "automp_quant.json").read_text())["formats"] == formats
    assert json.loads((out / "metrics.json").read_text())["ppl"] == metrics["ppl"]
    assert (out / "sensitivity.json").is_file()
    assert not list(out.parent.glob(".*"))  # no staging or profile scratch left beside it
    result, evaluated = _run(
        "eval", "--model", out, "--ppl", trained_dir.parent / "eval.txt", "--seqlen", "64", "--json"
    )
    assert result.exit_code == 0, result.output
    assert evaluated["ppl"] == pytest.approx(metrics["ppl"], rel=1e-6)


def test_report_draws_every_section_or_says_why_not(run_dir):
    out, _ = run_dir
    result, report = _run("report", out, "--json")
    assert result.exit_code == 0, result.output
    page = (out / "report" / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert {"sensitivity.png", "allocation.png", "frontier.png", "statistics.png"} <= set(images)
    for name in images:
        data = (out / "report" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert report["sections"]["curves"] == "missing" and "No learning curve" in page  # knapsack learns nothing
    assert report["sections"]["stability"] == "missing" and "--bootstrap N" in page  # run without --bootstrap


def test_seeds_box_plot_reproduces_the_run_at_its_own_seed(run_dir):
    out, metrics = run_dir
    ppls = seed_ppls(out, 2, progress=False)
    # seed 0 is the run's own seed: the same allocation, calibration windows and GPTQ, so the same PPL
    assert len(ppls) == 2 and ppls[0] == pytest.approx(metrics["ppl"], rel=1e-9)
    assert ppls[1] != ppls[0]  # seed 1 draws other calibration windows
    result, report = _run("report", out, "--seeds", "2", "--json")
    assert result.exit_code == 0, result.output
    assert report["sections"]["seeds"] == "drawn"
    assert (out / "report" / "seeds.png").read_bytes().startswith(PNG_SIGNATURE)


def test_infeasible_target_gives_one_error_and_no_output(trained_dir, tmp_path):
    data = trained_dir.parent
    out = tmp_path / "out"
    result, _ = _run(
        "run", "--model", trained_dir, "--target-bits", "2", "--formats", "w4g128,w8", "--calib", data / "calib.txt",
        "--nsamples", "4", "--seqlen", "64", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "minimum achievable 4.125" in result.output
    assert not list(tmp_path.iterdir())
