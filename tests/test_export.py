"""Exports of a mixed-precision run: compressed-tensors loaded by plain transformers, GGUF and GPTQ recipes."""

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from automp import Allocation, AutompError
from automp.cli import app
from automp.export import RunDir
from automp.export.run_dir import SETTINGS_FILE
from automp.export.vllm_support import vllm_warnings
from automp.pipeline import export
from automp.settings import ExportSettings
from conftest import save_tiny_run

# hidden 128, 2 KV heads of 32: every shape tiles for Marlin, so only format problems are warned about
CONFIG = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)  # fmt: skip
MIXED = {  # block 0 is servable by vLLM except down; block 1 mixes formats inside both fused groups
    "model.layers.0.self_attn.q_proj": "w4g128", "model.layers.0.self_attn.k_proj": "w4g128",
    "model.layers.0.self_attn.v_proj": "w4g128", "model.layers.0.self_attn.o_proj": "w8",
    "model.layers.0.mlp.gate_proj": "w4g64a", "model.layers.0.mlp.up_proj": "w4g64a",
    "model.layers.0.mlp.down_proj": "w3g128",
    "model.layers.1.self_attn.q_proj": "w4g32", "model.layers.1.self_attn.k_proj": "w8",
    "model.layers.1.self_attn.v_proj": "w4g128", "model.layers.1.self_attn.o_proj": "fp16",
    "model.layers.1.mlp.gate_proj": "w2g64", "model.layers.1.mlp.up_proj": "w4g128",
    "model.layers.1.mlp.down_proj": "w8g32a",
}  # fmt: skip
NOT_SERVABLE = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj")
IDS = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(0))


def _quantized_run(path, tokenizer, formats: dict[str, str]):
    """A random tiny Llama quantized with RTN under ``formats`` and saved as an automp run; returns its logits."""
    model, qweights = save_tiny_run(path, tokenizer, CONFIG, formats)
    with torch.no_grad():
        return model(IDS).logits, qweights


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("export")
    logits, qweights = _quantized_run(root / "run", tokenizer, MIXED)
    report = export(ExportSettings(run=root / "run", format="compressed-tensors", out=root / "ct"))
    return root, logits, qweights, report


