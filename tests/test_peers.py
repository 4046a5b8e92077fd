"""bench/peers.py end to end on the tiny trained Llama: rows at matched real bytes, paired deltas, the cache.

The harness runs as a subprocess, as a user runs it; peers that are not installed are skipped (the
AutoScheme test runs only where ``auto-round`` is installed)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automp.allocation import Allocation
from automp.checkpoint import model_bytes
from automp.model import inventory, load_model
from automp.quantize import quantize_

BENCH = Path(__file__).parents[1] / "bench" / "peers.py"
TARGET = 4.25


def _peers(trained_dir: Path, work: Path, methods: str) -> list[dict]:
    data = trained_dir.parent
    command = [
        sys.executable, BENCH, "--model", trained_dir, "--calib", data / "calib.txt", "--eval", data / "eval.txt",
        "--targets", str(TARGET), "--nsamples", "8", "--seqlen", "64", "--work", work, "--methods", methods, "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stored_bytes(trained_dir: Path, allocation: Allocation) -> int:
    """The bytes automp's checkpoint of this allocation holds (RTN: the byte count does not depend on the method)."""
    model, _ = load_model(trained_dir, device="cpu", dtype="float32")
    return model_bytes(model, quantize_(model, allocation, "rtn", progress=False))


def test_automp_and_uniform_at_matched_bytes(trained_dir, tmp_path):
    work = tmp_path / "work"
    began = time.perf_counter()
    rows = _peers(trained_dir, work, "automp,uniform")
    first = time.perf_counter() - began
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"automp", "uniform-w4g64"}  # w4g64 is exactly 4.25 bits: the widest candidate within

    inv = inventory(load_model(trained_dir, device="cpu", dtype="float32")[0])
    uniform = by_method["uniform-w4g64"]
    allocation = Allocation.uniform(inv, "w4g64")
    assert uniform["avg_bits"] == allocation.avg_bits(inv) <= TARGET
    assert uniform["bytes"] == _stored_bytes(trained_dir, allocation)

    ours = by_method["automp"]
    assert ours["delta_nll"] == 0 and ours["delta_se"] == 0  # the reference of its target
    assert ours["avg_bits"] <= TARGET + 1e-9
    metrics = json.loads((work / "runs" / "4.25" / "metrics.json").read_text())
    assert ours["bytes"] == metrics["bytes"]  # the run's own count of its checkpoint
    assert uniform["reference"] == "automp" and uniform["delta_se"] > 0
    assert math.isclose(uniform["delta_nll"], math.log(uniform["ppl"]) - math.log(ours["ppl"]), abs_tol=1e-9)
    for row in rows:
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1
        assert row["target_bits"] == TARGET and row["seconds"] > 0

    payload = json.loads((work / "peers.json").read_text())
    assert payload["skipped"] == {} and payload["rows"] == rows
    assert (work / "rows" / "4.25_automp.json").is_file() and (work / "rows" / "4.25_uniform.json").is_file()

    began = time.perf_counter()
    again = _peers(trained_dir, work, "automp,uniform")
    assert again == rows  # every row from the cache: the same numbers
    assert time.perf_counter() - began < first


def test_missing_peer_is_skipped_with_its_reason(trained_dir, tmp_path):
    if importlib.util.find_spec("modelopt") is not None:
        pytest.skip("nvidia-modelopt is installed here")
    rows = _peers(trained_dir, tmp_path / "work", "uniform,modelopt")
    assert [row["method"] for row in rows] == ["uniform-w4g64"]
    skipped = json.loads((tmp_path / "work" / "peers.json").read_text())["skipped"]
    assert list(skipped) == ["modelopt @ 4.25"] and skipped["modelopt @ 4.25"].startswith("not installed")


def test_autoscheme_rows(trained_dir, tmp_path):
    pytest.importorskip("auto_round")
    found = _peers(trained_dir, tmp_path / "work", "uniform,autoscheme-rtn,autoscheme+gptq")
    rows = {row["method"]: row for row in found}
    inv = inventory(load_model(trained_dir, device="cpu", dtype="float32")[0])
    rtn, ours = rows["autoscheme-rtn"], rows["autoscheme+gptq"]
    assert rtn["formats"] == ours["formats"] and rtn["bytes"] == ours["bytes"]  # one choice, two quantizers
    assert rtn["avg_bits"] <= TARGET + 1e-9 and rtn["autoscheme_bits"] >= rtn["avg_bits"]  # it counts zeros too
    payload = json.loads((tmp_path / "work" / "peers.json").read_text())
    allocation = Allocation(formats=payload["allocations"]["4.25/autoscheme-rtn"])
    assert rtn["avg_bits"] == allocation.avg_bits(inv)
    assert rtn["bytes"] == _stored_bytes(trained_dir, allocation)
    for row in rows.values():
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1 and row["reference"].startswith("uniform-")
