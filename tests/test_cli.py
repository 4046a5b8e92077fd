"""The CLI end to end: JSON contract, config files, and one clear error with no partial output."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from automp.cli import app

runner = CliRunner()


def _run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result, (json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else None)


def test_quantize_then_eval_reloaded(trained_dir, tmp_path):
    data = trained_dir.parent
    out = tmp_path / "q"
    result, metrics = _run(
        "quantize", "--model", trained_dir, "--scheme", "w4g128", "--method", "gptq", "--calib", data / "calib.txt",
        "--nsamples", "16", "--seqlen", "128", "--eval", data / "eval.txt", "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert metrics["avg_bits"] == 4.125
    assert {"ppl", "avg_bits", "bytes", "seconds"} <= set(metrics)
    assert json.loads((out / "metrics.json").read_text())["ppl"] == metrics["ppl"]
    result, evaluated = _run("eval", "--model", out, "--ppl", data / "eval.txt", "--seqlen", "128", "--json")
    assert result.exit_code == 0, result.output
    assert evaluated["ppl"] == pytest.approx(metrics["ppl"], rel=1e-6)  # the stored model is the evaluated one
    assert evaluated["windows"] == metrics["eval"]["windows"]


def test_config_file_with_flag_override(trained_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {trained_dir}\nscheme: w8\nseqlen: 64\nout: {tmp_path / 'from-config'}\n")
    result, metrics = _run("quantize", "--config", config, "--scheme", "w3g64", "--json")
    assert result.exit_code == 0, result.output
    assert metrics["scheme"] == "w3g64" and metrics["avg_bits"] == 3 + 16 / 64
    assert (tmp_path / "from-config" / "automp_quant.json").is_file()


def _bad_inputs(trained_dir, tiny_dirs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    nan_dir = tmp_path / "nan"
    nan_dir.mkdir()
    for f in tiny_dirs["llama"].iterdir():
        (nan_dir / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file

    state = load_file(tiny_dirs["llama"] / "model.safetensors")
    state["model.layers.0.mlp.down_proj.weight"][1, 2] = float("inf")
    save_file(state, nan_dir / "model.safetensors")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("scheme: [w4\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("schemes: w4g128\n")
    model = ["--model", trained_dir]
    return {
        "missing model": (["--model", tmp_path / "nope"], "does not exist"),
        "corrupt model": (["--model", corrupt], "could not load"),
        "nan weights": (["--model", nan_dir, "--scheme", "w4g32"], "NaN or Inf"),
        "group does not divide": (["--model", tiny_dirs["llama"], "--scheme", "w4g128"], "not divisible"),
        "unknown format": ([*model, "--scheme", "w5g128"], "unknown format"),
        "empty calibration": ([*model, "--method", "gptq", "--calib", empty], "empty"),
        "short calibration": (
            [*model, "--method", "gptq", "--calib", short, "--seqlen", "64"],
            "fewer than one window",
        ),
        "gptq without calib": ([*model, "--method", "gptq"], "needs calibration text"),
        "unknown method": ([*model, "--method", "magic", "--scheme", "w4"], "method: Input should be"),
        "seqlen too long": ([*model, "--seqlen", "4096"], "maximum positions"),
        "malformed yaml": ([*model, "--config", bad_yaml], "could not read config"),
        "unknown config key": ([*model, "--config", unknown_key], "schemes"),
    }


def test_bad_inputs_give_one_error_and_no_output(trained_dir, tiny_dirs, tmp_path):
    for case, (args, message) in _bad_inputs(trained_dir, tiny_dirs, tmp_path).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        result, _ = _run("quantize", *args, "--out", out)
        assert result.exit_code == 2, (case, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)
        assert message in lines[0], (case, lines[0])
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*")), case


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "automp.cli", "eval", "--model", str(tmp_path / "nope"), "--ppl", "x.txt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
