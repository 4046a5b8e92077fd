"""Low-rank error corrections (``+rN`` formats): the estimators against an independent optimum, exact
bytes, the ``+rN`` syntax everywhere a format goes, block-by-block quantization, the checkpoint, and
bits and rank chosen jointly by the knapsack."""

import json

import pytest
import torch
from typer.testing import CliRunner

from automp.allocation import Allocation
from automp.checkpoint import QUANT_TENSORS, load_quantized, model_bytes, payload_bytes, save_quantized
from automp.cli import app
from automp.data import load_windows
from automp.errors import AutompError
from automp.formats import get_format, parse_formats, with_ranks
from automp.model import inventory, linear_weight, load_model
from automp.quantize import GPTQConfig, quantize_
from automp.quantizers.gptq import gptq_quantize
from automp.quantizers.lowrank import fit_correction, output_error
from automp.quantizers.qweight import CorrectedWeight, load_qweight
from automp.quantizers.rtn import rtn_quantize
from automp.search.knapsack import Knapsack
from automp.search.problem import Problem
from automp.sensitivity.profile import profile_model
from automp.sensitivity.table import CalibInfo

runner = CliRunner()


def _correlated_layer(out: int = 24, inp: int = 40, samples: int = 400, seed: int = 0):
    """A weight, its RTN 2-bit version and the Hessian of strongly correlated, unevenly scaled inputs."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=gen)
    mix = torch.randn(inp, inp, generator=gen) * torch.logspace(-1.5, 0.5, inp)  # a few directions dominate
    X = torch.randn(samples, inp, generator=gen) @ mix
    H = X.T @ X / samples
    Q = rtn_quantize(W, get_format("w2")).dequantize()
    return W, Q, H


def _reference_optimum(W, Q, H, rank: int, restarts: int = 3) -> float:
    """min over B, A of tr((E - BA) H (E - BA)^T) by a generic optimiser (L-BFGS from random starts)."""
    E, H = (W - Q).double(), H.double()
    best = float("inf")
    for seed in range(restarts):
        gen = torch.Generator().manual_seed(100 + seed)
        B = (0.1 * torch.randn(E.shape[0], rank, generator=gen, dtype=torch.float64)).requires_grad_()
        A = (0.1 * torch.randn(rank, E.shape[1], generator=gen, dtype=torch.float64)).requires_grad_()
        opt = torch.optim.LBFGS([B, A], max_iter=3000, tolerance_grad=1e-12, tolerance_change=1e-15,
                                history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

        def closure(opt=opt, B=B, A=A):
            opt.zero_grad()
            R = E - B @ A
            loss = ((R @ H) * R).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            R = E - B @ A
            best = min(best, float(((R @ H) * R).sum()))
    return best


def _corrected_error(W, Q, H, rank, method) -> float:
    return output_error(W, Q + fit_correction(W, Q, H, rank, method).delta(), H)


@pytest.mark.parametrize("rank", [2, 6])
def test_exact_reaches_the_independent_optimum_and_beats_svd_and_diag(rank):
    W, Q, H = _correlated_layer()
    reference = _reference_optimum(W, Q, H, rank)
    exact = _corrected_error(W, Q, H, rank, "exact")
    assert exact <= 1.01 * reference  # within 1 % of the optimum (fp16 factors included)
    assert exact >= 0.999 * reference  # and the optimiser really found the optimum: nothing beats it
    for method in ("svd", "diag"):
        assert exact < 0.95 * _corrected_error(W, Q, H, rank, method), method
    assert _corrected_error(W, Q, H, rank, "diag") < output_error(W, Q, H)


def test_rank_deficient_hessian_and_dead_inputs_stay_finite_and_help():
    W, Q, _ = _correlated_layer()
    X = torch.randn(6, W.shape[1], generator=torch.Generator().manual_seed(3))  # 6 samples: H has rank 6
    X[:, 5] = 0  # a dead input
    H = X.T @ X / len(X)
    correction = fit_correction(W, Q, H, 4, "exact")
    assert torch.isfinite(correction.A).all() and torch.isfinite(correction.B).all()
    assert correction.A[:, 5].abs().max() == 0  # no input there: nothing is fitted to it
    exact, plain = _corrected_error(W, Q, H, 4, "exact"), output_error(W, Q, H)
    assert exact < 0.5 * plain
    assert exact <= _corrected_error(W, Q, H, 4, "svd") and exact <= _corrected_error(W, Q, H, 4, "diag")
    assert correction.A.abs().max() < 1e3  # the pseudo-inverse does not blow up on tiny eigenvalues


def test_gptq_with_a_correction_beats_gptq_alone_and_svd_at_the_same_rank():
    W, _, H = _correlated_layer(32, 64, 800)
    plain = gptq_quantize(W, H, get_format("w2g32"))
    corrected = {m: gptq_quantize(W, H, get_format("w2g32+r8"), correction=m) for m in ("exact", "svd")}
    errors = {m: output_error(W, q.dequantize(), H) for m, q in corrected.items()}
    assert errors["exact"] < errors["svd"] < output_error(W, plain.dequantize(), H)
    assert isinstance(corrected["exact"], CorrectedWeight)
    assert torch.equal(corrected["exact"].base.dequantize(), plain.dequantize())  # the base is GPTQ's own


@pytest.mark.parametrize("name", ["w2g32+r8", "w3a+r1", "nf4g32+r16", "q4_k+r4"])
def test_bytes_are_exact_and_the_stored_weight_round_trips(name):
    fmt = get_format(name)
    W = torch.randn(32, 256)
    qweight = rtn_quantize(W, fmt, hessian=torch.eye(256))
    assert qweight.stored_bytes() * 8 == fmt.storage_bits(32, 256)
    assert fmt.storage_bits(32, 256) - fmt.base.storage_bits(32, 256) == fmt.rank * (32 + 256) * 16
    restored = load_qweight(name, qweight.shape, qweight.state_dict())
    assert torch.equal(restored.dequantize(), qweight.dequantize())


def test_rank_syntax_and_bad_ranks():
    assert get_format(" W2G64+R16 ").name == "w2g64+r16" and get_format("w2g64+r16").base.name == "w2g64"
    assert get_format("q4_k+r8").ggml_type == "Q4_K"
    names = [f.name for f in with_ranks(parse_formats("w2g64,fp16,w4g128+r2"), [0, 4])]
    assert names == ["w2g64", "fp16", "w4g128+r2", "w2g64+r4"]
    bad = {"w2g64+r0": "positive integer", "w2g64+r-3": "positive integer", "w2g64+r2.5": "positive integer",
           "w2g64+rx": "positive integer", "fp16+r4": "has none", "w5+r4": "unknown format"}  # fmt: skip
    for name, message in bad.items():
        with pytest.raises(AutompError, match=message):
            get_format(name)
    with pytest.raises(AutompError, match="exceeds the layer's smaller dimension"):
        get_format("w4+r65").check_shape(64, 128)
    with pytest.raises(AutompError, match="non-negative integers"):
        with_ranks(parse_formats("w2g64"), [-1])


@pytest.fixture(scope="module")
def trained(trained_dir):
    model, tokenizer = load_model(trained_dir)
    calib = load_windows(str(trained_dir.parent / "calib.txt"), tokenizer, 64, nsamples=8, seed=0)
    return model, tokenizer, calib


def _mixed_allocation(model) -> Allocation:
    inv = inventory(model)
    formats = {layer.name: "w2g64+r4" if layer.role in ("q", "down") else "w3g64" for layer in inv.layers}
    formats[inv.layers[0].name] = "w4g64+r16"
    return Allocation(formats=formats)


def test_block_by_block_corrections_and_the_checkpoint(trained, trained_dir, tmp_path):
    model, tokenizer, calib = trained
    original = {k: v.clone() for k, v in model.state_dict().items()}
    allocation = _mixed_allocation(model)
    qweights = quantize_(model, allocation, "gptq", calib, progress=False)
    ranked = [name for name, f in allocation.formats.items() if "+r" in f]
    assert all(isinstance(qweights[name], CorrectedWeight) for name in ranked)
    # each corrected layer computes with Q + BA, and beats its base on its own block inputs
    name = ranked[0]
    assert torch.equal(linear_weight(model.get_submodule(name)), qweights[name].dequantize())
    ids = calib[:2]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_quantized(tmp_path / "ckpt", model, tokenizer, allocation, qweights)
    stored = payload_bytes(tmp_path / "ckpt" / QUANT_TENSORS)
    inv = inventory(model)
    assert stored == sum(q.stored_bytes() for q in qweights.values()) == allocation.stored_bits(inv) // 8
    assert model_bytes(model, qweights) > stored
    reloaded = load_quantized(tmp_path / "ckpt", torch.float32)
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - logits).abs().max() < 1e-4
    model.load_state_dict(original)


def test_corrections_lower_the_loss_of_the_quantized_model(trained, trained_dir):
    model, tokenizer, calib = trained
    held_out = load_windows(str(trained_dir.parent / "eval.txt"), tokenizer, 64, nsamples=32, seed=1)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inv = inventory(model)
    losses = {}
    for scheme, correction in [("w2g64", "exact"), ("w2g64+r16", "svd"), ("w2g64+r16", "exact")]:
        gptq = GPTQConfig(correction=correction)
        quantize_(model, Allocation.uniform(inv, scheme), "gptq", calib, gptq=gptq, progress=False)
        with torch.no_grad():
            losses[scheme, correction] = float(model(input_ids=held_out, labels=held_out).loss)
        model.load_state_dict(original)
    exact = losses["w2g64+r16", "exact"]
    assert exact < losses["w2g64+r16", "svd"] and exact < losses["w2g64", "exact"] - 0.005


def test_profile_prices_ranks_and_the_knapsack_chooses_bits_and_rank_jointly(trained):
    model, _, calib = trained
    formats = with_ranks(parse_formats("w2g64,w4g64,fp16"), [0, 2, 8])
    info = CalibInfo(spec="calib.txt", nsamples=8, seqlen=64, seed=0)
    table = profile_model(model, formats, calib, model_name="trained", calib_info=info, progress=False)
    for layer in table.layers:
        costs = table.costs[layer.name]
        plain, r2, r8 = costs["w2g64"], costs["w2g64+r2"], costs["w2g64+r8"]
        assert r8.output_err < r2.output_err < plain.output_err
        assert r2.bits - plain.bits == 2 * (layer.in_features + layer.out_features) * 16
    plain_formats = ["w2g64", "w4g64", "fp16"]
    for target in (2.6, 3.2):
        joint = Knapsack().solve(Problem(table, proxy="hessian", target_bits=target))
        bits_only = Knapsack().solve(Problem(table, proxy="hessian", target_bits=target, allowed=plain_formats))
        assert joint.avg_bits <= target and bits_only.avg_bits <= target
        assert joint.predicted_loss <= bits_only.predicted_loss  # a superset of options never predicts worse
    ranked_only = ["w2g64", "w2g64+r2", "w2g64+r8"]  # between all-w2g64 and all-r8: the budget goes to ranks
    plain = Knapsack().solve(Problem(table, proxy="hessian", target_bits=2.3, allowed=["w2g64"]))
    ranked = Knapsack().solve(Problem(table, proxy="hessian", target_bits=3.0, allowed=ranked_only))
    assert ranked.predicted_loss < plain.predicted_loss and 2.3 < ranked.avg_bits <= 3.0
    assert any("+r" in f for f in ranked.allocation.formats.values())


def test_cli_rank_options_and_their_errors(trained_dir, tmp_path):
    data = trained_dir.parent
    out = tmp_path / "q"
    result = runner.invoke(app, [
        "quantize", "--model", str(trained_dir), "--scheme", "w2g64+r4", "--method", "gptq", "--correction", "diag",
        "--calib", str(data / "calib.txt"), "--nsamples", "8", "--seqlen", "64", "--out", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    inv = inventory(load_model(trained_dir)[0])
    assert metrics["avg_bits"] == pytest.approx(Allocation.uniform(inv, "w2g64+r4").avg_bits(inv))
    assert metrics["avg_bits"] > 2.25
    for args, message in [
        (["quantize", "--scheme", "w2g64+r0"], "positive integer"),
        (["quantize", "--scheme", "w2g64+r999"], "exceeds the layer's smaller dimension"),
        (["quantize", "--scheme", "w2g64+r4", "--correction", "best"], "correction"),
        (["profile", "--ranks", "0,4,x", "--calib", str(data / "calib.txt")], "non-negative integers"),
        (["profile", "--ranks", "-2", "--calib", str(data / "calib.txt")], "non-negative integers"),
    ]:
        bad_out = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        result = runner.invoke(app, [*args, "--model", str(trained_dir), "--out", str(bad_out)])
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert not bad_out.exists() and not list(tmp_path.glob(f".{bad_out.name}*")), args


def test_run_chooses_ranks_and_its_checkpoint_applies_them(trained_dir, tmp_path):
    data, out = trained_dir.parent, tmp_path / "run"
    result = runner.invoke(app, [
        "run", "--model", str(trained_dir), "--target-bits", "3", "--formats", "w2g64", "--ranks", "0,8",
        "--calib", str(data / "calib.txt"), "--nsamples", "4", "--seqlen", "64", "--no-verify",
        "--eval", str(data / "eval.txt"), "--out", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    formats = set(Allocation.load(out / "allocation.json").formats.values())
    assert formats == {"w2g64", "w2g64+r8"} and 2.25 < metrics["avg_bits"] <= 3
    args = ["eval", "--model", str(out), "--ppl", str(data / "eval.txt"), "--seqlen", "64", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["ppl"] == pytest.approx(metrics["ppl"], rel=1e-6)
