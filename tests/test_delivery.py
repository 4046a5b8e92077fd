"""Verified delivery (`automp.delivery`) and budgets (`automp.budget`) on the tiny trained Llama."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from automp.budget import Budget, kv_cache_bytes, parse_size
from automp.checkpoint import model_bytes
from automp.data import calibration_windows, heldout_windows, load_heldout_windows, load_windows, tokenize
from automp.delivery import RealQuality, candidates, uniform_candidates, verify_delivery
from automp.errors import AutompError
from automp.formats import parse_formats
from automp.model import load_model
from automp.quantize import quantize_
from automp.search.evaluator import AllocationEvaluator
from automp.search.knapsack import Knapsack
from automp.search.problem import Problem
from automp.sensitivity.profile import profile_model
from automp.sensitivity.table import PROXIES, CalibInfo, SensitivityTable

SEQLEN = 64
FORMATS = "w2,w2g64,w4g128,w8,fp16"


@pytest.fixture(scope="module")
def setup(trained_dir):
    model, tokenizer = load_model(trained_dir)
    calib_text = str(trained_dir.parent / "calib.txt")
    calib = load_windows(calib_text, tokenizer, SEQLEN, nsamples=8, seed=0)
    windows = load_heldout_windows(calib_text, tokenizer, SEQLEN, 24, calib_nsamples=8, calib_seed=0, seed=2)
    info = CalibInfo(spec=calib_text, nsamples=8, seqlen=SEQLEN, seed=0)
    table = profile_model(model, parse_formats(FORMATS), calib, model_name="trained", calib_info=info, progress=False)
    return model, calib, windows, table


def _measure(model, calib, windows, method: str = "gptq") -> RealQuality:
    return RealQuality(model, windows, lambda m, allocation: quantize_(m, allocation, method, calib, progress=False))


def _lying(table: SensitivityTable) -> SensitivityTable:
    """Every proxy claims per-channel 2-bit (w2) costs nothing, on every layer."""
    costs = {}
    for layer in table.layers:
        costs[layer.name] = dict(table.costs[layer.name])
        free = {field: 0.0 for field in PROXIES.values() if getattr(costs[layer.name]["w2"], field) is not None}
        costs[layer.name]["w2"] = costs[layer.name]["w2"].model_copy(update=free)
    return table.model_copy(update={"costs": costs})


def test_uniform_candidates_are_the_largest_fitting_format_and_an_even_mix(setup):
    *_, table = setup
    problem = Problem(table, target_bits=3.0)
    found = uniform_candidates(problem)
    assert [c.label.split(" (")[0] for c in found] == ["uniform w2g64", "uniform mix w2g64+w4g128"]
    uniform, mix = found
    assert set(uniform.solution.allocation.formats.values()) == {"w2g64"}
    bits = table.bits_matrix()
    rows = np.arange(len(table.layers))
    assert bits[rows, mix.solution.choice].sum() <= problem.budget_bits
    # the mix spends the budget: raising any further layer to w4g128 would exceed it
    low, high = table.format_index("w2g64"), table.format_index("w4g128")
    lowest_extra = min(bits[i, high] - bits[i, low] for i in rows if mix.solution.choice[i] == low)
    assert bits[rows, mix.solution.choice].sum() + lowest_extra > problem.budget_bits
    raised = [i for i in rows if mix.solution.choice[i] == high]
    assert raised and min(raised) < len(rows) / 2 < max(raised)  # spread through the model, not bunched


def test_candidates_hold_every_proxys_knapsack_once(setup):
    *_, table = setup
    problem = Problem(table, target_bits=3.0)
    solution = Knapsack().solve(problem)
    pool = candidates(problem, solution)
    keys = [tuple(c.solution.choice) for c in pool]
    assert len(keys) == len(set(keys))  # each allocation measured once
    for proxy in [p for p in PROXIES if p != "kl"]:  # kl was not profiled
        exact = Knapsack().solve(replace(problem, proxy=proxy))
        assert tuple(exact.choice) in keys
    assert pool[0].label == "knapsack" and pool[0].kind == "mixed"


def test_verification_delivers_uniform_when_the_allocation_is_made_worse_on_purpose(setup):
    """A table that claims w2 is free: at 4.2 bits every proxy's knapsack pays for 8/16-bit layers with
    per-channel 2-bit ones, while uniform w4g128 fits and is nearly lossless."""
    model, calib, windows, table = setup
    problem = Problem(_lying(table), target_bits=4.2)
    bad = Knapsack().solve(problem)
    assert "w2" in bad.allocation.formats.values()
    measure = _measure(model, calib, windows, "rtn")
    record = verify_delivery(problem, bad, measure, text="held-out", method="rtn", max_evals=0, progress=False)
    measure.restore()
    assert record.delivered_kind == "uniform" and record.delivered == record.best_uniform
    by_label = {c.label: c for c in record.candidates}
    best_mixed = by_label[record.best_mixed]
    assert best_mixed.nll > by_label[record.best_uniform].nll  # the inverted allocations really are worse
    assert best_mixed.delta_nll == pytest.approx(best_mixed.nll - by_label[record.best_uniform].nll, abs=1e-6)
    assert best_mixed.delta_nll > 2 * best_mixed.se  # by far more than noise
    assert record.delta_nll == 0.0 and not record.significant
    assert "uniform delivered" in record.reason
    assert record.best_uniform == "uniform w4g128" and set(record.allocation.formats.values()) == {"w4g128"}


def test_verification_delivers_the_best_measured_mixed_allocation_and_is_deterministic(setup):
    model, calib, windows, table = setup
    problem = Problem(table, target_bits=3.0)
    solution = Knapsack().solve(problem)
    records = []
    for _ in range(2):
        measure = _measure(model, calib, windows, "rtn")
        records.append(verify_delivery(problem, solution, measure, text="held-out", method="rtn", progress=False))
        measure.restore()
    first, second = records
    assert first.model_dump(exclude={"seconds"}) == second.model_dump(exclude={"seconds"})
    nll = {c.label: c.nll for c in first.candidates}
    assert nll[first.delivered] == min(nll.values())  # never worse than any measured candidate, uniform included
    if first.delivered_kind == "mixed":
        assert first.delta_nll < 0


def test_refinement_runs_when_mixed_loses_and_its_result_is_measured_for_real(setup):
    model, calib, windows, table = setup
    problem = Problem(_lying(table), target_bits=4.2)
    bad = Knapsack().solve(problem)
    measure = _measure(model, calib, windows, "rtn")

    def evaluator():
        return AllocationEvaluator(model, windows, table.formats, method="rtn")

    record = verify_delivery(
        problem, bad, measure, text="held-out", method="rtn", refine_evaluator=evaluator, max_evals=12, progress=False
    )
    measure.restore()
    assert record.refine is not None and 1 <= record.refine["evaluations"] <= 12
    assert record.refine["best"] <= record.refine["start"]
    nll = {c.label: c.nll for c in record.candidates}
    assert nll[record.delivered] == min(nll.values())


def test_heldout_windows_never_overlap_calibration_windows(tokenizer, corpus):
    tokens = tokenize(corpus[0][:100_000], tokenizer)
    calib = calibration_windows(tokens, 40, SEQLEN, seed=3)
    held = heldout_windows(tokens, 30, SEQLEN, calib_nsamples=40, calib_seed=3, seed=1)
    assert held.shape == (30, SEQLEN)
    generator = torch.Generator().manual_seed(3)
    starts = torch.randint(0, len(tokens) - SEQLEN, (40,), generator=generator).tolist()  # as calibration draws
    aligned = tokens[: len(tokens) // SEQLEN * SEQLEN].reshape(-1, SEQLEN)
    for window in held:
        k = next(k for k, row in enumerate(aligned) if torch.equal(row, window))
        assert all(s + SEQLEN <= k * SEQLEN or s >= (k + 1) * SEQLEN for s in starts)
    assert torch.equal(held, heldout_windows(tokens, 30, SEQLEN, calib_nsamples=40, calib_seed=3, seed=1))
    assert calib.shape == (40, SEQLEN)


def test_calibration_from_several_sources_shares_the_windows_equally(tmp_path, tokenizer, corpus):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(corpus[0][:50_000])
    b.write_text(corpus[1][:20_000])
    mixed = load_windows(f"{a},{b}", tokenizer, SEQLEN, nsamples=7, seed=0)
    assert torch.equal(mixed[:4], load_windows(str(a), tokenizer, SEQLEN, nsamples=4, seed=0))
    assert torch.equal(mixed[4:], load_windows(str(b), tokenizer, SEQLEN, nsamples=3, seed=0))
    with pytest.raises(AutompError, match="fewer than the 2 calibration sources"):
        load_windows(f"{a},{b}", tokenizer, SEQLEN, nsamples=1)


# ---- budgets ------------------------------------------------------------------------------------


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("3.2GB", "--x") == 3_200_000_000
    assert parse_size("24GiB", "--x") == 24 * 2**30
    assert parse_size("512 MB", "--x") == 512_000_000
    assert parse_size("1000", "--x") == 1000
    for bad in ("3.2 bananas", "-1GB", "0", "GB", ""):
        with pytest.raises(AutompError, match="--x"):
            parse_size(bad, "--x")


def test_kv_cache_matches_a_hand_computation():
    config = LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=8, num_key_value_heads=2)
    # K and V, 3 layers, 2 kv heads of 64/8 = 8 dims, 100 tokens, batch 4, 2 bytes
    assert kv_cache_bytes(config, context=100, batch=4) == 2 * 3 * 2 * 8 * 100 * 4 * 2
    config.head_dim = 16  # an explicit head dimension wins over hidden / heads
    assert kv_cache_bytes(config, context=100, batch=1) == 2 * 3 * 2 * 16 * 100 * 2


class _Settings:
    def __init__(self, **values):
        defaults = dict(target_bits=None, target_size=None, fit_memory=None, context=None, batch=1, overhead="0")
        self.__dict__.update(defaults | values)


def test_budgets_need_exactly_one_kind_and_check_their_values():
    with pytest.raises(AutompError, match="exactly one budget"):
        Budget.of(_Settings())
    with pytest.raises(AutompError, match="exactly one budget"):
        Budget.of(_Settings(target_bits=3.0, target_size="1MB"))
    with pytest.raises(AutompError, match="--target-bits must be positive"):
        Budget.of(_Settings(target_bits=-1.0))
    with pytest.raises(AutompError, match="--batch"):
        Budget.of(_Settings(fit_memory="1GB", batch=0))
    with pytest.raises(AutompError, match="--overhead"):
        Budget.of(_Settings(fit_memory="1GB", overhead="lots"))


def test_target_size_gives_a_model_that_fits_as_stored(setup, trained_dir):
    *_, table = setup
    for size in (640_000, 680_000):
        budget = Budget.of(_Settings(target_size=str(size)))
        bits = budget.average_bits(table.weight_count(), table.dense_bytes, len(table.layers))
        allocation = Knapsack().solve(Problem(table, target_bits=bits)).allocation
        model, _ = load_model(trained_dir)
        qweights = quantize_(model, allocation, "rtn", progress=False)
        assert model_bytes(model, qweights) <= size
        assert model_bytes(model, qweights) > size - 12_000  # and it uses the room it has
    with pytest.raises(AutompError, match="unquantized tensors alone"):
        Budget.of(_Settings(target_size="100kB")).average_bits(table.weight_count(), table.dense_bytes, 14)


def test_fit_memory_subtracts_the_kv_cache_and_the_overhead(setup, trained_dir):
    *_, table = setup
    config = load_model(trained_dir)[0].config
    kv = kv_cache_bytes(config, 128, 2)
    budget = Budget.of(_Settings(fit_memory=str(650_000 + kv + 1000), context=128, batch=2, overhead="1000"))
    assert budget.model_bytes(config) == 650_000
    same = Budget.of(_Settings(target_size="650000"))
    args = (table.weight_count(), table.dense_bytes, len(table.layers))
    assert budget.average_bits(*args, config) == same.average_bits(*args)
    assert math.isclose(
        same.average_bits(*args), (650_000 - table.dense_bytes - 2 * 14) * 8 / table.weight_count(), rel_tol=1e-8
    )
