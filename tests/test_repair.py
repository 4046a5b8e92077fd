"""Training repair: each method lowers its block's error below the GPTQ start, ends in the same formats
and bytes, resumes to identical weights, and the CLI refuses bad input with one clear error."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from automp import Allocation, quantize_
from automp.cli import app
from automp.data import load_windows
from automp.errors import AutompError
from automp.evaluate import kl_to_reference
from automp.formats import get_format
from automp.model import inventory, load_model
from automp.quantizers.qweight import QuantizedWeight
from automp.repair import E2EConfig, ReconstructConfig, RepairConfig, parse_methods, repair_
from automp.repair.e2e import e2e_scales_
from automp.repair.reconstruct import reconstruct_
from automp.repair.schedules import BlockBudget, block_budget, equal_total
from automp.repair.selfgen import cached_windows, generate_windows
from automp.repair.trainable import TrainableWeight

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def gptq_w2(trained_dir):
    """The trained tiny Llama, its full-precision copy, GPTQ w2g64 weights and 16 calibration windows."""
    model, tokenizer = load_model(str(trained_dir), device="cpu", dtype="float32")
    calib = load_windows(str(trained_dir.parent / "calib.txt"), tokenizer, 64, 16, 0)
    reference = copy.deepcopy(model).eval()
    qweights = quantize_(model, Allocation.uniform(inventory(model), "w2g64"), "gptq", calib, progress=False)
    return model, reference, qweights, calib


def _fresh(gptq_w2):
    model, reference, qweights, calib = gptq_w2
    return copy.deepcopy(model), reference, dict(qweights), calib


@pytest.mark.parametrize("method", ["block-ap", "sign-round"])
def test_block_method_lowers_every_block_error_below_gptq(gptq_w2, method):
    model, reference, qweights, calib = _fresh(gptq_w2)
    config = ReconstructConfig(method=method, epochs=40, iters=120, batch_size=2)
    budgets = [BlockBudget(40, patience=50)] * 2
    records = reconstruct_(model, reference, qweights, calib, config, budgets, progress=False)
    for record in records:
        assert record.loss_end <= record.loss_start
    assert sum(r.loss_end for r in records) < 0.95 * sum(r.loss_start for r in records)
    for name, q in qweights.items():  # exactly the allocated format again: codes, fp16 scales, same bytes
        fmt = get_format("w2g64")
        assert isinstance(q, QuantizedWeight) and q.fmt == fmt
        assert int(q.codes.max()) <= 3 and q.scale.dtype == torch.float16
        assert q.stored_bytes() * 8 == fmt.storage_bits(*q.shape)
        assert torch.equal(model.get_submodule(name).weight, q.dequantize())


def test_trainable_weight_starts_exactly_at_the_stored_weight():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    for name in ("w2g32", "w3g32a", "nf4g32", "w4g64+r2"):
        from automp.quantizers.rtn import rtn_quantize

        stored = rtn_quantize(weight, get_format(name))
        trainable = TrainableWeight(stored, "block-ap")  # no FP weight: the latent starts on the stored codes
        assert torch.equal(trainable.freeze().dequantize(), stored.dequantize())
        assert torch.allclose(trainable(), stored.dequantize(), atol=1e-6)
    with pytest.raises(AutompError, match="integer grid"):
        TrainableWeight(rtn_quantize(weight, get_format("nf4g32")), "sign-round", weight)


def test_interrupted_repair_resumes_to_identical_weights(gptq_w2, tmp_path):
    config = RepairConfig(("block-ap",), patience=50, reconstruct=ReconstructConfig(epochs=40, batch_size=2))
    model, reference, whole, calib = _fresh(gptq_w2)
    repair_(model, whole, reference, calib, config, state_dir=tmp_path / "whole", progress=False)

    model, reference, first, calib = _fresh(gptq_w2)
    repair_(model, first, reference, calib, config, state_dir=tmp_path / "cut", progress=False)
    for leftover in (tmp_path / "cut").glob("block_001.*"):  # as if killed after block 0
        leftover.unlink()
    model, reference, resumed, calib = _fresh(gptq_w2)
    repair_(model, resumed, reference, calib, config, state_dir=tmp_path / "cut", progress=False)
    for name in whole:
        assert torch.equal(whole[name].dequantize(), resumed[name].dequantize()), name
    assert any(not torch.equal(whole[n].dequantize(), q.dequantize()) for n, q in gptq_w2[2].items())  # it trained


def test_e2e_qp_tunes_scales_only_and_lowers_held_out_kl(gptq_w2):
    model, reference, qweights, calib = _fresh(gptq_w2)
    before = {name: q.codes.clone() for name, q in qweights.items()}
    record = e2e_scales_(model, qweights, calib, E2EConfig(epochs=4, batch_size=2), reference, False)
    assert record.loss_end < record.loss_start and not record.kept_start
    for name, q in qweights.items():
        assert torch.equal(q.codes, before[name])  # codes frozen
        assert torch.equal(model.get_submodule(name).weight, q.dequantize())
    assert any(not torch.equal(q.scale, gptq_w2[2][n].scale) for n, q in qweights.items())


def test_schedules_follow_their_formulas():
    base = BlockBudget(2.0, 1.0, 2)
    assert block_budget("uniform", base, 1.0, 8) == base
    sgra = block_budget("sgra", base, 0.25, 3)
    assert sgra.epochs == pytest.approx(2 * 1.5) and sgra.lr_scale == pytest.approx(1 / 1.125)
    assert sgra.patience == round(2 + 0.75)
    joint = block_budget("joint", base, 0.25, 8)  # 8 bits: one more (bits - 2)/6 = 1, patience + 2
    assert joint.epochs == pytest.approx(3 * 1.3) and joint.lr_scale == pytest.approx(1.2 / 1.125)
    assert joint.patience == sgra.patience + 2
    budgets = equal_total([sgra, joint, base], 6.0)
    assert sum(b.epochs for b in budgets) == pytest.approx(6.0)
    with pytest.raises(AutompError, match="unknown schedule"):
        block_budget("fast", base)


def test_sgra_needs_a_profile_and_methods_are_checked(gptq_w2):
    model, reference, qweights, calib = _fresh(gptq_w2)
    with pytest.raises(AutompError, match="needs the sensitivity profile"):
        repair_(model, qweights, reference, calib, RepairConfig(("block-ap",), "sgra"), progress=False)
    assert parse_methods("e2e-qp, block-ap") == ("block-ap", "e2e-qp")
    for bad in ("block-ap,sign-round", "sharpen", "", "block-ap,block-ap"):
        with pytest.raises(AutompError):
            parse_methods(bad)


def test_self_generated_windows_are_seeded_greedy_then_sampled(gptq_w2, tmp_path):
    _, reference, _, _ = gptq_w2
    a = generate_windows(reference, 3, 12, greedy=4, seed=1, progress=False)
    assert a.shape == (3, 12) and torch.equal(a, generate_windows(reference, 3, 12, greedy=4, seed=1, progress=False))
    with torch.no_grad():
        logits = reference(input_ids=a[:, :4]).logits
    assert torch.equal(a[:, 1:5], logits.argmax(-1))  # the first tokens after the random start are greedy
    cached = cached_windows(reference, tmp_path, 3, 12, seed=1, greedy=4, progress=False)
    assert torch.equal(cached, a) and len(list(tmp_path.glob("selfgen-*.safetensors"))) == 1


def test_cli_repair_saves_a_checkpoint_that_exports_and_loads(trained_dir, tmp_path):
    calib, text = str(trained_dir.parent / "calib.txt"), str(trained_dir.parent / "eval.txt")
    common = ["--calib", calib, "--nsamples", "16", "--seqlen", "64", "--json"]
    args = ["quantize", "--model", str(trained_dir), "--scheme", "w2g64", "--method", "gptq", "--out"]
    assert runner.invoke(app, [*args, str(tmp_path / "q"), *common, "--eval", text]).exit_code == 0
    result = runner.invoke(
        app, ["repair", "--run", str(tmp_path / "q"), "--method", "sign-round", "--out", str(tmp_path / "r"),
              "--repair-iters", "120", "--eval", text, "--json", "--batch-size", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    repaired = json.loads(result.output.strip().splitlines()[-1])
    quantized = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert repaired["bytes"] == quantized["bytes"] and repaired["avg_bits"] == quantized["avg_bits"]
    assert repaired["repair"]["block_loss_end"] < repaired["repair"]["block_loss_start"]
    assert (tmp_path / "r" / "repair.json").is_file() and not (tmp_path / ".r.repair").exists()
    evaluated = runner.invoke(app, ["eval", "--model", str(tmp_path / "r"), "--ppl", text, "--seqlen", "64", "--json"])
    assert json.loads(evaluated.output.strip().splitlines()[-1])["ppl"] == pytest.approx(repaired["ppl"], rel=1e-6)
    exported = runner.invoke(
        app, ["export", "--run", str(tmp_path / "r"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]
    )
    assert exported.exit_code == 0, exported.output
    from automp.checkpoint import load_quantized

    ours = load_quantized(tmp_path / "r", torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-4)


def test_cli_bad_repair_input_is_one_clear_error_and_no_output(trained_dir, tmp_path):
    calib = str(trained_dir.parent / "calib.txt")
    cases = [
        (["--run", str(tmp_path)], "not an automp output directory"),
        (["--run", str(tmp_path), "--method", "polish"], "unknown repair method"),
        (["--run", str(tmp_path), "--repair-epochs", "0"], "must be positive"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["repair", *extra, "--out", str(tmp_path / "r"), "--calib", calib])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "r").exists()
    args = ["quantize", "--model", str(trained_dir), "--scheme", "w2g64", "--out", str(tmp_path / "q")]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(
        app,
        ["repair", "--run", str(tmp_path / "q"), "--schedule", "sgra", "--out", str(tmp_path / "r"), "--calib", calib],
    )
    assert result.exit_code == 2 and "needs the sensitivity profile" in result.output
    assert not (tmp_path / "r").exists()
    result = runner.invoke(
        app, ["repair", "--run", str(tmp_path / "q"), "--method", "seq-finetune", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "trains while the model is quantized" in result.output
    assert not (tmp_path / "r").exists()


def test_quantize_repair_option_keeps_the_bytes_and_lowers_block_error(trained_dir, tmp_path):
    calib = str(trained_dir.parent / "calib.txt")
    common = ["--model", str(trained_dir), "--scheme", "w2g64", "--calib", calib, "--nsamples", "16", "--seqlen", "64"]
    plain = runner.invoke(app, ["quantize", *common, "--out", str(tmp_path / "q"), "--json"])
    repaired = runner.invoke(
        app, ["quantize", *common, "--out", str(tmp_path / "r"), "--repair", "sign-round", "--repair-iters", "120",
              "--batch-size", "2", "--json"],
    )  # fmt: skip
    assert repaired.exit_code == 0, repaired.output
    plain, repaired = (json.loads(r.output.strip().splitlines()[-1]) for r in (plain, repaired))
    assert repaired["bytes"] == plain["bytes"]
    assert repaired["repair"]["block_loss_end"] < repaired["repair"]["block_loss_start"]
    assert (tmp_path / "r" / "repair.json").is_file() and not (tmp_path / ".r.repair").exists()


def test_seq_finetune_trains_downstream_blocks_while_quantizing(gptq_w2):
    from automp.repair.seq_finetune import SeqFinetuneConfig, SeqFinetuneRecord, downstream_tuner

    _, reference, gptq, calib = gptq_w2
    model = copy.deepcopy(reference)
    record = SeqFinetuneRecord()
    tuner = downstream_tuner(model, reference, calib, SeqFinetuneConfig(steps=6, batch_size=2), record)
    tuned = quantize_(model, Allocation.uniform(inventory(model), "w2g64"), "gptq", calib, progress=False,
                      after_block=tuner)  # fmt: skip
    assert [b["block"] for b in record.blocks] == [0]  # the last block has nothing downstream
    kl = [sum(kl_to_reference(m, reference, calib)) for m in (gptq_w2[0], model)]
    assert kl[1] < 0.97 * kl[0]  # closer to the full-precision model than plain GPTQ
    first = "model.layers.0.self_attn.q_proj"  # quantized before any training: the same as plain GPTQ
    assert torch.equal(tuned[first].dequantize(), gptq[first].dequantize())
    later = "model.layers.1.mlp.down_proj"  # trained, then quantized: other codes, the same format and bytes
    assert not torch.equal(tuned[later].dequantize(), gptq[later].dequantize())
    assert tuned[later].stored_bytes() == gptq[later].stored_bytes()
    with pytest.raises(AutompError, match="block-by-block"):
        quantize_(model, Allocation.uniform(inventory(model), "w2g64"), "rtn", after_block=tuner)


def test_finetuned_evaluator_measures_seq_finetune_and_runs_inside_ppo(gptq_w2, tmp_path):
    """The PPO prototype's step in the evaluator: each evaluation equals quantize_ with the downstream tuner,
    measured; the model is back at full precision after it; PPO runs on it and reports the cost."""
    from automp.evaluate import perplexity
    from automp.formats import parse_formats
    from automp.repair.seq_finetune import FinetunedEvaluator, SeqFinetuneConfig, SeqFinetuneRecord, downstream_tuner
    from automp.search.ppo import PPOSolver
    from automp.search.problem import Problem
    from automp.sensitivity.profile import profile_model
    from automp.sensitivity.table import CalibInfo

    _, reference, _, calib = gptq_w2
    model = copy.deepcopy(reference)
    windows = calib[-2:]
    evaluator = FinetunedEvaluator(model, windows, ["w2g64", "w4g128"], calib=calib[:8], batch_size=2,
                                   config=SeqFinetuneConfig(steps=2, batch_size=2))  # fmt: skip
    allocation = Allocation.uniform(inventory(model), "w2g64")
    measured = evaluator(allocation)
    by_hand = copy.deepcopy(reference)
    tuner = downstream_tuner(
        by_hand, reference, calib[:8], SeqFinetuneConfig(steps=2, batch_size=2), SeqFinetuneRecord()
    )
    quantize_(by_hand, allocation, "gptq", calib[:8], progress=False, after_block=tuner)
    assert measured == pytest.approx(perplexity(by_hand, windows, 2, progress=False).ppl, rel=1e-6)
    evaluator.restore()
    full = reference.state_dict()
    assert all(torch.equal(value, full[key]) for key, value in model.state_dict().items())
    assert evaluator(allocation) == measured and evaluator.seconds > 0  # deterministic, and timed

    info = CalibInfo(spec="calib", nsamples=8, seqlen=64, seed=0)
    table = profile_model(reference, parse_formats("w2g64,w4g128"), calib[:8], model_name="tiny", calib_info=info,
                          progress=False)  # fmt: skip
    problem = Problem(table, target_bits=3.0)
    solution = PPOSolver(episodes=4, formats=["w2g64", "w4g128"]).solve(problem, seed=0, evaluator=evaluator)
    assert solution.allocation.avg_bits(inventory(model)) <= 3.0 + 1e-9
    assert evaluator.evaluations >= 4
