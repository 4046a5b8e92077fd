"""Per-window proxy terms (`profile --per-window`) and the bootstrap over calibration windows: the terms
average to the table, match direct computation, resume; the bootstrap is deterministic, collapses when
the windows cannot vary, refuses what it cannot do; the report draws it."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import automp.sensitivity.profile as profile_mod
from automp.cli import app
from automp.data import load_windows
from automp.errors import AutompError
from automp.formats import parse_formats
from automp.model import linear_weight, load_model
from automp.quantizers.gptq import gptq_quantize
from automp.report import write_report
from automp.search.bootstrap import BOOTSTRAP_FILE, BootstrapResult, bootstrap, resolve
from automp.search.knapsack import Knapsack
from automp.search.problem import Problem
from automp.sensitivity.prepass import Prepass
from automp.sensitivity.profile import PREPASS_DIR, profile_model
from automp.sensitivity.table import CalibInfo, SensitivityTable
from automp.sensitivity.windows import WINDOWS_FILE, WindowCosts

FORMATS = "w2g64,w4g128,w8,fp16"
SEQLEN, WINDOWS = 64, 8
DOWN = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def setup(trained_dir, tmp_path_factory):
    """The trained tiny Llama profiled with per-window terms (8 windows of 64 tokens); the work dir is kept."""
    model, tokenizer = load_model(trained_dir)
    calib = load_windows(str(trained_dir.parent / "calib.txt"), tokenizer, SEQLEN, nsamples=WINDOWS, seed=0)
    info = CalibInfo(spec="calib.txt", nsamples=WINDOWS, seqlen=SEQLEN, seed=0)
    work = tmp_path_factory.mktemp("windows-work")
    table = profile_model(
        model, parse_formats(FORMATS), calib, model_name="trained", calib_info=info, work_dir=work,
        progress=False, per_window=True,
    )  # fmt: skip
    return model, calib, info, work, table, WindowCosts.load(work / WINDOWS_FILE)


def test_window_means_reproduce_the_tables_proxies(setup):
    *_, table, windows = setup
    windows.check(table)
    assert windows.windows == WINDOWS and windows.formats == table.formats
    for proxy in ("hessian", "fisher", "outgrad"):
        measured, mean = table.proxy_matrix(proxy), windows.proxy_matrix(proxy)
        assert np.allclose(mean, measured, rtol=1e-4, atol=0), proxy
        assert (mean[:, table.format_index("fp16")] == 0).all()
        assert (windows.proxy_matrix(proxy, np.eye(WINDOWS)[3]) > 0)[:, :3].all()  # one window alone: still > 0


def test_one_windows_terms_match_direct_computation(setup):
    """Window 3 of the down projection: ||X dW^T||^2 / T, 1/2 sum (dL/dW * dW)^2 and 1/2 sum_o A_o Q_o."""
    model, calib, _, work, table, windows = setup
    module, captured = model.get_submodule(DOWN), {}

    def hook(_m, inp, out):
        captured["x"] = inp[0].detach()[0].double()
        out.register_hook(lambda g: captured.update(dy=g.detach()[0].double()))

    handle = module.register_forward_hook(hook)
    ids = calib[3:4]
    logits = model(input_ids=ids, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    handle.remove()
    grad = module.weight.grad.double()
    model.zero_grad(set_to_none=True)
    hessian = Prepass(work / PREPASS_DIR).layer(DOWN).hessian
    weight = linear_weight(module).detach()
    x, dy = captured["x"], captured["dy"]  # (T, in), (T, out)
    layer = [lay.name for lay in table.layers].index(DOWN)
    for fmt in parse_formats("w2g64,w8"):
        error = (gptq_quantize(weight, hessian, fmt).dequantize() - weight).double()
        rows = ((x @ error.T) ** 2).sum(0) / len(x)
        column = table.format_index(fmt.name)
        assert windows.hessian[layer, column, 3] == pytest.approx(rows.sum().item(), rel=1e-5)
        assert windows.fisher[layer, column, 3] == pytest.approx(0.5 * ((grad * error) ** 2).sum().item(), rel=1e-5)
        out_fisher = (SEQLEN - 1) * (dy**2).sum(0)
        assert windows.outgrad[layer, column, 3, 3] == pytest.approx(0.5 * (out_fisher * rows).sum().item(), rel=1e-5)


def test_per_window_reuses_a_plain_profile_and_resumes(setup, tmp_path, monkeypatch):
    """A plain profile's work dir is reused as is (codes measured again by the same GPTQ), and the result
    equals a straight per-window run's; a run killed before the pass redoes only the pass."""
    model, calib, info, work, table, windows = setup
    plain = tmp_path / "plain"
    shutil.copytree(work, plain)
    shutil.rmtree(plain / profile_mod.CODES_DIR)
    (plain / WINDOWS_FILE).unlink()  # what a profile without per_window leaves
    layers_before = {p.name: p.read_bytes() for p in (plain / profile_mod.LAYERS_DIR).iterdir()}

    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished layer was measured again")

    monkeypatch.setattr(profile_mod, "_measure_layer", refuse)
    monkeypatch.setattr(profile_mod, "collect_prepass", refuse)

    def run(work_dir):
        return profile_model(
            model, parse_formats(FORMATS), calib, model_name="trained", calib_info=info, work_dir=work_dir,
            progress=False, per_window=True,
        )  # fmt: skip

    assert run(plain) == table
    assert {p.name: p.read_bytes() for p in (plain / profile_mod.LAYERS_DIR).iterdir()} == layers_before
    again = WindowCosts.load(plain)
    for kind in ("hessian", "fisher", "outgrad"):
        assert np.array_equal(getattr(again, kind), getattr(windows, kind)), kind
    # killed after the codes, before the pass: only the pass runs again, to the same bytes
    expected = (plain / WINDOWS_FILE).read_bytes()
    (plain / WINDOWS_FILE).unlink()
    monkeypatch.setattr(profile_mod, "gptq_quantize", refuse)
    run(plain)
    assert (plain / WINDOWS_FILE).read_bytes() == expected
    # a profile without per_window reuses the same work dir unchanged
    assert profile_model(
        model, parse_formats(FORMATS), calib, model_name="trained", calib_info=info, work_dir=plain, progress=False
    ) == table  # fmt: skip


