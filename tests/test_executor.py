"""Executors (`automp.execution.executor`): the serial one, the Ray actor pool against it, and bad values.

The Ray tests start one local Ray session (``ray.init(num_cpus=2)``: two CPU workers of one torch
thread, like this process) and check that profile, search and verified delivery give the serial
run's numbers exactly. They are skipped when Ray is not installed (the ``dev`` extra installs it).
"""

import hashlib
import json
import operator
import sys
from functools import partial

import pytest
from typer.testing import CliRunner

from automp.allocation import Allocation
from automp.cli import app
from automp.data import load_windows
from automp.errors import AutompError
from automp.execution.executor import SerialExecutor, get_executor
from automp.model import load_model
from automp.search.anneal import Anneal
from automp.search.knapsack import Knapsack
from automp.search.problem import Problem
from automp.search.verify import candidates, proxy_scores, refine, verify
from automp.sensitivity.table import SensitivityTable
from test_solvers import make_table

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, (json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else None)


# ------------------------------------------------------------------------------ serial


def test_serial_executor_builds_the_state_once_and_keeps_the_order():
    built = []

    def build():
        built.append(1)
        return 10

    with SerialExecutor() as executor, executor.pool(build) as pool:
        assert pool.workers == 1 and not executor.remote
        assert pool.map(operator.mul, [3, 1, 2]) == [30, 10, 20]
        lazy = pool.imap(operator.sub, [5, 7])
        assert next(lazy) == 5 and list(lazy) == [3]
    assert built == [1] and pool.state is None  # closing the pool drops its state


class _Hashed:
    """A deterministic fake real loss: fewer bits cost more, plus a hash of the allocation (no ties)."""

    def __init__(self, workers: int = 1):
        self.evaluations, self.workers = 0, workers

    def __call__(self, allocation: Allocation) -> float:
        self.evaluations += 1
        digest = hashlib.sha256(repr(sorted(allocation.formats.items())).encode()).digest()
        bits = sum(int(name[1:].split("g")[0]) if name != "fp16" else 16 for name in allocation.formats.values())
        return 10.0 - 0.05 * bits + int.from_bytes(digest[:4], "little") / 2**32 * 0.3


class _Batched(_Hashed):
    def map(self, allocations: list[Allocation]) -> list[float]:
        return [self(allocation) for allocation in allocations]


@pytest.mark.parametrize("width", [2, 3, 7])
def test_speculative_batches_follow_the_serial_path(width):
    """Anneal and refine with a parallel evaluator take the serial path exactly: every proposal, decision and
    curve row is the serial run's, though the batches evaluate more than they keep."""
    problem = Problem(make_table(), target_bits=4.0)
    for seed in range(3):
        serial = Anneal(max_evals=40, t_start=0.05, t_end=0.001).solve(problem, seed=seed, evaluator=_Hashed())
        batched = _Batched(width)
        parallel = Anneal(max_evals=40, t_start=0.05, t_end=0.001).solve(problem, seed=seed, evaluator=batched)
        assert parallel.choice == serial.choice and parallel.curve == serial.curve
        assert 0 < sum(row["accepted"] for row in serial.curve[1:]) < 39  # both branches are exercised
        assert batched.evaluations >= len(serial.curve)
    start = Knapsack().solve(problem)
    for budget in (1, 6, 40):
        serial = refine(start, problem, _Hashed(), budget)
        parallel = refine(start, problem, _Batched(width), budget)
        assert (parallel.choice, parallel.curve, parallel.evaluations) == (serial.choice, serial.curve, budget)
    pool = candidates(problem, start, 5)
    assert verify(pool, _Batched(width), proxy_scores(pool, problem.table)) == verify(
        pool, _Hashed(), proxy_scores(pool, problem.table)
    )


# ------------------------------------------------------------------------------ bad values


def test_bad_executor_values_are_one_clear_error(monkeypatch, tiny_dirs, tmp_path):
    with pytest.raises(AutompError, match="unknown executor 'dask': use one of serial, ray"):
        get_executor("dask")
    with pytest.raises(AutompError, match="--ray-address is for --executor ray"):
        get_executor("serial", "ray://head:10001")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.delitem(sys.modules, "automp.execution.ray_executor", raising=False)
    with pytest.raises(AutompError, match=r"--executor ray needs Ray: pip install 'automp\[ray\]'"):
        get_executor("ray")
    model = tiny_dirs["llama"]
    for flags, message in [
        (["--executor", "dask"], "executor: Input should be 'serial' or 'ray'"),
        (["--ray-address", "auto"], "--ray-address is for --executor ray"),
        (["--executor", "ray"], "pip install 'automp[ray]'"),
    ]:
        result = runner.invoke(app, ["profile", "--model", str(model), "--out", str(tmp_path / "p"), *flags])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["report", str(tmp_path), "--executor", "dask"])
    assert result.exit_code == 2 and "unknown executor 'dask'" in result.output


# ------------------------------------------------------------------------------ Ray against serial


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def texts(tmp_path_factory, corpus):
    data = tmp_path_factory.mktemp("texts")
    (data / "calib.txt").write_text(corpus[0][:100_000])
    (data / "eval.txt").write_text(corpus[1][:30_000])
    return data


