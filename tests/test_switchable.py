"""Switchable precision: with adapters off each layer computes exactly with its format's codes, training
lowers every trained bitmap's held-out loss, resume is exact, bad bitmaps are refused, and a delivered
bitmap is an ordinary run directory with exact bytes whose perplexity matches the switchable model's."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from automp import Allocation, quantize_
from automp.checkpoint import QUANT_TENSORS, payload_bytes
from automp.cli import app
from automp.data import load_windows
from automp.errors import AutompError
from automp.formats import parse_formats
from automp.model import inventory, load_model
from automp.sensitivity.profile import profile_model
from automp.sensitivity.table import CalibInfo
from automp.switchable import train as train_module
from automp.switchable.evaluator import SwitchableEvaluator
from automp.switchable.greedy import measured_greedy
from automp.switchable.model import SwitchableSpec, build_switchable, load_switchable
from automp.switchable.train import TrainConfig, train_adapters

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
FORMATS = ["w2g32", "w4g32"]


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_adapters_off_each_layer_computes_with_its_codes(tiny_dirs, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]).eval()
    reference = copy.deepcopy(model)
    sw = build_switchable(model, SwitchableSpec(model="tiny", formats=FORMATS, method="rtn", rank=4), progress=False)
    names = list(sw.layers)
    bitmap = {name: FORMATS[i % 2] for i, name in enumerate(names)}  # a mix: every layer its own format
    sw.set_config(bitmap, adapters=False)
    torch.manual_seed(1)
    for name in names:
        layer = sw.layers[name]
        x = torch.randn(3, layer.in_features)
        stored = layer.base_layer.stored[bitmap[name]]
        assert torch.equal(layer(x), F.linear(x, stored.dequantize(), layer.base_layer.bias))
    # the whole model at a uniform bitmap, adapters off, is RTN of that format
    expected = copy.deepcopy(reference)
    quantize_(expected, Allocation.uniform(inventory(expected), "w2g32"), "rtn", progress=False)
    sw.set_config("w2g32", adapters=False)
    ids = torch.randint(100, (2, 16))
    assert torch.allclose(sw.model(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5)


@pytest.fixture(scope="module")
def trained_setup(trained_dir):
    model, tokenizer = load_model(str(trained_dir), device="cpu", dtype="float32")
    calib = load_windows(str(trained_dir.parent / "calib.txt"), tokenizer, 64, 48, 0)
    return model, calib


def _built(trained_setup, **spec):
    model, calib = trained_setup
    spec = SwitchableSpec(model="trained", formats=FORMATS, method="gptq", rank=4, **spec)
    return build_switchable(copy.deepcopy(model), spec, calib, progress=False), calib


def test_eora_start_is_post_hoc_gptq_with_its_correction(trained_setup):
    sw, calib = _built(trained_setup)
    model, _ = trained_setup
    expected = copy.deepcopy(model)
    qweights = quantize_(expected, Allocation.uniform(inventory(expected), "w2g32+r4"), "gptq", calib, progress=False)
    sw.set_config("w2g32")
    ids = calib[:2]
    assert torch.allclose(sw.model(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-4)
    inv = inventory(expected)
    assert sw.avg_bits("w2g32") == pytest.approx(Allocation.uniform(inv, "w2g32+r4").avg_bits(inv))
    delivered = sw.delivered_weights("w2g32")
    assert all(delivered[name].stored_bytes() == q.stored_bytes() for name, q in qweights.items())


@pytest.mark.parametrize("style", ["spnet", "cyclic", "instantnet"])
def test_training_lowers_the_loss_at_every_trained_bitmap(trained_setup, style):
    sw, calib = _built(trained_setup, init="zero")  # post-hoc GPTQ: room to improve at every format
    # instantnet's cross-entropy on 2.6k tokens of text pulls away from FP16 (see the README): cascade KL alone here
    config = TrainConfig(style=style, steps=40, lr=1e-3, batch_size=4, ce_weight=0.0 if style == "instantnet" else 1)
    report = train_adapters(sw, calib, config, progress=False)
    before, after = report["before"], report["after"]
    for fmt in FORMATS:  # never worse on held-out windows: each format keeps its best adapter
        assert after[fmt]["kl"] <= before[fmt]["kl"]
    assert after["w2g32"]["kl"] < 0.97 * before["w2g32"]["kl"]
    for param in sw.adapter_parameters():  # delivered as fp16 factors
        assert torch.equal(param, param.half().float())


def test_resumed_training_gives_identical_adapters(trained_setup, tmp_path, monkeypatch):
    config = TrainConfig(style="spnet", steps=6, lr=2e-3, batch_size=2, checkpoint_every=1)
    whole, calib = _built(trained_setup)
    train_adapters(whole, calib, config, tmp_path / "whole", progress=False)
    cut, _ = _built(trained_setup)
    save = train_module._save_state

    def save_then_die(sw, optimizer, step, *rest):
        save(sw, optimizer, step, *rest)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_adapters(cut, calib, config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(train_module, "_save_state", save)
    resumed, _ = _built(trained_setup)
    report = train_adapters(resumed, calib, config, tmp_path / "cut", progress=False)
    assert len(report["loss_history"]) == 6
    for fmt in FORMATS:
        a, b = whole.adapter_state(fmt), resumed.adapter_state(fmt)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_bitmaps_are_refused(trained_setup):
    sw, _ = _built(trained_setup)
    layers = list(sw.layers)
    with pytest.raises(AutompError, match="not built into this switchable model"):
        sw.set_config("w3g32")
    with pytest.raises(AutompError, match="unknown layers"):
        sw.set_config({**sw.uniform("w2g32"), "model.layers.9.mlp.up_proj": "w2g32"})
    with pytest.raises(AutompError, match="missing"):
        sw.set_config({name: "w2g32" for name in layers[1:]})
    with pytest.raises(AutompError, match="rank 4"):
        sw.set_config("w2g32+r8")
    sw.set_config("w2g32+r4")  # the delivered name of the same format is accepted
    with pytest.raises(AutompError, match="cannot be switched"):
        SwitchableSpec(model="x", formats=["w2g32+r4"])


def test_evaluator_and_measured_greedy(trained_setup):
    sw, calib = _built(trained_setup)
    evaluator = SwitchableEvaluator(sw, calib[-4:], batch_size=2)
    model, _ = trained_setup
    from automp.evaluate import perplexity

    assert evaluator.fp.ppl == pytest.approx(perplexity(copy.deepcopy(model), calib[-4:], progress=False).ppl, rel=1e-3)
    sw.set_config("w2g32")
    assert evaluator(sw.allocation("w2g32")) == pytest.approx(
        perplexity(sw.model, calib[-4:], progress=False).ppl, rel=1e-6
    )
    high = evaluator(Allocation(formats=sw.uniform("w4g32")))
    result = measured_greedy(evaluator, max_drop=100 * (high / evaluator.fp.ppl - 1) + 3.0)
    assert result.ppl <= result.limit
    assert result.ppl == pytest.approx(evaluator(result.bitmap), rel=1e-9)
    assert "w2g32" in result.bitmap.values()  # some layer went down at a budget 3 % above all-w4
    with pytest.raises(AutompError, match="at least 0"):
        measured_greedy(evaluator, max_drop=-1.0)


def test_cli_train_eval_greedy_export(trained_dir, tmp_path):
    calib, text = str(trained_dir.parent / "calib.txt"), str(trained_dir.parent / "eval.txt")
    out = tmp_path / "sw"
    args = ["switchable", "train", "--model", str(trained_dir), "--formats", ",".join(FORMATS), "--rank", "4",
            "--calib", calib, "--nsamples", "12", "--seqlen", "64", "--steps", "4", "--batch-size", "2",
            "--out", str(out), "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    trained = json.loads(result.output.strip().splitlines()[-1])
    assert trained["formats"] == FORMATS and not any(out.parent.glob(".sw.*"))  # no state left behind
    result = runner.invoke(app, ["switchable", "eval", "--dir", str(out), "--bitmap", "w2g32", "--ppl", text,
                                 "--seqlen", "64", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output.strip().splitlines()[-1])
    assert evaluated["avg_bits"] == pytest.approx(trained["avg_bits"]["w2g32"])
    run = tmp_path / "run"
    result = runner.invoke(app, ["switchable", "export", "--dir", str(out), "--bitmap", "w2g32", "--out", str(run),
                                 "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    exported = json.loads(result.output.strip().splitlines()[-1])
    assert exported["bytes"] == evaluated["bytes"]
    stored = payload_bytes(run / QUANT_TENSORS) + payload_bytes(run / "model.safetensors")
    assert stored == exported["bytes"]
    result = runner.invoke(app, ["eval", "--model", str(run), "--ppl", text, "--seqlen", "64", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["ppl"] == pytest.approx(evaluated["ppl"], rel=1e-4)
    bitmap = tmp_path / "bitmap.json"
    result = runner.invoke(app, ["switchable", "greedy", "--dir", str(out), "--max-drop", "50", "--out", str(bitmap),
                                 "--seqlen", "64", "--heldout-windows", "4", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    found = json.loads(result.output.strip().splitlines()[-1])
    assert found["ppl"] <= found["limit"] and Allocation.load(bitmap).formats
    # the search measures its candidates on the switchable model; its formats must count the adapters
    model, tokenizer = load_model(str(trained_dir), device="cpu", dtype="float32")
    windows = load_windows(calib, tokenizer, 64, 8, 0)
    info = CalibInfo(spec=calib, nsamples=8, seqlen=64, seed=0)
    table = profile_model(model, parse_formats("w2g32+r4,w4g32+r4,w2g32"), windows, model_name=str(trained_dir),
                          calib_info=info, progress=False)  # fmt: skip
    (tmp_path / "prof").mkdir()
    table.save(tmp_path / "prof")
    search = ["search", "--profile", str(tmp_path / "prof"), "--target-bits", "5.5", "--solver", "anneal",
              "--max-evals", "4", "--switchable", str(out), "--eval", text, "--eval-windows", "2",
              "--seqlen", "64"]  # fmt: skip
    result = runner.invoke(app, [*search, "--formats", "w2g32+r4,w4g32+r4", "--out", str(tmp_path / "a.json"),
                                 "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    searched = json.loads(result.output.strip().splitlines()[-1])
    assert searched["avg_bits"] <= 5.5 and searched["total_evaluations"] >= 2
    sw = load_switchable(out, model)
    evaluator = SwitchableEvaluator(sw, load_windows(text, tokenizer, 64)[:2])
    assert searched["real_loss"] == pytest.approx(evaluator(Allocation.load(tmp_path / "a.json")), rel=1e-6)
    result = runner.invoke(app, [*search, "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "named F+r4" in result.output and not (tmp_path / "b.json").exists()
    result = runner.invoke(app, ["switchable", "eval", "--dir", str(out), "--bitmap", "w3g32", "--ppl", text])
    assert result.exit_code == 2 and "not built into" in result.output
    result = runner.invoke(app, ["switchable", "train", "--model", str(trained_dir), "--style", "sandwich",
                                 "--calib", calib, "--out", str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code == 2 and "style" in result.output and not (tmp_path / "x").exists()