def test_bootstrap_is_deterministic_for_a_seed(setup):
    *_, table, windows = setup
    problem = Problem(table=table, proxy="fisher", target_bits=3.0)
    first, second = bootstrap(problem, windows, 30, seed=1), bootstrap(problem, windows, 30, seed=1)
    assert first == second
    other = bootstrap(problem, windows, 30, seed=2)
    assert other.allocation_losses != first.allocation_losses
    full = Knapsack().solve(problem)
    assert [layer.format for layer in first.layers] == [table.formats[j] for j in full.choice]
    assert bootstrap(problem, windows, 30, seed=1, reference=full.allocation) == first  # the same allocation
    assert first.predicted_loss == pytest.approx(full.predicted_loss)
    for layer in first.layers:
        assert sum(layer.counts.values()) == 30 and layer.stability == layer.counts.get(layer.format, 0) / 30
    assert first.mean_stability == pytest.approx(np.mean([layer.stability for layer in first.layers]))
    ci = first.allocation_loss
    assert ci.low <= ci.mean <= ci.high and ci.low < full.predicted_loss < ci.high
    # each replicate's own optimum is never worse than the full-data allocation under that replicate
    assert all(o <= a * (1 + 1e-9) for o, a in zip(first.optimal_losses, first.allocation_losses, strict=True))