def test_ray_pool_keeps_the_order_and_raises_automp_errors_as_themselves(ray_session):
    with get_executor("ray") as executor, executor.pool(partial(int, "7")) as pool:
        assert executor.remote and pool.workers == 2  # two CPUs, one torch thread each
        assert pool.map(operator.mul, range(10)) == [7 * i for i in range(10)]
        with pytest.raises(AutompError, match="unknown executor 7"):
            pool.map(get_executor, [None])  # get_executor(7, None), raised on a worker


@pytest.fixture(scope="module")
def runs(ray_session, tiny_dirs, texts, tmp_path_factory):
    """`automp run` (profile, search, verified delivery, GPTQ, eval) serially and on Ray, same settings."""
    out = {}
    for executor in ("serial", "ray"):
        path = tmp_path_factory.mktemp(executor) / "run"
        result, metrics = _run(
            "run", "--model", tiny_dirs["llama"], "--target-bits", "5", "--formats", "w2g64,w4g64,w8",
            "--calib", texts / "calib.txt", "--nsamples", "4", "--seqlen", "32", "--verify-windows", "4",
            "--eval", texts / "eval.txt", "--executor", executor, "--out", path, "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        out[executor] = path, metrics
    return out


def test_ray_run_gives_the_serial_table_allocation_and_verification(runs):
    (serial, metrics), (ray, ray_metrics) = runs["serial"], runs["ray"]
    table = SensitivityTable.load(serial / "sensitivity.json")
    assert SensitivityTable.load(ray / "sensitivity.json") == table  # every proxy of every layer x format, exactly
    assert len(table.layers) == 14
    for name in ("allocation.json", "verification.json"):
        ours, theirs = json.loads((serial / name).read_text()), json.loads((ray / name).read_text())
        for key in ("seconds", "profile"):  # wall time; the table's own path
            ours.pop(key, None), theirs.pop(key, None)
        assert theirs == ours, name
    assert ray_metrics["ppl"] == metrics["ppl"] and ray_metrics["verification"]["candidates"]


def test_ray_search_measures_the_serial_values(runs, texts):
    """anneal, then --verify K and --refine, all on the evaluator pool: the serial run's allocation and losses."""
    serial, _ = runs["serial"]
    found = {}
    for executor in ("serial", "ray"):
        result, found[executor] = _run(
            "search", "--profile", serial, "--target-bits", "4.5", "--solver", "anneal", "--max-evals", "8",
            "--verify", "3", "--refine", "--eval", texts / "eval.txt", "--eval-windows", "2", "--seqlen", "32",
            "--executor", executor, "--out", serial.parent / f"{executor}.json", "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    ours, theirs = found["serial"], found["ray"]
    for key in ("avg_bits", "predicted_loss", "real_loss", "verify", "refine", "evaluator"):
        assert theirs[key] == ours[key], key
    assert theirs["total_evaluations"] >= ours["total_evaluations"]  # speculative evaluations included
    allocations = [json.loads((serial.parent / f"{e}.json").read_text())["formats"] for e in ("serial", "ray")]
    assert allocations[0] == allocations[1]
    curves = [json.loads((serial.parent / f"{e}.json.curve.json").read_text()) for e in ("serial", "ray")]
    assert curves[0] == curves[1] and len(curves[0]) == 8


def test_ray_delivery_refines_on_the_workers_as_serially(runs, tiny_dirs, texts, tmp_path):
    """A table that calls w2g64 free makes every mixed candidate lose to uniform, so verification refines on
    cached weights (on the workers' own evaluators under Ray) and measures the refined allocation for real."""
    from automp.delivery import deliver
    from automp.search.result import SearchResult
    from automp.settings import RunSettings

    serial, _ = runs["serial"]
    table = SensitivityTable.load(serial / "sensitivity.json")
    free = {field: 0.0 for field in ("weight_mse", "output_err", "grad_first_order", "fisher", "output_grad")}
    costs = {name: {**row, "w2g64": row["w2g64"].model_copy(update=free)} for name, row in table.costs.items()}
    problem = Problem(table.model_copy(update={"costs": costs}), target_bits=4.6)
    result = SearchResult.of(problem, Knapsack().solve(problem), profile="", seed=0)
    model, tokenizer = load_model(tiny_dirs["llama"])
    calib = load_windows(str(texts / "calib.txt"), tokenizer, 32, 4, 0)
    held_out = load_windows(str(texts / "eval.txt"), tokenizer, 32)[:4], "eval.txt"
    records = {}
    for executor in ("serial", "ray"):
        settings = RunSettings(
            model=str(tiny_dirs["llama"]), out=tmp_path / executor, calib="calib.txt", target_bits=4.6,
            method="rtn", max_evals=6, executor=executor,
        )  # fmt: skip
        _, record = deliver(settings, problem, result, model, calib, held_out, progress=False)
        records[executor] = record.model_dump(exclude={"seconds"})
    assert records["serial"]["refine"] is not None and records["serial"]["refine"]["evaluations"] == 6
    assert records["ray"] == records["serial"]


def test_ray_seeds_give_the_serial_perplexities(runs):
    from automp.report import seed_ppls

    serial, _ = runs["serial"]
    with get_executor("ray") as executor:
        assert seed_ppls(serial, 2, progress=False, executor=executor) == seed_ppls(serial, 2, progress=False)