def test_compressed_tensors_loads_in_plain_transformers(mixed):
    root, logits, qweights, _ = mixed
    loaded = AutoModelForCausalLM.from_pretrained(root / "ct", dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(IDS).logits  # the first forward decompresses the packed weights
    assert (got - logits).abs().max().item() <= 1e-5 * logits.abs().max().item()  # measured: 0.0
    half = AutoModelForCausalLM.from_pretrained(root / "ct", dtype=torch.float16).eval()
    with torch.no_grad():
        half(IDS[:, :4])
    for name, qweight in qweights.items():  # dequantization is bit-identical to automp's, in float32 and float16
        assert torch.equal(loaded.get_submodule(name).weight, qweight.dequantize()), name
        assert torch.equal(half.get_submodule(name).weight, qweight.dequantize().half()), name
    model_config = json.loads((root / "ct" / "config.json").read_text())
    assert model_config["dtype"] == "float16"  # as the dense tensors are stored (vLLM's Marlin needs 16-bit)
    config = model_config["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    targets = {name: group["weights"] for group in config["config_groups"].values() for name in group["targets"]}
    assert len(config["config_groups"]) == 7  # one group per quantized format
    down = targets["model.layers.1.mlp.down_proj"]
    assert (down["num_bits"], down["group_size"], down["symmetric"], down["strategy"]) == (8, 32, False, "group")
    assert targets["model.layers.0.self_attn.o_proj"]["strategy"] == "channel"
    assert set(config["ignore"]) == {"model.layers.1.self_attn.o_proj", "lm_head"}


def test_compressed_tensors_bytes_match_automp(mixed):
    root, _, qweights, report = mixed
    computed = sum(q.stored_bytes() for q in qweights.values())
    with safe_open(root / "ct" / "model.safetensors", "pt") as handle:
        on_disk = sum(handle.get_tensor(k).nbytes for k in handle.keys() if k.rsplit(".", 1)[-1].startswith("weight_"))
    assert report["quantized_bytes_automp"] == computed
    assert report["quantized_bytes_on_disk"] == on_disk == computed + 16 * len(qweights)  # + weight_shape (int64 x 2)
    assert report["quantized_bytes_ratio"] < 1.01
    inv = RunDir.open(root / "run").inventory
    assert computed == Allocation(formats=MIXED).stored_bits(inv) // 8 - 128 * 128 * 2  # 16-bit o_proj is dense


def test_vllm_warnings_name_unservable_layers_and_mixed_fused_groups(mixed):
    root, _, _, report = mixed
    unservable, fused = report["warnings"]
    assert all(name in unservable for name in NOT_SERVABLE)
    assert "model.layers.0.self_attn.q_proj" not in unservable and "w4g64a" not in unservable
    assert "model.layers.1.self_attn.k_proj (w8)" in fused and "model.layers.1.mlp.up_proj (w4g128)" in fused
    assert "model.layers.0." not in fused  # block 0's fused groups share formats
    run = RunDir.open(root / "run")
    assert vllm_warnings(run.inventory, Allocation(formats=dict.fromkeys(MIXED, "w4g128"))) == []


def test_cli_prints_warnings_to_stderr_and_json(mixed, tmp_path):
    root = mixed[0]
    result = CliRunner().invoke(app, ["export", "--run", str(root / "run"), "--format", "compressed-tensors",
                                      "--out", str(tmp_path / "ct"), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(printed["warnings"]) == 2 and result.stderr.count("warning: ") == 2
    assert "model.layers.1.mlp.gate_proj (w2g64)" in result.stderr
    quiet = CliRunner().invoke(app, ["export", "--run", str(root / "run"), "--format", "gptq-dynamic", "--engine",
                                     "transformers", "--out", str(tmp_path / "g"), "--json"])  # fmt: skip
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr
    assert printed["engine"] == "vllm" and json.loads(quiet.stdout.strip().splitlines()[-1])["engine"] == "gptqmodel"


def test_gguf_map_types_per_tensor(mixed, tmp_path):
    root = mixed[0]
    report = export(ExportSettings(run=root / "run", format="gguf-map", out=tmp_path / "gguf"))
    mapping = json.loads((tmp_path / "gguf" / "gguf_map.json").read_text())
    types = {row["tensor"]: row["gguf_type"] for row in mapping["tensors"]}
    assert types == {
        "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q4_K", "blk.0.attn_v.weight": "Q4_K",
        "blk.0.attn_output.weight": "Q8_0", "blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "Q4_K",
        "blk.0.ffn_down.weight": "Q3_K", "blk.1.attn_q.weight": "Q4_0", "blk.1.attn_k.weight": "Q8_0",
        "blk.1.attn_v.weight": "Q4_K", "blk.1.attn_output.weight": "F16", "blk.1.ffn_gate.weight": "Q2_K",
        "blk.1.ffn_up.weight": "Q4_K", "blk.1.ffn_down.weight": "Q8_0",
    }  # fmt: skip
    lines = (tmp_path / "gguf" / "tensor_types.args").read_text().splitlines()
    assert lines[:2] == ["--token-embedding-type F16", "--output-tensor-type F16"]
    assert "--tensor-type blk.1.attn_q.weight=Q4_0" in lines
    overrides = (tmp_path / "gguf" / "tensor_types.txt").read_text().split()
    assert "blk.1.attn_q.weight=Q4_0" in overrides and all(line.count("=") == 1 for line in overrides)
    assert report["base_type"] == "Q4_K" and mapping["gguf_bits_per_type"]["Q3_K"] == 3.4375
    assert report["engine"] == "llama.cpp" and report["loaders"] == ["llama.cpp"]
    weights = {row["tensor"]: row["numel"] for row in mapping["tensors"]}
    assert report["avg_bits_gguf"] == pytest.approx(
        sum(mapping["gguf_bits_per_type"][types[t]] * n for t, n in weights.items()) / sum(weights.values())
    )
    # rows of 128 are not a multiple of the K-quant superblock (256): llama.cpp would substitute a type
    assert "blk.0.attn_q.weight (Q4_K, row of 128)" in report["warnings"][0]
    assert "blk.1.ffn_down.weight" not in report["warnings"][0]  # a Q8_0 row of 256


def test_gptq_dynamic_overrides(mixed, tmp_path):
    root = mixed[0]
    report = export(ExportSettings(run=root / "run", format="gptq-dynamic", out=tmp_path / "gptq"))
    config = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert (config["bits"], config["group_size"], config["sym"]) == (4, 128, True)  # the most weights
    assert report["engine"] == "gptqmodel" and (config["desc_act"], config["static_groups"]) == (False, False)
    dynamic = config["dynamic"]

    def override(name: str) -> dict | None:  # GPTQModel's rule: the first key that re.match-es wins
        for key, value in dynamic.items():
            if re.match(key[2:], name):
                return {"skip": True} if key.startswith("-:") else value
        return None

    assert override("model.layers.0.self_attn.q_proj") is None
    assert override("model.layers.0.self_attn.o_proj") == {"bits": 8, "group_size": -1, "sym": True}
    assert override("model.layers.0.mlp.gate_proj") == {"bits": 4, "group_size": 64, "sym": False}
    assert override("model.layers.0.mlp.down_proj") == {"bits": 3, "group_size": 128, "sym": True}
    assert override("model.layers.1.self_attn.o_proj") == {"skip": True}
    assert override("model.layers.1.mlp.down_proj") == {"bits": 8, "group_size": 32, "sym": False}
    assert override("model.layers.10.mlp.down_proj") is None  # keys are anchored: layers.1 is not layers.10
    assert override("xmodel.layers.1.mlp.down_proj") is None and all(key[2] == "^" for key in dynamic)
    # vLLM's fused gate/up module of block 0 (both w4g64a); block 1's fused groups mix formats
    assert override("model.layers.0.mlp.gate_up_proj") == {"bits": 4, "group_size": 64, "sym": False}
    assert override("model.layers.1.mlp.gate_up_proj") is None and override("model.layers.1.self_attn.qkv_proj") is None
    assert len(dynamic) == 14 - 5 + 1  # all but the five w4g128 layers, and the fused alias

    shutil.copytree(root / "run", tmp_path / "act-order")  # a GPTQ run with act-order (static groups)
    (tmp_path / "act-order" / SETTINGS_FILE).write_text(json.dumps({"method": "gptq", "act_order": True}))
    export(ExportSettings(run=tmp_path / "act-order", format="gptq-dynamic", out=tmp_path / "gptq-ao"))
    config = json.loads((tmp_path / "gptq-ao" / "quantize_config.json").read_text())
    assert (config["desc_act"], config["static_groups"]) == (True, True)  # top level, where GPTQModel reads them
    assert "static_groups" not in config["meta"]


def test_unsupported_format_is_one_clear_error_and_no_output(tmp_path, tokenizer):
    formats = dict.fromkeys(MIXED, "w4g128")
    formats["model.layers.1.mlp.up_proj"] = "nf4g64"
    _quantized_run(tmp_path / "run", tokenizer, formats)
    with pytest.raises(AutompError, match=r"model\.layers\.1\.mlp\.up_proj \(nf4g64\)"):
        export(ExportSettings(run=tmp_path / "run", format="compressed-tensors", out=tmp_path / "ct"))
    assert not (tmp_path / "ct").exists() and not (tmp_path / ".ct.partial").exists()
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "run"), "--format", "compressed-tensors",
                                      "--out", str(tmp_path / "ct")])  # fmt: skip
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    gguf = export(ExportSettings(run=tmp_path / "run", format="gguf-map", out=tmp_path / "gguf"))
    assert "blk.1.ffn_up.weight=IQ4_NL" in (tmp_path / "gguf" / "tensor_types.txt").read_text()
    assert gguf["base_type"] == "Q4_K"
    with pytest.raises(AutompError, match="must differ"):
        export(ExportSettings(run=tmp_path / "run", format="gguf-map", out=tmp_path / "run"))
