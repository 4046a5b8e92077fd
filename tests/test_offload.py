"""Streaming execution (execution/offload.py): a model whose weights exceed ``--device-memory`` is quantized,
profiled and evaluated with its decoder blocks on disk, and every output equals the in-memory run's."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from automp import checkpoint
from automp.errors import AutompError
from automp.execution.offload import is_streamed, plan_offload, stream_blocks
from automp.execution.plan import memory_plan
from automp.export.run_dir import RunDir
from automp.model import decoder_blocks, inventory
from automp.pipeline import evaluate, profile, quantize
from automp.sensitivity.prepass import TENSORS, collect_prepass
from automp.settings import EvalSettings, ProfileSettings, QuantizeSettings

CONFIG = dict(  # the blocks' weights dominate: sixteen of them, a small vocabulary
    vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=16, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
WORK = dict(nsamples=8, seqlen=32, batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer, corpus):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("streamed") / "model"
    AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path.parent / "calib.txt").write_text(corpus[0][:20_000])
    (path.parent / "eval.txt").write_text(corpus[1][:8_000])
    return path


@pytest.fixture(scope="module")
def budget(model_dir) -> int:
    """Device memory under the model's weights, but enough for the streaming plan of every stage the tests run."""
    stages = ("load", "profile", "gptq", "perplexity", "export")
    plan = memory_plan(str(model_dir), formats="w3g32,w4g128", stages=",".join(stages), **WORK)
    total = {
        mode: max(f.device_bytes + f.cpu_bytes for s, f in plan.modes[mode].items() if s in stages)
        for mode in plan.modes
    }
    assert total["streaming"] < total["in-memory"]
    weights = sum(t.numel() * t.element_size() for t in load_file(model_dir / "model.safetensors").values())
    budget = int(total["streaming"] * 1.1)
    assert budget < weights < total["in-memory"]  # the weights alone do not fit
    return budget


def _settings(cls, model_dir, tmp_path, name, offload, budget, **extra):
    memory = {"device_memory": str(budget)} if offload == "auto" else {"offload": offload}
    return cls(model=str(model_dir), device="cpu", seqlen=32, batch_size=4, **memory, **extra,
               **({"out": tmp_path / f"{name}-{offload}"} if cls is not EvalSettings else {}))  # fmt: skip


def test_plan_chooses_disk_under_a_small_budget(model_dir, budget):
    stages = ("load", "gptq", "export")
    assert plan_offload(str(model_dir), "auto", stages, formats="w3g32", device_memory=str(budget), **WORK) == "disk"
    assert plan_offload(str(model_dir), "auto", stages, formats="w3g32", **WORK) == "none"
    with pytest.raises(AutompError, match="load needs .* MiB of memory in in-memory mode"):
        plan_offload(str(model_dir), "none", stages, formats="w3g32", device_memory=str(budget), **WORK)
    with pytest.raises(AutompError, match="no execution mode fits"):
        plan_offload(str(model_dir), "auto", stages, formats="w3g32", device_memory="100KB", **WORK)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_streamed_quantize_equals_in_memory(model_dir, budget, tmp_path, method, monkeypatch):
    """Streamed, the codes wait on disk and the checkpoint holds them in shards; they equal the in-memory run's."""
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 100_000)  # a few shards from this small model
    calib, held_out = str(model_dir.parent / "calib.txt"), str(model_dir.parent / "eval.txt")
    runs = {}
    for offload in ("none", "auto"):
        settings = _settings(QuantizeSettings, model_dir, tmp_path, method, offload, budget, scheme="w3g32",
                             method=method, calib=calib, nsamples=8, eval=held_out)  # fmt: skip
        runs[offload] = quantize(settings, progress=False)
    assert runs["auto"]["streamed"] and not runs["none"]["streamed"]
    assert runs["auto"]["ppl"] == runs["none"]["ppl"] and runs["auto"]["bytes"] == runs["none"]["bytes"]
    out = {offload: tmp_path / f"{method}-{offload}" for offload in runs}
    index = json.loads((out["auto"] / checkpoint.QUANT_INDEX).read_text())["weight_map"]
    assert len(set(index.values())) > 2 and not (out["auto"] / checkpoint.QUANT_TENSORS).exists()
    assert not (tmp_path / f".{method}-auto.codes").exists()  # the spilled codes are gone once saved
    assert checkpoint.quantized_bytes(out["auto"]) == checkpoint.quantized_bytes(out["none"])
    stored = {offload: RunDir.open(path).quantized_weights() for offload, path in out.items()}
    assert stored["auto"].keys() == stored["none"].keys() == index.keys()
    for name, qweight in stored["none"].items():
        ours = stored["auto"][name].state_dict()
        assert all(torch.equal(ours[key], tensor) for key, tensor in qweight.state_dict().items())
    dense = {offload: load_file(path / checkpoint.DENSE_TENSORS) for offload, path in out.items()}
    assert dense["auto"].keys() == dense["none"].keys()
    assert all(torch.equal(dense["auto"][key], dense["none"][key]) for key in dense["none"])