@pytest.mark.parametrize("proxy", ["hessian", "fisher", "outgrad"])
def test_windows_that_cannot_vary_give_stability_one_and_a_collapsed_interval(setup, proxy):
    *_, table, windows = setup
    problem = Problem(table=table, proxy=proxy, target_bits=3.0, tie_fused=True)
    full = Knapsack().solve(problem)
    # every replicate weighs the windows equally: the full data again
    same = resolve(problem, windows, np.full((4, WINDOWS), 1 / WINDOWS))
    assert same.mean_stability == 1.0 and same.stable_share == 1.0
    for interval in (same.allocation_loss, same.optimal_loss):
        assert interval.low == pytest.approx(interval.high, rel=1e-12)
        assert interval.mean == pytest.approx(full.predicted_loss, rel=1e-4)
    # every window identical to window 0: any resample is window 0 again
    copies = dataclasses.replace(
        windows,
        hessian=np.repeat(windows.hessian[..., :1], WINDOWS, -1),
        fisher=np.repeat(windows.fisher[..., :1], WINDOWS, -1),
        outgrad=np.broadcast_to(windows.outgrad[..., :1, :1], windows.outgrad.shape).copy(),
    )
    result = bootstrap(problem, copies, 20, seed=0)
    assert all(o == pytest.approx(result.optimal_losses[0], rel=1e-12) for o in result.optimal_losses)
    assert result.allocation_loss.low == pytest.approx(result.allocation_loss.high, rel=1e-12)


def test_bad_requests_give_one_clear_error(setup, tmp_path):
    *_, table, windows = setup
    problem = Problem(table=table, proxy="fisher", target_bits=3.0)
    for n in (0, -3):
        with pytest.raises(AutompError, match="positive number of replicates"):
            bootstrap(problem, windows, n)
    for proxy in ("grad", "kl"):
        with pytest.raises(AutompError, match="cannot be bootstrapped.*weight, hessian, fisher, outgrad"):
            bootstrap(dataclasses.replace(problem, proxy=proxy), windows, 5)
    other = table.model_copy(update={"calib": table.calib.model_copy(update={"seed": 7})})
    with pytest.raises(AutompError, match="another sensitivity table"):
        bootstrap(dataclasses.replace(problem, table=other), windows, 5)
    with pytest.raises(AutompError, match="profile --per-window"):
        WindowCosts.load(tmp_path / "missing")
    # weight is data-free: every replicate is the table itself
    constant = bootstrap(dataclasses.replace(problem, proxy="weight"), windows, 5)
    assert constant.stable_share == 1.0 and constant.allocation_loss.low == constant.allocation_loss.high


def test_result_round_trips_and_the_report_draws_it(setup, tmp_path):
    *_, table, windows = setup
    result = bootstrap(Problem(table=table, proxy="outgrad", target_bits=3.0), windows, 10, seed=0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    table.save(run_dir)
    report = write_report(run_dir, progress=False)
    page = (run_dir / "report" / "index.html").read_text()
    assert report["sections"]["stability"] == "missing" and "--bootstrap N" in page
    result.save(run_dir)
    assert BootstrapResult.load(run_dir / BOOTSTRAP_FILE) == result
    summary = json.loads(json.dumps(result.summary()))
    assert summary["n"] == 10 and set(summary["allocation_loss"]) == {"mean", "low", "high"}
    report = write_report(run_dir, progress=False)
    assert report["sections"]["stability"] == "drawn"
    assert (run_dir / "report" / "stability.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_cli_per_window_writes_the_artefact_beside_the_table(trained_dir, tmp_path):
    data, out = trained_dir.parent, tmp_path / "prof"
    result = CliRunner().invoke(app, [
        "profile", "--model", str(trained_dir), "--formats", "w4g128,fp16", "--calib", str(data / "calib.txt"),
        "--nsamples", "4", "--seqlen", "32", "--per-window", "--out", str(out), "--json",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    table, windows = SensitivityTable.load(out), WindowCosts.load(out)
    windows.check(table)
    assert windows.windows == 4 and np.allclose(windows.proxy_matrix("fisher"), table.proxy_matrix("fisher"), rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prof"]  # the work directory is gone
