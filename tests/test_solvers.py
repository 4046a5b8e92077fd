"""The deterministic solvers, the frontier and `automp search`, on sensitivity tables built here.

The tables are synthetic but shaped like real ones: Llama-style layer shapes, exact stored bits from
the format registry, and predicted losses that fall with bits at a per-layer sensitivity.
"""

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from automp.allocation import Allocation
from automp.cli import app
from automp.errors import AutompError
from automp.formats import get_format
from automp.search.frontier import frontier, parse_range
from automp.search.knapsack import Knapsack
from automp.search.problem import Problem
from automp.search.registry import SOLVERS, get_solver
from automp.search.result import SearchResult
from automp.sensitivity.table import PROXIES, CalibInfo, FormatCost, LayerStats, SensitivityTable

FORMATS = ["w2g64", "w3g128", "w4g128", "w8", "fp16"]
ROLES = {"q": (256, 256), "k": (128, 256), "v": (128, 256), "o": (256, 256), "gate": (512, 256), "up": (512, 256)}
ROLES["down"] = (256, 512)
DETERMINISTIC = ("knapsack", "greedy", "quantile")


def make_table(blocks: int = 2, formats: list[str] = FORMATS, seed: int = 0, roles: dict = ROLES) -> SensitivityTable:
    """``blocks`` Llama-style blocks; loss ~ sensitivity * weights * 4^-bits, with noise per proxy."""
    rng = np.random.default_rng(seed)
    layers, costs, fused = [], {}, []
    for block in range(blocks):
        names = {role: f"model.layers.{block}.{role}_proj" for role in roles}
        fused += [[names[r] for r in group if r in names] for group in (("q", "k", "v"), ("gate", "up"))]
        for role, (out, inp) in roles.items():
            stats = dict(act_absmean=1.0, act_std=1.0, act_max=5.0, act_kurtosis=3.0)
            stats |= dict(weight_absmean=0.02, weight_std=0.03, weight_max=0.2, weight_kurtosis=3.0)
            layer = LayerStats(name=names[role], block=block, role=role, out_features=out, in_features=inp, **stats)
            layers.append(layer)
            sensitivity = rng.lognormal(0.0, 1.5)
            costs[layer.name] = {}
            for name in formats:
                fmt = get_format(name)
                bits = fmt.storage_bits(out, inp)
                base = 0.0 if not fmt.quantized else sensitivity * layer.numel * 4.0 ** -(bits / layer.numel) * 1e-3
                noisy = {field: base * rng.uniform(0.8, 1.25) for field in PROXIES.values() if field != "kl"}
                costs[layer.name][name] = FormatCost(bits=bits, kl=base, **noisy)
    calib = CalibInfo(spec="synthetic", nsamples=8, seqlen=64, seed=seed)
    return SensitivityTable(
        model="synthetic", formats=formats, layers=layers, costs=costs, fused=fused, calib=calib, dense_bytes=123_456
    )


