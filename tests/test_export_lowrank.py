"""Exports of a run with low-rank corrections (``+rN``): compressed-tensors plus a PEFT adapter loaded without
automp, the exports that refuse such a run, and vLLM's LoRA limits."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from automp import Allocation, AutompError
from automp.checkpoint import payload_bytes
from automp.cli import app
from automp.export import RunDir
from automp.export.peft_adapter import ADAPTER_DIR, ADAPTER_FILE, PEFT_PREFIX
from automp.export.vllm_support import VLLM_MAX_LORA_RANKS, lora_warnings, vllm_max_lora_rank
from automp.formats import get_format
from automp.pipeline import export
from automp.settings import ExportSettings
from conftest import save_tiny_run

CONFIG = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)  # fmt: skip
FORMATS = {  # corrected layers of three ranks beside plain, 16-bit and a corrected head
    "model.layers.0.self_attn.q_proj": "w4g32+r4", "model.layers.0.self_attn.k_proj": "w4g32+r4",
    "model.layers.0.self_attn.v_proj": "w4g32+r4", "model.layers.0.self_attn.o_proj": "w2g32+r8",
    "model.layers.0.mlp.gate_proj": "w4g32", "model.layers.0.mlp.up_proj": "w4g32",
    "model.layers.0.mlp.down_proj": "w2g32+r8",
    "model.layers.1.self_attn.q_proj": "w4g32", "model.layers.1.self_attn.k_proj": "w4g32",
    "model.layers.1.self_attn.v_proj": "w4g32", "model.layers.1.self_attn.o_proj": "fp16",
    "model.layers.1.mlp.gate_proj": "w2g32+r8", "model.layers.1.mlp.up_proj": "w2g32+r4",
    "model.layers.1.mlp.down_proj": "w4g64+r16",
    "lm_head": "w4g32+r4",
}  # fmt: skip
RANKS = {name: get_format(fmt).rank for name, fmt in FORMATS.items() if get_format(fmt).rank}
IDS = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(1))


def _save_run(path, tokenizer, formats: dict[str, str], method: str = "gptq"):
    """A random tiny Llama quantized under ``formats`` and saved as an automp run; returns the model."""
    return save_tiny_run(path, tokenizer, CONFIG, formats, method, CALIB if method == "gptq" else None)[0]


@pytest.fixture(scope="module")
def corrected(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("lowrank")
    model = _save_run(root / "run", tokenizer, FORMATS)
    with torch.no_grad():
        logits = model(IDS).logits
    report = export(ExportSettings(run=root / "run", format="compressed-tensors", out=root / "ct"))
    return root, logits, report


def test_peft_adapter_on_the_base_computes_automps_model(corrected):
    root, logits, _ = corrected
    base = AutoModelForCausalLM.from_pretrained(root / "ct", dtype=torch.float32).eval()
    with torch.no_grad():
        base_only = base(IDS).logits
    assert (base_only - logits).abs().max().item() > 0.05  # the corrections matter: ignoring them is caught
    model = PeftModel.from_pretrained(base, root / "ct" / ADAPTER_DIR).eval()
    with torch.no_grad():
        got = model(IDS).logits
    assert (got - logits).abs().max().item() <= 1e-3


def test_adapter_holds_the_factors_at_their_exact_bytes(corrected):
    root, _, report = corrected
    shapes = RunDir.open(root / "run").inventory.by_name()
    expected = sum(get_format(FORMATS[name]).correction_bits(shapes[name].out_features, shapes[name].in_features)
                   for name in RANKS) // 8  # fmt: skip
    adapter = root / "ct" / ADAPTER_DIR / ADAPTER_FILE
    assert payload_bytes(adapter) == expected == report["adapter_bytes"] == report["adapter"]["bytes"]
    assert report["payload_bytes"] == payload_bytes(root / "ct" / "model.safetensors") + expected
    with safe_open(adapter, "pt") as handle:
        keys = set(handle.keys())
        for name, rank in RANKS.items():
            a = handle.get_tensor(f"{PEFT_PREFIX}{name}.lora_A.weight")
            b = handle.get_tensor(f"{PEFT_PREFIX}{name}.lora_B.weight")
            assert a.shape == (rank, shapes[name].in_features) and b.shape == (shapes[name].out_features, rank)
            assert a.dtype == b.dtype == torch.float16
    assert len(keys) == 2 * len(RANKS)
    # the base holds every quantized layer in its base format; the bytes compared include the corrections
    config = json.loads((root / "ct" / "config.json").read_text())["quantization_config"]
    targets = {name: group["weights"] for group in config["config_groups"].values() for name in group["targets"]}
    assert set(targets) == {name for name, fmt in FORMATS.items() if fmt != "fp16"}
    down = targets["model.layers.1.mlp.down_proj"]  # w4g64+r16
    assert (down["num_bits"], down["group_size"]) == (4, 64)
    assert report["quantized_bytes_on_disk"] - report["quantized_bytes_automp"] == 16 * len(targets)  # weight_shape
    assert report["layers_by_format"]["w2g32+r8"] == 3


def test_adapter_config_gives_each_module_its_rank(corrected):
    root, _, report = corrected
    config = json.loads((root / "ct" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["rank_pattern"] == config["alpha_pattern"] == RANKS
    assert config["r"] == config["lora_alpha"] == 16 and sorted(config["target_modules"]) == sorted(RANKS)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["lora_dropout"] == 0.0
    assert report["adapter"]["max_rank"] == 16 and report["adapter"]["vllm_max_lora_rank"] == 16
    assert report["adapter"]["modules_by_rank"] == {4: 5, 8: 3, 16: 1}
    assert any("lm_head" in warning and "LoRA" in warning for warning in report["warnings"])  # lora_warnings


@pytest.mark.parametrize("fmt", ["gptq", "gguf-map", "gptq-dynamic"])
def test_exports_without_an_adapter_refuse_corrections(corrected, tmp_path, fmt):
    root = corrected[0]
    with pytest.raises(AutompError, match=r"\+rN.*compressed-tensors") as err:
        export(ExportSettings(run=root / "run", format=fmt, out=tmp_path / "out"))
    assert "model.layers.0.mlp.down_proj (w2g32+r8)" in str(err.value) and f"--format {fmt} " in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_gguf_refuses_corrections_with_one_error(tmp_path, tokenizer):
    formats = dict.fromkeys(FORMATS, "q8_0") | {"model.layers.0.mlp.up_proj": "q4_0+r4"}
    _save_run(tmp_path / "run", tokenizer, formats, method="rtn")
    args = ["export", "--run", str(tmp_path / "run"), "--format", "gguf", "--out", str(tmp_path / "gguf")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert "+rN" in result.stderr and "compressed-tensors" in result.stderr and "up_proj (q4_0+r4)" in result.stderr
    assert not (tmp_path / "gguf").exists() and not (tmp_path / ".gguf.partial").exists()
    with pytest.raises(AutompError, match=r"--format gguf .*quantized without \+rN"):  # no loop between the two
        export(ExportSettings(run=tmp_path / "run", format="compressed-tensors", out=tmp_path / "ct"))


def test_lora_warnings_name_ranks_vllm_cannot_serve(corrected):
    inv = RunDir.open(corrected[0] / "run").inventory
    plain = {name: get_format(fmt).base.name for name, fmt in FORMATS.items()}
    assert lora_warnings(inv, Allocation(formats=plain)) == []
    top = max(VLLM_MAX_LORA_RANKS)
    too_high = plain | {
        "model.layers.1.mlp.up_proj": f"w4g32+r{top + 1}",
        "model.layers.1.mlp.gate_proj": f"w4g32+r{top}",
    }
    (warning,) = lora_warnings(inv, Allocation(formats=too_high))
    assert f"model.layers.1.mlp.up_proj (rank {top + 1})" in warning and "gate_proj" not in warning
    assert vllm_max_lora_rank(top + 1) is None and vllm_max_lora_rank(top) == top  # the adapter report agrees
    assert [vllm_max_lora_rank(rank) for rank in (1, 2, 8, 9, 300)] == [1, 8, 8, 16, 320]
