"""The solvers that measure real quality: REINFORCE, PPO, annealing, verification and refinement.

All run on the trained tiny Llama, with a sensitivity table from a small profiling pass and
perplexity on two held-out windows.
"""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from automp.allocation import Allocation
from automp.cli import app
from automp.data import load_windows
from automp.errors import AutompError
from automp.execution.plan import memory_plan
from automp.formats import parse_formats
from automp.model import load_model
from automp.search.anneal import Anneal
from automp.search.evaluator import AllocationEvaluator
from automp.search.knapsack import Knapsack
from automp.search.ppo import PPOSolver
from automp.search.problem import Problem
from automp.search.registry import get_solver
from automp.search.reinforce import Reinforce
from automp.search.space import DecisionSpace, bit_options
from automp.search.verify import candidates, proxy_scores, refine, verify
from automp.sensitivity.profile import profile_model
from automp.sensitivity.table import CalibInfo

FORMATS = "w3g128,w4g128,w8"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(trained_dir):
    """(table, evaluator): the table profiled on calibration text, the evaluator on 2 evaluation windows."""
    model, tokenizer = load_model(trained_dir, device="cpu")
    calib = load_windows(str(trained_dir.parent / "calib.txt"), tokenizer, 64, 4, seed=0)
    info = CalibInfo(spec="calib.txt", nsamples=4, seqlen=64, seed=0)
    table = profile_model(model, parse_formats(FORMATS), calib, model_name="tiny", calib_info=info, progress=False)
    windows = load_windows(str(trained_dir.parent / "eval.txt"), tokenizer, 128)[:2]
    with AllocationEvaluator(model, windows, FORMATS.split(",")) as evaluator:
        yield table, evaluator


def _means(curve, key="reward", fraction=0.2):
    values = [row[key] for row in curve]
    n = max(1, int(len(values) * fraction))
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


def test_bit_options_and_repair(bench):
    table, _ = bench
    problem = Problem(table, target_bits=3.6)
    assert bit_options(problem) == ["w3g128", "w4g128", "w8"]
    space = DecisionSpace.build(problem, bit_options(problem))
    top = np.full(space.n_groups, space.n_options - 1)  # everything at 8 bits: far over budget
    repaired = space.repair(top)
    assert space.total_bits(repaired) <= space.budget < space.total_bits(top)
    # the first step of the repair lowers the group with the least predicted damage per saved bit
    per_bit = (space.cost[:, 1] - space.cost[:, 2]) / (space.bits[:, 2] - space.bits[:, 1])
    assert repaired[int(np.argmin(per_bit))] < space.n_options - 1
    with pytest.raises(AutompError, match="below the cheapest"):
        DecisionSpace.build(Problem(table, target_bits=3.0), bit_options(problem))


def test_reinforce_learns_within_budget_and_is_deterministic(bench):
    table, evaluator = bench
    problem = Problem(table, target_bits=4.5)
    before = evaluator.evaluations
    solution = Reinforce(episodes=50).solve(problem, seed=0, evaluator=evaluator)
    first, last = _means(solution.curve)
    assert last > first + 0.5  # from random 3/4/8-bit mixes to allocations that save memory at little loss
    assert solution.avg_bits <= 4.5 and solution.evaluations == 50 == evaluator.evaluations - before
    assert set(solution.curve[0]) >= {"reward", "ppl", "memory_saving", "avg_bits"}
    again = Reinforce(episodes=50).solve(problem, seed=0, evaluator=evaluator)
    assert again.choice == solution.choice and again.curve == solution.curve
    other = Reinforce(episodes=5).solve(problem, seed=1, evaluator=evaluator)
    assert [r["reward"] for r in other.curve] != [r["reward"] for r in solution.curve[:5]]


def test_reinforce_resumes_to_the_same_result(bench, tmp_path):
    table, evaluator = bench
    problem = Problem(table, target_bits=4.0)
    whole = Reinforce(episodes=24, checkpoint_every=4).solve(problem, seed=3, evaluator=evaluator)
    state = tmp_path / "reinforce.pt"
    Reinforce(episodes=10, state=state, checkpoint_every=4).solve(problem, seed=3, evaluator=evaluator)
    # a run killed after episode 10 finds the state saved at episode 10 (the last episode saves too)
    resumed = Reinforce(episodes=24, state=state, checkpoint_every=4).solve(problem, seed=3, evaluator=evaluator)
    assert resumed.curve == whole.curve and resumed.choice == whole.choice
    assert (tmp_path / "reinforce.pt.curve.json").is_file()
    with pytest.raises(AutompError, match="other settings"):
        Reinforce(episodes=24, state=state, alpha=1.0).solve(problem, seed=3, evaluator=evaluator)


def test_reinforce_repairs_an_over_budget_policy(bench):
    table, evaluator = bench
    problem = Problem(table, target_bits=3.5)
    solution = Reinforce(episodes=3, penalty=0.0, beta=0.0).solve(problem, seed=0, evaluator=evaluator)
    assert solution.avg_bits <= 3.5
    with pytest.raises(AutompError, match="evaluator"):
        Reinforce(episodes=3).solve(problem)


