"""`automp profile`: exact bits, proxies checked against direct computation and real loss, resume."""

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from typer.testing import CliRunner

import automp.sensitivity.profile as profile_mod
from automp.allocation import Allocation
from automp.checkpoint import model_bytes
from automp.cli import app
from automp.data import load_windows
from automp.evaluate import perplexity
from automp.formats import parse_formats
from automp.model import inventory, linear_weight, load_model, set_linear_weight
from automp.quantize import quantize_
from automp.quantizers.gptq import gptq_quantize
from automp.sensitivity.prepass import Prepass
from automp.sensitivity.profile import PREPASS_DIR, profile_model
from automp.sensitivity.table import CalibInfo, SensitivityTable

FORMATS = "w2g64,w3g128,w4g128,w8,fp16"
SEQLEN = 64
DOWN = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def setup(trained_dir, tmp_path_factory):
    """The trained tiny Llama profiled once (KL included); the work directory is kept for inspection."""
    model, tokenizer = load_model(trained_dir)
    calib = load_windows(str(trained_dir.parent / "calib.txt"), tokenizer, SEQLEN, nsamples=8, seed=0)
    kl_windows = load_windows(str(trained_dir.parent / "eval.txt"), tokenizer, SEQLEN, nsamples=2, seed=1)
    work = tmp_path_factory.mktemp("profile-work")
    info = CalibInfo(spec="calib.txt", nsamples=8, seqlen=SEQLEN, seed=0)
    table = profile_model(
        model, parse_formats(FORMATS), calib, model_name="trained", calib_info=info,
        kl_windows=kl_windows, work_dir=work, progress=False,
    )  # fmt: skip
    return model, calib, kl_windows, info, table, Prepass(work / PREPASS_DIR)


def _inputs(model, name: str, calib: torch.Tensor) -> torch.Tensor:
    """Every input row the layer sees on the calibration windows, float64."""
    rows = []
    hook = model.get_submodule(name).register_forward_hook(lambda _m, inp, _o: rows.append(inp[0].detach()))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    hook.remove()
    x = torch.cat(rows).double()
    return x.reshape(-1, x.shape[-1])


def test_bits_are_exact_and_dense_bytes_match_the_checkpoint(setup, trained_dir):
    model, *_, table, _ = setup
    q = table.costs["model.layers.0.self_attn.q_proj"]  # 128 x 128
    expected = {"w2g64": 2 * 128 * 128 + 128 * 2 * 16, "w3g128": 3 * 128 * 128 + 128 * 16,
                "w4g128": 4 * 128 * 128 + 128 * 16, "w8": 8 * 128 * 128 + 128 * 16, "fp16": 16 * 128 * 128}  # fmt: skip
    assert {f: q[f].bits for f in table.formats} == expected
    down = table.costs[DOWN]["w2g64"]  # 128 x 256: four groups of 64 per row
    assert down.bits == 2 * 128 * 256 + 128 * 4 * 16
    assert len(table.layers) == 14 and table.formats == FORMATS.split(",")
    # dense_bytes is what a checkpoint stores besides the quantized layers
    fresh, _ = load_model(trained_dir)
    qweights = quantize_(fresh, Allocation.uniform(inventory(fresh), "w4g128"), "rtn", progress=False)
    assert table.dense_bytes == model_bytes(fresh, qweights) - sum(q.stored_bytes() for q in qweights.values())
    assert table.dense_bytes == 2 * 2 * 1024 * 128 + 2 * (2 * 2 * 128 + 128)  # embed + lm_head + 5 norms


def test_output_err_is_the_gptq_objective_on_calibration_inputs(setup):
    model, calib, *_, table, prepass = setup
    x = _inputs(model, DOWN, calib)
    hessian = x.T @ x / len(x)
    assert torch.allclose(prepass.layer(DOWN).hessian.double(), hessian, rtol=1e-5, atol=1e-7)
    weight = linear_weight(model.get_submodule(DOWN)).detach()
    for fmt in parse_formats("w2g64,w4g128"):
        error = (gptq_quantize(weight, prepass.layer(DOWN).hessian, fmt).dequantize() - weight).double()
        # tr(dW H dW^T) is the mean squared output error over calibration tokens
        assert table.costs[DOWN][fmt.name].output_err == pytest.approx(((x @ error.T) ** 2).sum().item() / len(x))
        assert table.costs[DOWN][fmt.name].weight_mse == pytest.approx((error**2).sum().item())