def brute_force(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Total bits and proxy sum of every allocation the problem permits (pins, allowed formats, ties)."""
    bits, loss, mask = problem.table.bits_matrix(), problem.table.proxy_matrix(problem.proxy), problem.choices()
    total_bits, total_loss = np.zeros(1, dtype=np.int64), np.zeros(1)
    for members in problem.groups():
        options = np.flatnonzero(mask[members].all(axis=0))
        # every allocation so far, extended by each format this group may take
        total_bits = (total_bits[:, None] + bits[members][:, options].sum(axis=0)[None]).ravel()
        total_loss = (total_loss[:, None] + loss[members][:, options].sum(axis=0)[None]).ravel()
    return total_bits, total_loss


def stored_bits(problem: Problem, allocation: Allocation) -> int:
    """Recomputed from the format registry, independently of the table and the solvers."""
    return sum(
        allocation.format_of(layer.name).storage_bits(layer.out_features, layer.in_features)
        for layer in problem.table.layers
    )


@pytest.fixture(scope="module")
def table() -> SensitivityTable:
    return make_table()


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("method", ["enumerate", "milp"])
def test_knapsack_is_exact_against_brute_force(method):
    """6 layers x 4 formats, with tie groups and pins, at many budgets across the feasible range."""
    roles = {"q": (128, 256), "k": (64, 256), "v": (64, 256), "o": (256, 128), "gate": (384, 256), "up": (384, 256)}
    solver = Knapsack(method)
    rng = np.random.default_rng(1)
    checked = 0
    for seed in range(8):
        table = make_table(blocks=1, formats=["w2g64", "w3g128", "w4g128", "w8"], seed=seed, roles=roles)
        pinned = {table.layers[seed % 6].name: "w8"} if seed % 2 else {}
        base = Problem(table, proxy="hessian", pinned=pinned, tie_fused=seed % 3 == 0)
        all_bits, all_loss = brute_force(base)
        for target in rng.uniform(all_bits.min() * 0.98, all_bits.max() * 1.02, 15) / table.weight_count():
            problem = replace(base, target_bits=float(target))
            fits = all_bits <= problem.budget_bits
            if not fits.any():  # below what the pins allow: the solver must say so
                with pytest.raises(AutompError, match="minimum achievable"):
                    solver.solve(problem)
                continue
            solution = solver.solve(problem)
            assert stored_bits(problem, solution.allocation) <= problem.budget_bits
            assert solution.predicted_loss == pytest.approx(all_loss[fits].min(), rel=1e-9)
            checked += 1
    assert checked >= 100


def test_exact_beats_heuristics_and_agrees_with_milp(table):
    for target in (2.5, 3.0, 3.5, 4.25, 6.0):
        problem = Problem(table, target_bits=target)
        exact = Knapsack("enumerate").solve(problem)
        assert Knapsack("milp").solve(problem).predicted_loss == pytest.approx(exact.predicted_loss, rel=1e-9)
        for name in ("greedy", "quantile"):
            assert get_solver(name).solve(problem).predicted_loss >= exact.predicted_loss * (1 - 1e-12)


# ------------------------------------------------------------------------------ budgets, ties, pins


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_budget_met_in_real_bits(table, name):
    for target in (2.3, 3.0, 3.37, 4.125, 5.5):
        problem = Problem(table, target_bits=target)
        solution = get_solver(name).solve(problem)
        bits = stored_bits(problem, solution.allocation)
        assert bits <= problem.budget_bits
        assert solution.avg_bits == bits / table.weight_count()
        predicted = sum(table.costs[lay.name][solution.allocation.formats[lay.name]].output_err for lay in table.layers)
        assert solution.predicted_loss == pytest.approx(predicted, rel=1e-12)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_ties_and_pins_honoured(table, name):
    pinned = {"model.layers.0.down_proj": "fp16", "model.layers.1.q_proj": "w2g64"}
    problem = Problem(table, target_bits=4.5, pinned=pinned, tie_fused=True, allowed=["w2g64", "w3g128", "w4g128"])
    formats = get_solver(name).solve(problem).allocation.formats
    assert {formats[n] for n in pinned} == {"fp16", "w2g64"} and formats["model.layers.0.down_proj"] == "fp16"
    for group in table.fused:
        assert len({formats[n] for n in group}) == 1, group
    assert formats["model.layers.1.k_proj"] == "w2g64"  # tied to the pinned q_proj
    free = set(formats) - set(pinned)
    assert {formats[n] for n in free} <= {"w2g64", "w3g128", "w4g128"}


def test_infeasible_budget_names_the_minimum(table):
    with pytest.raises(AutompError, match=r"minimum achievable 2\.2500 avg bits"):
        Knapsack().solve(Problem(table, target_bits=2.2))
    # pinning the largest layer to fp16 raises the minimum: (16 - 2.25) * its share of the weights
    pinned = {"model.layers.0.gate_proj": "fp16"}
    minimum = 2.25 + 13.75 * 512 * 256 / table.weight_count()
    for name in DETERMINISTIC:
        with pytest.raises(AutompError, match=f"minimum achievable {np.ceil(minimum * 1e4) / 1e4:.4f}"):
            get_solver(name).solve(Problem(table, target_bits=minimum - 0.01, pinned=pinned))
        assert get_solver(name).solve(Problem(table, target_bits=minimum, pinned=pinned)).avg_bits == minimum
    with pytest.raises(AutompError, match="pinned to different formats"):
        pins = {"model.layers.0.q_proj": "w8", "model.layers.0.k_proj": "w4g128"}
        Knapsack().solve(Problem(table, target_bits=4, pinned=pins, tie_fused=True))
    with pytest.raises(AutompError, match="not in the sensitivity table"):
        Knapsack().solve(Problem(table, pinned={"model.layers.9.q_proj": "w8"}))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_budget_above_the_maximum_gives_the_best(table, name):
    solution = get_solver(name).solve(Problem(table, target_bits=40))
    assert set(solution.allocation.formats.values()) == {"fp16"}
    assert solution.avg_bits == 16 and solution.predicted_loss == 0


# ------------------------------------------------------------------------------ frontier, determinism


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_frontier_is_non_increasing(table, name):
    points = frontier(Problem(table), 2.0, 8.0, 0.25, solver=name)
    assert [p.target_bits for p in points] == [2.25 + 0.25 * i for i in range(24)]  # 2.0 is below the minimum
    losses = [p.predicted_loss for p in points]
    assert all(b <= a for a, b in itertools.pairwise(losses)) and losses[0] > 10 * losses[-1]
    assert all(p.avg_bits <= p.target_bits for p in points)
    if name == "knapsack":  # the exact curve is non-increasing by itself: no point borrowed its neighbour's
        for p in points[::5]:
            assert Knapsack().solve(Problem(table, target_bits=p.target_bits)).allocation == p.allocation
    with pytest.raises(AutompError, match="lo:hi:step"):
        parse_range("2.5:8")


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic(table, name):
    problem = Problem(table, target_bits=3.3, tie_fused=True)
    first = get_solver(name).solve(problem, seed=3)
    again = get_solver(name).solve(replace(problem), seed=3)
    assert first.allocation == again.allocation and first.predicted_loss == again.predicted_loss


# ------------------------------------------------------------------------------ solver specifics


def test_greedy_loss_budget(table):
    problem = Problem(table, target_bits=5.0)
    plain = get_solver("greedy").solve(problem)
    # a loss budget well above the bits-limited loss lets the greedy keep lowering, staying within it
    loose = get_solver("greedy", max_loss=plain.predicted_loss * 3).solve(problem)
    assert loose.avg_bits < plain.avg_bits and plain.predicted_loss < loose.predicted_loss <= plain.predicted_loss * 3
    with pytest.raises(AutompError, match="above the loss budget"):
        get_solver("greedy", max_loss=plain.predicted_loss / 2).solve(problem)


def test_quantile_gives_sensitive_layers_more_bits(table):
    solver = get_solver("quantile")
    problem = Problem(table, target_bits=3.5)
    solution = solver.solve(problem)
    per_weight = {lay.name: table.costs[lay.name]["w2g64"].output_err / lay.numel for lay in table.layers}
    most, least = max(per_weight, key=per_weight.get), min(per_weight, key=per_weight.get)
    bits = {
        lay.name: table.costs[lay.name][solution.allocation.formats[lay.name]].bits / lay.numel for lay in table.layers
    }
    assert bits[most] > bits[least]
    assert len(set(solution.allocation.formats.values())) >= 3  # the classes are populated, not all-or-nothing
    # the greedy fix left no upgrade that fits the unused bits and lowers the loss
    left = problem.budget_bits - solution.avg_bits * table.weight_count()
    for lay in table.layers:
        costs = table.costs[lay.name]
        here = costs[solution.allocation.formats[lay.name]]
        upgrades = [c for c in costs.values() if c.bits > here.bits]
        if upgrades:
            nearest = min(upgrades, key=lambda c: c.bits)
            assert nearest.bits - here.bits > left or nearest.output_err >= here.output_err
    assert left < 0.05 * problem.budget_bits


def test_registry(table):
    assert set(DETERMINISTIC) <= set(SOLVERS)
    with pytest.raises(AutompError, match="unknown solver 'nope'"):
        get_solver("nope")
    with pytest.raises(AutompError, match="has no option 'max_loss'"):
        get_solver("knapsack", max_loss=1.0)
    with pytest.raises(AutompError, match="unknown proxy"):
        Knapsack().solve(Problem(table, proxy="entropy"))


# ------------------------------------------------------------------------------ the command line


def test_search_cli(table, tmp_path):
    runner = CliRunner()
    profile = tmp_path / "profile"
    profile.mkdir()
    table.save(profile)
    out = tmp_path / "alloc.json"
    args = ["search", "--profile", profile, "--target-bits", "3.5", "--out", out, "--tie-fused", "--json"]
    result = runner.invoke(app, [str(a) for a in [*args, "--pin", "model.layers.0.o_proj=w8", "--proxy", "fisher"]])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"avg_bits", "predicted_loss", "solver", "seconds", "bytes", "path"} <= set(printed)
    allocation = Allocation.load(out)  # the saved file is an Allocation, with the search details alongside
    saved = SearchResult.load(out)
    assert allocation.formats == saved.formats and allocation.formats["model.layers.0.o_proj"] == "w8"
    bits = sum(table.costs[n][f].bits for n, f in allocation.formats.items())
    assert printed["avg_bits"] == saved.avg_bits == bits / table.weight_count() <= 3.5
    assert printed["bytes"] == bits // 8 + 123_456 and printed["solver"] == "knapsack"
    problem = Problem(table, proxy="fisher", target_bits=3.5, pinned={"model.layers.0.o_proj": "w8"}, tie_fused=True)
    assert printed["predicted_loss"] == pytest.approx(Knapsack().solve(problem).predicted_loss, rel=1e-12)

    bad = tmp_path / "bad.json"
    result = runner.invoke(app, ["search", "--profile", str(profile), "--target-bits", "1.5", "--out", str(bad)])
    assert result.exit_code == 2 and not bad.exists() and not list(tmp_path.glob(".bad*"))
    assert result.stderr.strip() == "error: target 1.5 avg bits is below the minimum achievable 2.2500 avg bits " + (
        "with the allowed formats and pins"
    )

    result = runner.invoke(app, ["search", "--profile", str(profile), "--frontier", "2.5:8:0.5", "--json"])
    assert result.exit_code == 0, result.output
    curve = json.loads(result.stdout.strip().splitlines()[-1])
    assert [p["target_bits"] for p in curve] == [2.5 + 0.5 * i for i in range(12)]
    assert all(b["predicted_loss"] <= a["predicted_loss"] for a, b in itertools.pairwise(curve))
