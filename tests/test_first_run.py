"""A first run that explains itself: defaults in --help, output paths checked before any work, quantizing a
saved allocation, and the demo's run directory with its report and export."""

import json
import re
import time

import pytest
import torch
import typer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from automp.cli import app
from automp.data import load_windows
from automp.demo import report_and_export
from automp.model import load_model
from automp.pipeline import run
from automp.settings import (
    EvalSettings,
    ExportSettings,
    PlanSettings,
    ProfileSettings,
    QuantizeSettings,
    RunSettings,
    SearchSettings,
    SwitchableSettings,
    SwitchableTrainSettings,
)

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS = {
    "quantize": QuantizeSettings,
    "eval": EvalSettings,
    "profile": ProfileSettings,
    "search": SearchSettings,
    "run": RunSettings,
    "export": ExportSettings,
    "plan": PlanSettings,
    "switchable train": SwitchableTrainSettings,
    "switchable eval": SwitchableSettings,
    "switchable greedy": SwitchableSettings,
    "switchable export": SwitchableSettings,
}


def _run(*args: str, **kwargs):
    result = runner.invoke(app, [str(a) for a in args], **kwargs)
    return result, (json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else None)


def _shown(option, default) -> str:
    """How click writes a default: a boolean flag by the name of the flag that is on."""
    if isinstance(default, bool):
        return (option.opts if default else option.secondary_opts)[0].removeprefix("--")
    return str(default)


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_help_shows_every_settings_default(command):
    settings = SETTINGS[command]
    click_command = typer.main.get_command(app)
    for part in command.split():  # "switchable train": a command of a command group
        click_command = click_command.commands[part]
    options = {p.name: p for p in click_command.params if p.name != "help"}
    assert set(options) - {"config", "json_out"} <= set(settings.model_fields)  # every option is a setting
    result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0, result.output
    help_text = " ".join(result.output.split())
    for name, option in options.items():
        field = settings.model_fields.get(name)
        if field is None or field.is_required() or field.default in (None, {}, []):
            continue  # nothing to show: the help says what happens without it
        assert option.default == field.default, (command, name)
        assert f"[default: {_shown(option, field.default)}]" in help_text, (command, name)


def test_help_of_other_options_shows_their_own_default():
    help_text = " ".join(runner.invoke(app, ["report", "--help"], env={"COLUMNS": "250"}).output.split())
    assert "[default: 0]" in help_text
    help_text = " ".join(runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "250"}).output.split())
    assert "(default: ~/.cache/automp/demo)" in help_text


