"""AWQ: scaling alone leaves the model's function unchanged, the search beats RTN, and the CLI/API work."""

import json

import pytest
import torch
from typer.testing import CliRunner

from automp.allocation import Allocation
from automp.checkpoint import model_bytes
from automp.cli import app
from automp.data import load_windows
from automp.execution.blocks import capture_block_inputs, propagate, run_block
from automp.formats import get_format
from automp.model import decoder_blocks, inventory, load_model
from automp.quantize import AWQConfig, quantize_
from automp.quantizers.awq import _shared, apply_scales, awq_scale_block, scale_groups
from automp.quantizers.awq_clip import clip_weight
from automp.quantizers.rtn import rtn_quantize


def _load(path):
    return load_model(path, device="cpu", dtype="float32")[0]


def _calib(trained_dir, nsamples=8):
    tokenizer = load_model(trained_dir, device="cpu", dtype="float32")[1]
    return load_windows(str(trained_dir.parent / "calib.txt"), tokenizer, 128, nsamples, seed=0)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_random_scales_leave_the_model_unchanged(tiny_dirs, arch):
    model = _load(tiny_dirs[arch])
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    gen = torch.Generator().manual_seed(1)
    groups = [group for block in decoder_blocks(model) for group in scale_groups(block)]
    assert len(groups) == 4 * len(decoder_blocks(model))  # attention in, attention out, MLP in, MLP out
    for group in groups:
        n = group.linears[0].in_features
        apply_scales(group, _shared(torch.exp(torch.randn(n, generator=gen)), group))
    assert torch.allclose(_logits(model, ids), before, atol=1e-5, rtol=1e-5)


def test_searched_scales_leave_the_trained_model_unchanged(trained_dir):
    # the trained model uses grouped-query attention (4 heads, 2 kv heads): v_proj -> o_proj shares scales
    model, calib = _load(trained_dir), _calib(trained_dir, 8)
    before = _logits(model, calib)
    inputs = capture_block_inputs(model, decoder_blocks(model)[0], calib, 4)
    moved = 0.0
    for block in decoder_blocks(model):
        formats = {layer: get_format("w3g128") for g in scale_groups(block) for layer in g.linears}
        scales = awq_scale_block(block, inputs, formats, clip=False)
        assert scale_groups(block)[1].repeat == 2 and len(scales) == 4
        moved = max(moved, max(s.log().abs().max().item() for s in scales))
        inputs = propagate(inputs, list(run_block(block, inputs)))
    assert moved > 0.1  # the search did pick non-trivial scales
    assert (_logits(model, calib) - before).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["w3g128", "w4g64a", "nf4g64", "w4"])
def test_clipping_lowers_the_layer_output_error(name):
    fmt, gen = get_format(name), torch.Generator().manual_seed(0)
    weight = torch.randn(32, 256, generator=gen)
    weight[:, ::37] *= 5  # a few large weights stretch their groups' grids
    x = torch.randn(512, 256, generator=gen)
    clipped = clip_weight(weight, x, fmt)
    assert (clipped.abs() <= weight.abs()).all() and not torch.equal(clipped, weight)  # clamped, nothing else
    errors = [(x @ (rtn_quantize(w, fmt).dequantize() - weight).T).pow(2).mean().item() for w in (weight, clipped)]
    assert errors[1] < 0.97 * errors[0], errors


@pytest.mark.parametrize("scheme", ["w3g128", "w4g128"])
def test_awq_output_error_below_rtn(trained_dir, scheme):
    calib = _calib(trained_dir)
    reference = _logits(_load(trained_dir), calib)
    errors = {}
    for method in ("rtn", "awq"):
        model = _load(trained_dir)
        quantize_(model, Allocation.uniform(inventory(model), scheme), method, calib, progress=False)
        errors[method] = (_logits(model, calib) - reference).pow(2).mean().item()
    assert errors["awq"] < 0.8 * errors["rtn"], errors


def test_without_absorbing_ops_awq_is_rtn_plus_clipping(tiny_dirs):
    # GPT-2's GELU MLP and fused c_attn offer no op that absorbs 1/s exactly: no scaling at all
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for method, clip in (("rtn", True), ("awq", False), ("awq", True)):
        model = _load(tiny_dirs["gpt2"])
        allocation = Allocation.uniform(inventory(model), "w4g32")
        out[method, clip] = quantize_(model, allocation, method, ids, awq=AWQConfig(clip=clip), progress=False)
    rtn, scaled, clipped = out["rtn", True], out["awq", False], out["awq", True]
    assert all(torch.equal(scaled[k].codes, rtn[k].codes) for k in rtn)
    assert all(torch.equal(clipped[k].codes, rtn[k].codes) for k in rtn if k.endswith("c_attn"))  # q/k: never
    assert not all(torch.equal(clipped[k].codes, rtn[k].codes) for k in rtn)


def test_per_layer_allocation(tiny_dirs):
    model = _load(tiny_dirs["llama"])
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    inv = inventory(model)
    choices = ["w3g32", "w4g64", "fp16", "w8", "w4g32a", "nf4g64"]
    allocation = Allocation(formats={layer.name: choices[i % 6] for i, layer in enumerate(inv.layers)})
    qweights = quantize_(model, allocation, "awq", calib, progress=False)
    assert {name: q.fmt.name for name, q in qweights.items()} == {
        name: fmt for name, fmt in allocation.formats.items() if fmt != "fp16"
    }
    stored = sum(q.stored_bytes() for q in qweights.values()) * 8
    fp16 = sum(16 * layer.numel for layer in inv.layers if allocation.formats[layer.name] == "fp16")
    assert stored + fp16 == allocation.stored_bits(inv)
    assert model_bytes(model, qweights) > 0


def test_cli_awq_round_trip(trained_dir, tmp_path):
    data, out = trained_dir.parent, tmp_path / "awq"
    runner = CliRunner()
    result = runner.invoke(app, [str(a) for a in (
        "quantize", "--model", trained_dir, "--scheme", "w4g128", "--method", "awq", "--calib", data / "calib.txt",
        "--nsamples", "4", "--seqlen", "128", "--eval", data / "eval.txt", "--out", out, "--json",
    )])  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["method"] == "awq" and metrics["avg_bits"] == 4.125
    result = runner.invoke(
        app, ["eval", "--model", str(out), "--ppl", str(data / "eval.txt"), "--seqlen", "128", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["ppl"] == pytest.approx(metrics["ppl"], rel=1e-6)
