"""`automp run` delivers what it measured: verification against uniform, budgets as sizes and memory,
the vLLM engine's formats, bootstrap stability, and one clear error for every bad value."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from automp.budget import kv_cache_bytes
from automp.cli import app
from automp.model import load_model

runner = CliRunner()
FORMATS = "w2g64,w3g128,w4g128,w8"


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, (json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else None)


def _args(trained_dir, out, *extra, formats=FORMATS):
    data = trained_dir.parent
    return (
        "run", "--model", trained_dir, "--formats", formats, "--calib", data / "calib.txt", "--nsamples", "4",
        "--seqlen", "64", "--verify-windows", "8", "--out", out, "--json", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def verified(trained_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("verified") / "out"
    result, metrics = _run(*_args(trained_dir, out, "--target-bits", "3.5", "--eval", trained_dir.parent / "eval.txt"))
    assert result.exit_code == 0, result.output
    return out, metrics


def test_run_delivers_the_best_measured_candidate_and_records_why(verified):
    out, metrics = verified
    record = json.loads((out / "verification.json").read_text())
    labels = [c["label"] for c in record["candidates"]]
    assert "uniform w3g128" in labels and any(label.startswith("uniform mix w3g128+w4g128") for label in labels)
    assert {"knapsack[hessian]", "knapsack[fisher]", "knapsack[outgrad]", "knapsack[weight]"} & set(labels)
    delivered = next(c for c in record["candidates"] if c["label"] == record["delivered"])
    assert delivered["nll"] == min(c["nll"] for c in record["candidates"])
    allocation = json.loads((out / "allocation.json").read_text())
    assert (
        allocation["formats"] == delivered["formats"] == json.loads((out / "automp_quant.json").read_text())["formats"]
    )
    assert metrics["delivered"] == record["delivered"] and metrics["verification"]["windows"] == 8
    assert metrics["avg_bits"] <= 3.5
    uniform = next(c for c in record["candidates"] if c["label"] == record["best_uniform"])
    if record["delivered_kind"] == "mixed":
        assert delivered["nll"] < uniform["nll"] and metrics["verification"]["delta_nll"] < 0
    for candidate in record["candidates"]:  # paired differences against the best uniform candidate
        assert candidate["delta_nll"] == pytest.approx(candidate["nll"] - uniform["nll"], abs=1e-6)


def test_report_shows_the_verification(verified):
    out, _ = verified
    result, report = _run("report", out, "--json")
    assert result.exit_code == 0, result.output
    assert report["sections"]["verification"] == "drawn"
    assert (out / "report" / "verification.png").stat().st_size > 1000


def test_no_verify_delivers_the_search_result_unmeasured(trained_dir, tmp_path):
    out = tmp_path / "out"
    result, metrics = _run(*_args(trained_dir, out, "--target-bits", "3.5", "--no-verify", "--proxy", "fisher"))
    assert result.exit_code == 0, result.output
    assert "verification" not in metrics and not (out / "verification.json").exists()
    assert metrics["solver"] == "knapsack" and metrics["proxy"] == "fisher"


def test_target_size_and_fit_memory_give_models_that_fit(verified, trained_dir, tmp_path):
    source, _ = verified
    size = 655_000
    out = tmp_path / "size"
    out.mkdir()
    shutil.copyfile(source / "sensitivity.json", out / "sensitivity.json")  # the measured table is reused
    result, metrics = _run(*_args(trained_dir, out, "--target-size", str(size), "--no-verify"))
    assert result.exit_code == 0, result.output
    assert metrics["bytes"] <= size and metrics["budget"]["model_bytes"] == size
    # the same weights budget stated as memory: KV cache of 2 x 32 tokens and 1000 bytes of overhead on top
    kv = kv_cache_bytes(load_model(trained_dir)[0].config, 32, 2)
    memory = tmp_path / "memory"
    memory.mkdir()
    shutil.copyfile(source / "sensitivity.json", memory / "sensitivity.json")
    flags = ("--fit-memory", str(size + kv + 1000), "--context", "32", "--batch", "2", "--overhead", "1000")
    result, fitted = _run(*_args(trained_dir, memory, *flags, "--no-verify"))
    assert result.exit_code == 0, result.output
    assert fitted["budget"]["kv_cache_bytes"] == kv and fitted["budget"]["model_bytes"] == size
    assert fitted["bytes"] == metrics["bytes"] and fitted["target_bits"] == metrics["target_bits"]


def test_engine_vllm_keeps_its_formats_and_ties_fused_layers(trained_dir, tmp_path):
    out = tmp_path / "out"
    result, metrics = _run(*_args(trained_dir, out, "--target-bits", "6", "--engine", "vllm", "--no-verify"))
    assert result.exit_code == 0, result.output
    assert metrics["engine"] == {"name": "vllm", "dropped_formats": ["w2g64", "w3g128"]}
    formats = json.loads((out / "allocation.json").read_text())["formats"]
    assert set(formats.values()) <= {"w4g128", "w8"} and len(set(formats.values())) == 2
    table = json.loads((out / "sensitivity.json").read_text())
    for group in table["fused"]:
        assert len({formats[name] for name in group}) == 1, group


def test_bootstrap_reports_each_layers_stability(trained_dir, tmp_path):
    out = tmp_path / "out"
    result, metrics = _run(*_args(trained_dir, out, "--target-bits", "3.5", "--bootstrap", "5", "--no-verify"))
    assert result.exit_code == 0, result.output
    found = json.loads((out / "bootstrap.json").read_text())
    assert found["n"] == 5 and len(found["layers"]) == 14
    assert 0 < metrics["bootstrap"]["mean_stability"] <= 1
    low, high = found["allocation_loss"]["low"], found["allocation_loss"]["high"]
    assert low <= found["predicted_loss"] * 1.5 and high >= low
    result, report = _run("report", out, "--json")
    assert result.exit_code == 0 and report["sections"]["stability"] == "drawn"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--target-bits", "3", "--verify-windows", "0"), "--verify-windows must be at least 1"),
        (("--target-bits", "3", "--bootstrap", "-1"), "--bootstrap must be at least 0"),
        (("--target-bits", "3", "--max-evals", "-2"), "--max-evals must be at least 0"),
        (("--target-size", "huge"), "--target-size 'huge' is not a size"),
        (("--target-bits", "3", "--target-size", "1MB"), "exactly one budget"),
        ((), "exactly one budget"),
        (("--target-size", "100kB"), "unquantized tensors alone"),
        (("--fit-memory", "1MB", "--overhead", "1MB"), "unquantized tensors alone"),
        (("--fit-memory", "10MB", "--batch", "0"), "--batch must be at least 1"),
        (("--target-bits", "3", "--proxy", "grad", "--bootstrap", "3"), "outgrad"),
        (("--target-bits", "5", "--engine", "vllm", "--formats", "w2g64,w3g128"), "--engine vllm serves none"),
        (("--target-bits", "3", "--engine", "sglang"), "engine"),
        (("--target-bits", "3", "--method", "hqq"), "method"),
    ],
)
def test_bad_values_give_one_error_and_no_output(trained_dir, tmp_path, flags, message):
    out = tmp_path / "out"
    args = list(_args(trained_dir, out, *flags))
    if "--formats" in flags:  # the case's own formats replace the default ones
        index = args.index("--formats")
        del args[index : index + 2]
    result, _ = _run(*args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and message in result.output, result.output
    assert not list(tmp_path.iterdir())


def test_verify_text_must_be_neither_eval_nor_calibration_text(trained_dir, tmp_path):
    data = trained_dir.parent
    for text, message in ((data / "eval.txt", "must differ from --eval"), (data / "calib.txt", "from --calib")):
        flags = ("--target-bits", "3", "--eval", data / "eval.txt", "--verify-text", text)
        result, _ = _run(*_args(trained_dir, tmp_path / "out", *flags))
        assert result.exit_code == 2 and message in result.output, result.output
    assert not list(tmp_path.iterdir())


def test_engine_llamacpp_runs_gguf_types_and_exports_the_measured_weights(trained_dir, tmp_path):
    """--engine llama.cpp profiles, searches and delivers GGUF types only (the tiny model's rows of 64/128 fit
    the 32-blocks), and the .gguf export holds exactly the blocks the run measured."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from automp.export import RunDir

    out = tmp_path / "run"
    args = _args(trained_dir, out, "--engine", "llama.cpp", "--target-bits", "6", formats="q4_0,iq4_nl,q8_0,fp16")
    result, metrics = _run(*args)
    assert result.exit_code == 0, result.output
    formats = json.loads((out / "automp_quant.json").read_text())["formats"]
    assert set(formats.values()) <= {"q4_0", "iq4_nl", "q8_0", "fp16"} and metrics["avg_bits"] <= 6
    assert len(set(formats.values())) > 1  # 6 bits lies between the 4.5-bit types and q8_0's 8.5
    exported, _ = _run("export", "--run", out, "--format", "gguf", "--out", tmp_path / "gguf", "--json")
    assert exported.exit_code == 0, exported.output
    tensors = {t.name: t for t in GGUFReader(tmp_path / "gguf" / "model.gguf").tensors}
    stored = RunDir.open(out).quantized_weights()
    names = {
        "mlp.down_proj": "ffn_down",
        "mlp.up_proj": "ffn_up",
        "mlp.gate_proj": "ffn_gate",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
    }  # not permuted (only q/k rows are): compared directly
    compared = 0
    for block in range(2):
        for hf, gguf_name in names.items():
            if (layer := f"model.layers.{block}.{hf}") in stored:
                tensor = tensors[f"blk.{block}.{gguf_name}.weight"]
                assert tensor.tensor_type.name == stored[layer].fmt.ggml_type
                assert (dequantize(tensor.data, tensor.tensor_type) == stored[layer].dequantize().numpy()).all()
                compared += 1
    assert compared >= 3


def test_engine_llamacpp_refuses_formats_it_cannot_store(trained_dir, tmp_path):
    result, _ = _run(*_args(trained_dir, tmp_path / "x", "--engine", "llama.cpp", "--target-bits", "4"))
    assert result.exit_code != 0 and "w2g64" in result.output and "GGUF" in result.output
    assert not (tmp_path / "x").exists()