def test_ppo_learns_within_budget_and_resumes(bench, tmp_path):
    table, evaluator = bench
    problem = Problem(table, target_bits=4.5)
    solution = PPOSolver(episodes=60, checkpoint_every=5).solve(problem, seed=0, evaluator=evaluator)
    first, last = _means(solution.curve)
    assert last > first + 0.5
    assert solution.avg_bits <= 4.5 and solution.evaluations == 60
    assert solution.curve[-1]["attn_shift"] > 0 and solution.curve[-1]["kl"] > 0
    state = tmp_path / "ppo.pt"
    PPOSolver(episodes=20, checkpoint_every=5, state=state).solve(problem, seed=0, evaluator=evaluator)
    resumed = PPOSolver(episodes=60, checkpoint_every=5, state=state).solve(problem, seed=0, evaluator=evaluator)
    assert resumed.curve == solution.curve and resumed.choice == solution.choice


def test_anneal_never_ends_worse_than_the_knapsack_start(bench):
    table, evaluator = bench
    problem = Problem(table, target_bits=4.0)
    start = Knapsack().solve(problem)
    start_loss = evaluator(start.allocation)
    before = evaluator.evaluations
    solution = get_solver("anneal", max_evals=25).solve(problem, seed=0, evaluator=evaluator)
    assert solution.curve[0]["loss"] == start_loss
    assert evaluator(solution.allocation) == min(row["loss"] for row in solution.curve) <= start_loss
    assert solution.evaluations == len(solution.curve) == 25 == evaluator.evaluations - before - 1
    assert solution.avg_bits <= 4.0
    again = Anneal(max_evals=25).solve(problem, seed=0, evaluator=evaluator)
    assert again.choice == solution.choice and again.curve == solution.curve


def test_verify_ranks_proxies_and_refine_improves(bench):
    table, evaluator = bench
    problem = Problem(table, target_bits=4.0)
    start = Knapsack().solve(problem)
    pool = candidates(problem, start, 6)
    assert len(pool) == 6 and pool[0] is start and len({tuple(c.choice) for c in pool}) == 6
    assert all(c.avg_bits <= 4.0 for c in pool)
    scores = proxy_scores(pool, table)
    assert set(scores) == {"weight", "hessian", "grad", "fisher", "outgrad"}  # kl was not profiled
    report = verify(pool, evaluator, scores)
    assert report["real"][0] == evaluator(start.allocation) and report["evaluations"] == 6
    assert all(rho is None or -1 <= rho <= 1 for rho in report["spearman"].values())
    refined = refine(start, problem, evaluator, max_evals=15)
    assert refined.evaluations <= 15 and refined.avg_bits <= 4.0
    assert evaluator(refined.allocation) <= report["real"][0]
    assert refined.solver == "knapsack+refine"


def test_search_command_verifies_refines_and_saves_the_curve(bench, trained_dir, tmp_path):
    table, _ = bench
    table.save(tmp_path)
    data, out = trained_dir.parent, tmp_path / "alloc.json"
    common = ["search", "--profile", tmp_path, "--target-bits", "4.2", "--out", out, "--model", trained_dir]
    real = ["--eval", data / "eval.txt", "--eval-windows", "2", "--seqlen", "128"]
    args = [*common, *real, "--solver", "reinforce", "--episodes", "6", "--verify", "3", "--refine", "--max-evals", "5"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--json"]])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(metrics["verify"]["real"]) == 3 and metrics["verify"]["solvers"][0] == "reinforce"
    assert metrics["refine"]["best"] == metrics["real_loss"] <= min(metrics["verify"]["real"])
    assert metrics["avg_bits"] <= 4.2 and metrics["solver"].endswith("+refine")
    assert metrics["total_evaluations"] == 6 + 3 + metrics["refine"]["evaluations"] + 1
    assert len(json.loads((tmp_path / "alloc.json.curve.json").read_text())) == 6
    assert Allocation.load(out).formats == json.loads(out.read_text())["formats"]
    result = CliRunner().invoke(app, [str(a) for a in [*common, "--solver", "anneal"]])
    assert result.exit_code == 2 and "--eval" in result.output


def test_search_refuses_an_evaluator_whose_memory_plan_does_not_fit(bench, trained_dir, tmp_path):
    """The evaluator caches every format's weights in memory: under a budget that holds the model but not that
    cache, the search is refused before the model loads, naming the stage and the numbers."""
    table, _ = bench
    table.save(tmp_path)
    batch = 2  # --eval-windows: the windows one evaluation runs at once
    figures = memory_plan(str(trained_dir), formats=",".join(table.formats), nsamples=1, seqlen=128,
                          batch_size=batch, device="cpu", stages="load,evaluator").modes["in-memory"]  # fmt: skip
    load, cached = (figures[stage].device_bytes + figures[stage].cpu_bytes for stage in ("load", "evaluator"))
    assert cached > 2 * load  # the model, its original weights and a copy per quantized format
    args = ["search", "--profile", tmp_path, "--target-bits", "4.2", "--out", tmp_path / "alloc.json", "--model",
            trained_dir, "--eval", trained_dir.parent / "eval.txt", "--eval-windows", batch, "--seqlen", "128",
            "--verify", "3", "--device", "cpu", "--device-memory", (load + cached) // 2]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "evaluator needs" in result.output and "the search's evaluator holds the model" in result.output
    assert not (tmp_path / "alloc.json").exists()


def test_pins_and_tied_groups_hold_in_learned_solutions(bench):
    table, evaluator = bench
    pinned = table.layers[0].name
    problem = Problem(table, target_bits=4.2, pinned={pinned: "w8"}, tie_fused=True)
    for solver in (Reinforce(episodes=4), PPOSolver(episodes=4, episodes_per_update=2)):
        solution = solver.solve(problem, seed=0, evaluator=evaluator)
        assert solution.allocation.formats[pinned] == "w8" and solution.avg_bits <= 4.2
        for group in table.fused:
            assert len({solution.allocation.formats[name] for name in group}) == 1