def test_streamed_profile_and_eval_equal_in_memory(model_dir, budget, tmp_path):
    tables, ppls = {}, {}
    for offload in ("none", "auto"):
        settings = _settings(ProfileSettings, model_dir, tmp_path, "profile", offload, budget, formats="w3g32,fp16",
                             calib=str(model_dir.parent / "calib.txt"), nsamples=8, kl=True, kl_windows=1)  # fmt: skip
        metrics = profile(settings, progress=False)
        assert metrics["streamed"] == (offload == "auto")
        tables[offload] = json.loads((tmp_path / f"profile-{offload}" / "sensitivity.json").read_text())
        evaluated = evaluate(_settings(EvalSettings, model_dir, tmp_path, "eval", offload, budget,
                                       ppl=str(model_dir.parent / "eval.txt")), progress=False)  # fmt: skip
        assert evaluated["streamed"] == (offload == "auto")
        ppls[offload] = evaluated["ppl"]
    assert tables["auto"]["costs"] == tables["none"]["costs"]  # every proxy, KL included, to the last bit
    assert ppls["auto"] == ppls["none"]


@pytest.mark.parametrize("config", [LlamaConfig(**CONFIG), OPTConfig(
    vocab_size=384, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, word_embed_proj_dim=64)], ids=["llama", "opt-tied-head"])  # fmt: skip
def test_streamed_prepass_gradients_equal_full_backward(config, tmp_path):
    """The block-by-block backward gives the full backward's gradients, a tied head's embedding part included."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    inv = inventory(model, include_lm_head=True)
    calib = torch.randint(0, 384, (3, 16))
    full = collect_prepass(model, inv, calib, tmp_path / "full", progress=False)
    streamed_model = stream_blocks(model, "disk", torch.device("cpu"), tmp_path / "offload")
    assert is_streamed(streamed_model)
    streamed = collect_prepass(streamed_model, inv, calib, tmp_path / "streamed", progress=False)
    assert len(set(streamed.index.values())) == len(decoder_blocks(model)) + 1  # a file per block, one for the head
    for layer in inv.layers:
        ours, reference = streamed.layer(layer.name), full.layer(layer.name)
        for kind in TENSORS:
            assert torch.equal(getattr(ours, kind), getattr(reference, kind)), (layer.name, kind)
        assert ours.activations == reference.activations


def test_streamed_block_repair_equals_in_memory(model_dir, tmp_path):
    """``quantize --repair block-ap`` streamed: each block trains as an onloaded copy, the reference streams from its
    own offload, and the repaired codes equal the in-memory run's."""
    runs = {}
    for offload in ("none", "disk"):
        settings = _settings(QuantizeSettings, model_dir, tmp_path, "repair", offload, 0, scheme="w2g32",
                             method="gptq", calib=str(model_dir.parent / "calib.txt"), nsamples=8, repair="block-ap",
                             repair_epochs=8)  # fmt: skip
        runs[offload] = quantize(settings, progress=False)
    assert runs["disk"]["streamed"] and not runs["none"]["streamed"]
    repaired = {offload: {k: v for k, v in run["repair"].items() if k != "seconds"} for offload, run in runs.items()}
    assert repaired["disk"] == repaired["none"]  # the same block losses and steps
    assert repaired["disk"]["block_loss_end"] < repaired["disk"]["block_loss_start"]
    stored = {offload: RunDir.open(tmp_path / f"repair-{offload}").quantized_weights() for offload in runs}
    for name, qweight in stored["none"].items():
        ours = stored["disk"][name].state_dict()
        assert all(torch.equal(ours[key], tensor) for key, tensor in qweight.state_dict().items())


def test_streaming_refusals(model_dir, tmp_path):
    calib = str(model_dir.parent / "calib.txt")
    with pytest.raises(AutompError, match="--repair e2e-qp runs in memory only, but you asked for --offload disk"):
        quantize(_settings(QuantizeSettings, model_dir, tmp_path, "r", "disk", 0, scheme="w3g32", method="gptq",
                           calib=calib, nsamples=4, repair="block-ap,e2e-qp"), progress=False)  # fmt: skip
    assert not (tmp_path / "r-disk").exists()
    with pytest.raises(AutompError, match="streamed profile"):
        profile(_settings(ProfileSettings, model_dir, tmp_path, "p", "disk", 0, formats="w3g32", embeddings=True,
                          calib=calib, nsamples=4), progress=False)  # fmt: skip


def test_cli_streams_tasks_and_perplexity(model_dir, tmp_path):
    """``automp eval --offload disk`` through the CLI: the same task scores and perplexity as in memory."""
    from typer.testing import CliRunner

    from automp.cli import app

    rows = [{"query": "The function returns", "choices": ["a list.", "None.", "the module"], "gold": 0},
            {"query": "Open the file and", "choices": ["read it", "close the socket", "x"], "gold": 2}]  # fmt: skip
    (tmp_path / "copa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = {}
    for offload in ("none", "disk"):
        result = CliRunner().invoke(app, [
            "eval", "--model", str(model_dir), "--tasks", "copa", "--tasks-dir", str(tmp_path), "--seqlen", "32",
            "--ppl", str(model_dir.parent / "eval.txt"), "--device", "cpu", "--offload", offload, "--json",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        results[offload] = json.loads(result.output.strip().splitlines()[-1])
    assert results["disk"]["streamed"] and not results["none"]["streamed"]
    assert results["disk"]["ppl"] == results["none"]["ppl"]
    assert results["disk"]["tasks"] == results["none"]["tasks"]