def _output_grads(model, name: str, calib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window: the layer's inputs (T, in) and dL_i/dY (T, out) of the window-mean loss, float64."""
    module, xs, gs = model.get_submodule(name), [], []

    def hook(_m, inp, out):
        xs.append(inp[0].detach()[0])
        out.register_hook(lambda g: gs.append(g.detach()[0]))

    handle = module.register_forward_hook(hook)
    for window in calib:
        ids = window.unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    return torch.stack(xs).double(), torch.stack(gs).double()


def test_output_grad_is_modelopt_score_from_per_token_output_gradients(setup):
    """G_o = T * mean_i sum_t g_ito^2 must match the prepass exactly; the profiled score, which assumes
    g^2 independent of the input, must track the exact 1/2 T mean_i sum_t,o g^2 (x_t . dW_o)^2."""
    model, calib, *_, table, prepass = setup
    tokens = calib.shape[1] - 1
    exact, profiled = [], []
    for layer in table.layers:
        x, g = _output_grads(model, layer.name, calib)  # (windows, T, in), (windows, T, out)
        fisher = tokens * (g**2).sum(1).mean(0)
        assert torch.allclose(prepass.layer(layer.name).output_fisher.double(), fisher, rtol=1e-4, atol=1e-12)
        weight = linear_weight(model.get_submodule(layer.name)).detach()
        error = gptq_quantize(weight, prepass.layer(layer.name).hessian, parse_formats("w2g64")[0]).dequantize()
        dy = x @ (error - weight).double().T  # (windows, T, out): Y_q - Y
        exact.append(0.5 * tokens * ((g * dy) ** 2).sum((1, 2)).mean().item())
        profiled.append(table.costs[layer.name]["w2g64"].output_grad)
    assert scipy.stats.spearmanr(profiled, exact)[0] > 0.9
    assert all(0.5 < p / e < 2 for p, e in zip(profiled, exact, strict=True)), (profiled, exact)


def test_activation_and_weight_stats_match_direct_computation(setup):
    model, calib, *_, table, _ = setup
    stats = next(layer for layer in table.layers if layer.name == DOWN)
    for values, prefix in ((_inputs(model, DOWN, calib), "act"), (model.get_submodule(DOWN).weight.double(), "weight")):
        flat = values.detach().flatten()
        assert getattr(stats, f"{prefix}_absmean") == pytest.approx(flat.abs().mean().item(), rel=1e-9)
        assert getattr(stats, f"{prefix}_std") == pytest.approx(flat.std(unbiased=False).item(), rel=1e-9)
        assert getattr(stats, f"{prefix}_max") == pytest.approx(flat.abs().max().item(), rel=1e-12)
        kurtosis = scipy.stats.kurtosis(flat.numpy(), fisher=False)
        assert getattr(stats, f"{prefix}_kurtosis") == pytest.approx(kurtosis, rel=1e-6)
    assert stats.act_kurtosis > 3  # the SwiGLU product feeding down_proj is heavy-tailed


def test_proxies_are_zero_unquantized_and_grow_as_bits_fall(setup):
    *_, table, _ = setup
    for proxy in ("weight", "hessian", "fisher", "outgrad", "grad", "kl"):
        matrix = table.proxy_matrix(proxy)  # columns: w2g64, w3g128, w4g128, w8, fp16
        assert (matrix[:, 4] == 0).all() and (matrix[:, :3] > 0).all(), proxy
        if proxy in ("weight", "hessian", "fisher", "outgrad"):  # on every layer, down to 8 bits
            assert (matrix[:, :3] > matrix[:, 1:4]).all() and (matrix[:, 3] > 0).all(), proxy
        else:  # the first-order and KL proxies are noisy at 8 bits, but strictly ordered from 2 to 4 bits
            assert (matrix[:, 0] > matrix[:, 1]).all() and (matrix[:, 1] > matrix[:, 2]).all(), proxy


def test_proxies_predict_the_real_loss_change_of_quantizing_one_layer(setup):
    """Quantize one layer at a time to w2g64 (GPTQ, as profiled) and measure the calibration loss at
    W + dW and W - dW. Their half difference is the first-order part of the change, which the
    profiled gradient must give exactly. Their mean minus L(W) is the curvature part, which the
    second-order proxies must rank. This tiny model is under-trained, so the first-order part has a
    random sign and dominates the raw change; ranking the raw change would test noise."""
    model, calib, _, _, table, prepass = setup
    fmt = parse_formats("w2g64")[0]

    def loss() -> float:
        return math.log(perplexity(model, calib, progress=False).ppl)

    base, first, curvature, predicted_first, first_bound = loss(), [], [], [], []
    for layer in table.layers:
        module = model.get_submodule(layer.name)
        original = linear_weight(module).detach().clone()
        error = gptq_quantize(original, prepass.layer(layer.name).hessian, fmt).dequantize() - original
        set_linear_weight(module, original + error)
        plus = loss()
        set_linear_weight(module, original - error)
        minus = loss()
        set_linear_weight(module, original)
        first.append((plus - minus) / 2)
        curvature.append((plus + minus) / 2 - base)
        products = prepass.layer(layer.name).grad.double() * error.double()
        predicted_first.append(products.sum().item())
        first_bound.append(products.abs().sum().item())
    # equal up to third-order terms
    assert scipy.stats.pearsonr(predicted_first, first)[0] > 0.99
    assert max(abs(p - f) for p, f in zip(predicted_first, first, strict=True)) < 0.1 * max(map(abs, first))
    assert min(curvature) > -1e-5  # the loss is locally convex along every quantization error
    column = table.format_index("w2g64")
    proxies = ("fisher", "outgrad", "grad", "kl")
    rho = {p: scipy.stats.spearmanr(table.proxy_matrix(p)[:, column], curvature)[0] for p in proxies}
    assert rho["fisher"] > 0.85 and rho["outgrad"] > 0.85 and rho["grad"] > 0.7 and rho["kl"] > 0.85, rho
    # outgrad is in loss units: the same order of magnitude as the measured curvature part (others are not)
    ratio = table.proxy_matrix("outgrad")[:, column] / torch.tensor(curvature).clamp(min=1e-9).numpy()
    assert 0.25 < float(np.median(ratio)) < 4, sorted(ratio)
    assert list(table.proxy_matrix("grad")[:, column]) == pytest.approx(first_bound)  # sum |g * dW|


def test_resume_after_a_kill_skips_finished_layers_and_writes_the_same_bytes(setup, tmp_path, monkeypatch):
    model, calib, kl_windows, info, *_ = setup
    formats = parse_formats("w2g64,fp16")
    calls = {"layers": 0, "prepass": 0}
    measure, prepass = profile_mod._measure_layer, profile_mod.collect_prepass

    def counted_measure(*args, **kwargs):
        if calls["layers"] == calls.get("kill_after", -1):
            raise KeyboardInterrupt  # the process is killed
        calls["layers"] += 1
        return measure(*args, **kwargs)

    def counted_prepass(*args, **kwargs):
        calls["prepass"] += 1
        return prepass(*args, **kwargs)

    monkeypatch.setattr(profile_mod, "_measure_layer", counted_measure)
    monkeypatch.setattr(profile_mod, "collect_prepass", counted_prepass)

    def run(work):
        return profile_model(
            model, formats, calib[:4], model_name="trained", calib_info=info, kl_windows=kl_windows[:1],
            work_dir=work, progress=False,
        )  # fmt: skip

    run(tmp_path / "straight").save(tmp_path)
    expected = (tmp_path / "sensitivity.json").read_bytes()
    assert (calls["layers"], calls["prepass"]) == (14, 1)

    calls.update(layers=0, prepass=0, kill_after=5)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    assert len(list((tmp_path / "resumed" / "layers").glob("*.json"))) == 5
    calls.update(layers=0, prepass=0, kill_after=-1)
    table = run(tmp_path / "resumed")
    assert (calls["layers"], calls["prepass"]) == (14 - 5, 0)  # neither the pre-pass nor finished layers rerun
    (tmp_path / "again").mkdir()
    table.save(tmp_path / "again")
    assert (tmp_path / "again" / "sensitivity.json").read_bytes() == expected

    # a work directory written under other settings is not reused (fp16 only: no GPTQ to wait for)
    calls.update(layers=0, prepass=0)
    profile_model(
        model, formats[-1:], calib[:4], model_name="trained", calib_info=info, work_dir=tmp_path / "resumed",
        progress=False,
    )  # fmt: skip
    assert (calls["layers"], calls["prepass"]) == (14, 1)


runner = CliRunner()


def test_cli_json_writes_the_table_and_removes_its_work_dir(trained_dir, tmp_path):
    data, out = trained_dir.parent, tmp_path / "prof"
    result = runner.invoke(app, [
        "profile", "--model", str(trained_dir), "--formats", "w4g128, fp16", "--calib", str(data / "calib.txt"),
        "--nsamples", "4", "--seqlen", "32", "--kl", "--kl-windows", "2", "--out", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["layers"] == 14 and summary["formats"] == ["w4g128", "fp16"]
    assert summary["seconds"] > 0 and summary["path"] == str(out / "sensitivity.json")
    table = SensitivityTable.load(out)
    assert table.calib == CalibInfo(spec=str(data / "calib.txt"), nsamples=4, seqlen=32, seed=0)
    assert table.proxy_matrix("kl")[:, 0].min() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prof"]  # the work directory is gone


def test_bad_inputs_give_one_error_and_no_output(trained_dir, tiny_dirs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    calib = str(trained_dir.parent / "calib.txt")
    model = ["--model", str(trained_dir), "--nsamples", "2", "--seqlen", "32"]
    cases = {
        "unknown format": ([*model, "--calib", calib, "--formats", "w4g128,w5g128"], "unknown format 'w5g128'"),
        "repeated format": ([*model, "--calib", calib, "--formats", "w4g128,w4g128"], "more than once"),
        "empty calibration": ([*model, "--calib", str(empty)], "is empty"),
        "no calibration": (model, "needs calibration text"),
        "group does not divide": (
            ["--model", str(tiny_dirs["llama"]), "--calib", calib, "--seqlen", "32", "--formats", "w4g128"],
            "not divisible",
        ),
    }
    for case, (args, message) in cases.items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        result = runner.invoke(app, ["profile", *args, "--out", str(out)])
        assert result.exit_code == 2, (case, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (case, lines)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*")), case