def test_config_file_still_fills_options_left_at_their_defaults(trained_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("scheme: w8\nlm_head: true\n")  # both have defaults of their own on the command line
    result, metrics = _run("quantize", "--model", trained_dir, "--config", config, "--out", tmp_path / "q", "--json")
    assert result.exit_code == 0, result.output
    assert metrics["scheme"] == "w8" and metrics["lm_head_quantized"]
    result, metrics = _run(
        "quantize", "--model", trained_dir, "--config", config, "--no-lm-head", "--out", tmp_path / "q", "--json"
    )
    assert result.exit_code == 0, result.output
    assert not metrics["lm_head_quantized"]  # a negation flag overrides the file


def _bad_outputs(tmp_path):
    """command -> (arguments with a bad output and a model or input that does not exist, the message)."""
    existing_file = tmp_path / "taken"
    existing_file.write_text("a file, not a directory\n")
    existing_dir = tmp_path / "a-dir"
    existing_dir.mkdir()
    run_with_report_file = tmp_path / "run"
    run_with_report_file.mkdir()
    (run_with_report_file / "report").write_text("")
    missing = tmp_path / "nope"
    file_out = ["--out", existing_file]
    return {
        "quantize": (["quantize", "--model", missing, *file_out], "--out"),
        "quantize under a file": (["quantize", "--model", missing, "--out", existing_file / "q"], "is a file"),
        "profile": (["profile", "--model", missing, "--calib", missing, *file_out], "--out"),
        "search": (["search", "--profile", missing, "--target-bits", "4", "--out", existing_dir], "existing directory"),
        "run": (["run", "--model", missing, "--target-bits", "4", "--calib", missing, *file_out], "--out"),
        "export": (["export", "--run", missing, "--format", "compressed-tensors", *file_out], "--out"),
        "report": (["report", run_with_report_file], "the report"),
        "demo": (["demo", *file_out], "--out"),
    }


def test_bad_output_path_fails_first_with_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOMP_CACHE", str(tmp_path / "cache"))  # the demo must not train a model first
    for case, (args, message) in _bad_outputs(tmp_path).items():
        before = sorted(tmp_path.rglob("*"))
        began = time.perf_counter()
        result, _ = _run(*args)
        assert time.perf_counter() - began < 5, case  # no model was loaded or trained
        assert result.exit_code == 2, (case, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)
        assert message in lines[0] and ("existing" in lines[0] or "is a file" in lines[0]), (case, lines[0])
        assert sorted(tmp_path.rglob("*")) == before, case  # no .NAME.partial, no scratch, no cache


@pytest.fixture(scope="module")
def searched(trained_dir, tmp_path_factory):
    """A sensitivity table of the trained model and a mixed allocation `automp search` saved from it."""
    data = trained_dir.parent
    root = tmp_path_factory.mktemp("searched")
    result, _ = _run(
        "profile", "--model", trained_dir, "--formats", "w4g128,w8", "--calib", data / "calib.txt",
        "--nsamples", "4", "--seqlen", "64", "--out", root / "profile", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result, found = _run(
        "search", "--profile", root / "profile", "--target-bits", "6", "--out", root / "alloc.json", "--json"
    )
    assert result.exit_code == 0, result.output
    return root / "alloc.json", found


def test_quantize_applies_a_saved_allocation(searched, trained_dir, tmp_path):
    path, found = searched
    formats = json.loads(path.read_text())["formats"]
    assert set(formats.values()) == {"w4g128", "w8"}  # mixed
    out = tmp_path / "q"
    data = trained_dir.parent
    result, metrics = _run(
        "quantize", "--model", trained_dir, "--allocation", path, "--method", "gptq", "--calib", data / "calib.txt",
        "--nsamples", "4", "--seqlen", "64", "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert metrics["scheme"] == "mixed" and metrics["allocation"] == str(path)
    assert metrics["avg_bits"] == pytest.approx(found["avg_bits"], rel=1e-12)
    assert json.loads((out / "automp_quant.json").read_text())["formats"] == formats


def test_a_saved_allocation_that_does_not_fit_gives_one_error_and_no_output(searched, trained_dir, tiny_dirs, tmp_path):
    path, _ = searched
    formats = json.loads(path.read_text())["formats"]
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps({"formats": {k.replace("layers.1", "layers.7"): v for k, v in formats.items()}}))
    cases = {
        "scheme too": (["--model", trained_dir, "--allocation", path, "--scheme", "w8"], "not both"),
        "unknown layers": (["--model", trained_dir, "--allocation", renamed], "does not match the model"),
        "group does not divide": (["--model", tiny_dirs["llama"], "--allocation", path], "not divisible"),
        "not an allocation": (["--model", trained_dir, "--allocation", tmp_path / "nope.json"], "could not read"),
    }
    for case, (args, message) in cases.items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        result, _ = _run("quantize", *args, "--out", out)
        assert result.exit_code == 2, (case, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (case, result.stderr)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*")), case


def test_demo_writes_its_runs_report_and_export(trained_dir, tmp_path):
    """The demo's mixed row is `automp run` (verified); its run directory then gets the report and an export."""
    data = trained_dir.parent
    settings = RunSettings(
        model=str(trained_dir), out=tmp_path / "run", target_bits=3.125, formats="w2g64,w3g128,w4g128,w8",
        calib=str(data / "calib.txt"), nsamples=8, seqlen=64, eval=str(data / "eval.txt"), verify_windows=8,
    )  # fmt: skip
    metrics = run(settings, progress=False)
    saved = report_and_export(tmp_path / "run", tmp_path / "ct")
    assert saved == {
        "run_dir": str(tmp_path / "run"),
        "report": str(tmp_path / "run" / "report" / "index.html"),
        "export": str(tmp_path / "ct"),
    }
    assert metrics["avg_bits"] <= 3.125 and metrics["delivered"] == metrics["verification"]["delivered"]
    run_dir = tmp_path / "run"
    page = (run_dir / "report" / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert {"verification.png", "sensitivity.png", "allocation.png", "frontier.png"} <= set(images)
    for name in images:
        assert (run_dir / "report" / name).read_bytes().startswith(PNG_SIGNATURE), name
    assert "quantization_config" in json.loads((tmp_path / "ct" / "config.json").read_text())
    ours, tokenizer = load_model(run_dir, device="cpu")
    windows = load_windows(str(data / "eval.txt"), tokenizer, 64)[:2]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = ours(windows).logits, loaded(windows).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert not list(tmp_path.glob(".*"))  # nothing staged is left behind
