"""The GPTQ checkpoint export: GPTQ's packing, an independent dequantization, the dynamic keys, refusals."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from automp import AutompError
from automp.export import RunDir
from automp.export.gptq import checkpoint_format, pack_int32, pack_layer, unpack_int32
from automp.formats import get_format
from automp.pipeline import export
from automp.quantizers.rtn import rtn_quantize
from automp.settings import ExportSettings
from conftest import save_tiny_run

CONFIG = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)  # fmt: skip
FORMATS = {  # every kind of GPTQ layer: 2/3/4/8 bits, sym and asym, grouped and per channel, 16-bit
    "model.layers.0.self_attn.q_proj": "w4g128", "model.layers.0.self_attn.k_proj": "w4g128",
    "model.layers.0.self_attn.v_proj": "w4g128", "model.layers.0.self_attn.o_proj": "w8",
    "model.layers.0.mlp.gate_proj": "w3g32a", "model.layers.0.mlp.up_proj": "w3g32a",
    "model.layers.0.mlp.down_proj": "w4g128",
    "model.layers.1.self_attn.q_proj": "w3", "model.layers.1.self_attn.k_proj": "w4g128",
    "model.layers.1.self_attn.v_proj": "w4g128", "model.layers.1.self_attn.o_proj": "fp16",
    "model.layers.1.mlp.gate_proj": "w2g64", "model.layers.1.mlp.up_proj": "w2a",
    "model.layers.1.mlp.down_proj": "w8g32a",
}  # fmt: skip
BITS_FORMATS = ("w2g32", "w2g64a", "w2", "w3g128", "w3g32a", "w3a", "w4g128", "w4g64a", "w4", "w8g32", "w8a", "w8")


def reference_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ's reference packer (AutoGPTQ/GPTQModel ``pack``), rows of ``intweight`` (in, out) into int32 rows."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] * bits // 32, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 values | 1 straddling | 10 | 1 straddling | 10
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


def gptq_unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQModel's torch-backend unpacking (its shift tables) of int32 rows: (rows, n) -> (rows * 32 / bits, n)."""
    if bits in (2, 4, 8):
        wf = torch.arange(0, 32, bits, dtype=torch.int32).view(1, -1, 1)
        return ((packed.unsqueeze(1) >> wf) & (2**bits - 1)).flatten(0, 1)
    wf = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
                       [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]], dtype=torch.int32)  # fmt: skip
    w = packed.reshape(-1, 3, 1, packed.shape[1]).expand(-1, -1, 12, -1) >> wf.view(1, 3, 12, 1)
    w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
    w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
    w = w & 0x7
    return torch.cat([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], dim=1).flatten(0, 1)


def gptq_dequantize(tensors: dict, name: str, bits: int, v1: bool) -> torch.Tensor:
    """GPTQ's formula ``(w - z) * s`` over the group of each input column (``g_idx``); returns (out, in)."""
    weight = gptq_unpack_rows(tensors[f"{name}.qweight"], bits).long()  # (in, out)
    zeros = gptq_unpack_rows(tensors[f"{name}.qzeros"].T.contiguous(), bits).T.long() + (1 if v1 else 0)
    g_idx = tensors[f"{name}.g_idx"].long()
    return ((weight - zeros[g_idx]).float() * tensors[f"{name}.scales"].float()[g_idx]).T


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_gptqs_and_round_trips(bits):
    values = torch.randint(0, 2**bits, (128, 96), generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(values, bits, dim=0)
    assert packed.dtype == torch.int32 and packed.shape == (128 * bits // 32, 96)
    assert np.array_equal(packed.numpy(), reference_pack(values.numpy(), bits))
    assert torch.equal(unpack_int32(packed, bits, dim=0).long(), values)
    assert torch.equal(gptq_unpack_rows(packed, bits), values)  # GPTQModel's own unpacking reads it back
    columns = pack_int32(values.T, bits, dim=1)  # qzeros: packed along the output dimension
    assert torch.equal(columns, packed.T) and torch.equal(unpack_int32(columns, bits, dim=1).long(), values.T)
    with pytest.raises(AutompError, match="whole int32 words"):
        pack_int32(values[: 8 if bits == 3 else 1], bits)


@pytest.mark.parametrize("name", BITS_FORMATS)
def test_layer_round_trip_and_independent_dequantization(name):
    fmt = get_format(name)
    qweight = rtn_quantize(torch.randn(64, 128, generator=torch.Generator().manual_seed(1)), fmt)
    for v1 in (True, False):
        tensors = pack_layer("x", qweight, zero_offset=int(v1))
        groups = 128 // fmt.group(128)
        assert tensors["x.qweight"].shape == (128 * fmt.bits // 32, 64)
        assert tensors["x.qzeros"].shape == (groups, 64 * fmt.bits // 32) and tensors["x.qzeros"].dtype == torch.int32
        assert tensors["x.scales"].shape == (groups, 64) and tensors["x.scales"].dtype == torch.float16
        assert torch.equal(tensors["x.g_idx"], torch.arange(128, dtype=torch.int32) // fmt.group(128))
        assert torch.equal(unpack_int32(tensors["x.qweight"], fmt.bits).T, qweight.codes)
        zeros = unpack_int32(tensors["x.qzeros"], fmt.bits, dim=1).T.long() + int(v1)
        expected = qweight.zero.long() if qweight.zero is not None else torch.full_like(zeros, 2 ** (fmt.bits - 1))
        assert torch.equal(zeros, expected) and torch.equal(tensors["x.scales"].T, qweight.scale)
        assert torch.equal(gptq_dequantize(tensors, "x", fmt.bits, v1), qweight.dequantize())


def test_zero_point_zero_needs_v2():
    qweight = rtn_quantize(torch.randn(32, 64).abs(), get_format("w4g32a"))  # all-positive groups: zero 0
    assert (qweight.zero == 0).any()
    assert checkpoint_format({"x": qweight})[0] == "gptq_v2"
    assert checkpoint_format({"x": rtn_quantize(torch.randn(32, 64), get_format("w4g32"))})[0] == "gptq"
    tensors = pack_layer("x", qweight, zero_offset=0)
    assert torch.equal(gptq_dequantize(tensors, "x", 4, v1=False), qweight.dequantize())


@pytest.fixture(scope="module")
def gptq_export(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("gptq")
    model, qweights = save_tiny_run(root / "run", tokenizer, CONFIG, FORMATS)
    report = export(ExportSettings(run=root / "run", format="gptq", out=root / "gptq"))
    return root, model, qweights, report


def test_checkpoint_dequantizes_to_automps_weights(gptq_export):
    root, model, qweights, report = gptq_export
    tensors = load_file(root / "gptq" / "model.safetensors")
    config = json.loads((root / "gptq" / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig == json.loads((root / "gptq" / "quantize_config.json").read_text())
    assert (qconfig["quant_method"], qconfig["checkpoint_format"], qconfig["desc_act"]) == ("gptq", "gptq", False)
    assert report["checkpoint_format"] == "gptq" and config["dtype"] == "float16"
    for name, qweight in qweights.items():
        bits = qweight.fmt.bits
        assert torch.equal(gptq_dequantize(tensors, name, bits, v1=True), qweight.dequantize()), name
        assert tensors[f"{name}.g_idx"].dtype == torch.int32 and f"{name}.weight" not in tensors
    per_channel = "model.layers.0.self_attn.o_proj"  # w8: group_size -1, one group of all 128 inputs
    assert tensors[f"{per_channel}.scales"].shape == (1, 128) and tensors[f"{per_channel}.qzeros"].shape == (1, 32)
    assert not tensors[f"{per_channel}.g_idx"].any()
    dense = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales", "g_idx")}
    assert all(t.dtype == torch.float16 for t in dense.values())
    state = model.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.o_proj.weight"):
        assert torch.equal(dense[key], state[key].half()), key
    assert (root / "gptq" / "tokenizer.json").is_file()
    # GPTQ stores qzeros for symmetric layers and a 4-byte g_idx per input column beyond automp's bytes
    extra = sum(t.nbytes for k, t in tensors.items() if k.endswith((".g_idx", ".qzeros")))
    zeros = sum(q.zero.numel() * q.fmt.bits // 8 for q in qweights.values() if q.zero is not None)
    assert report["quantized_bytes_on_disk"] - report["quantized_bytes_automp"] == extra - zeros


def test_dynamic_keys_match_exactly_their_modules(gptq_export):
    root = gptq_export[0]
    qconfig = json.loads((root / "gptq" / "quantize_config.json").read_text())
    assert (qconfig["bits"], qconfig["group_size"], qconfig["sym"]) == (4, 128, True)  # the most weights
    modules = [name for name, _ in RunDir.open(root / "run").skeleton.named_modules()]
    decoys = [name.replace("layers.1.", "layers.10.") for name in modules if "layers.1." in name]
    decoys += ["x" + name for name in modules] + [name + ".x" for name in modules]
    fused = ["model.layers.0.mlp.gate_up_proj", "model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.gate_up_proj"]
    expected = {
        "+:^model\\.layers\\.0\\.mlp\\.gate_up_proj$": {"bits": 3, "group_size": 32, "sym": False},  # vLLM's name
    }
    for name, fmt in FORMATS.items():
        if fmt == "fp16":
            expected[f"-:^{re.escape(name)}$"] = {}
        elif fmt != "w4g128":
            spec = get_format(fmt)
            expected[f"+:^{re.escape(name)}$"] = {"bits": spec.bits, "group_size": spec.group_size or -1,
                                                  "sym": spec.symmetric}  # fmt: skip
    assert qconfig["dynamic"] == expected
    for key in qconfig["dynamic"]:
        matched = [name for name in modules + decoys + fused if re.match(key[2:], name)]
        assert matched == [key[3:-1].replace("\\", "")], key  # exactly its own module, nothing else


def test_report_names_engines_and_vllm_limits(gptq_export):
    root, _, _, report = gptq_export
    assert report["engine"] == "gptqmodel" and report["loaders"] == ["gptqmodel", "vllm"]
    assert json.loads((root / "gptq" / "automp_export.json").read_text())["engine"] == "gptqmodel"
    assert report["vllm_kernel"] == "gptq" and set(report["kernels"]) >= {"gptqmodel-torch", "vllm-gptq"}
    exllama, fused = report["warnings"]
    assert "--quantization gptq" in exllama and "model.layers.1.mlp.gate_proj (w2g64)" in exllama
    assert "model.layers.0.mlp.up_proj (w3g32a)" in exllama and "(w4g128)" not in exllama and "(w8)" not in exllama
    assert "model.layers.1.self_attn.q_proj (w3)" in fused and "model.layers.0." not in fused
    quiet = export(ExportSettings(run=root / "run", format="gptq", out=root / "quiet", engine="transformers"))
    assert quiet["warnings"] == [] and quiet["engine"] == "gptqmodel"


def test_codebook_layers_are_refused_with_no_output(tmp_path, tokenizer):
    formats = {**dict.fromkeys(FORMATS, "w4g128"), "model.layers.1.mlp.up_proj": "nf4g64",
               "model.layers.0.self_attn.o_proj": "fp4g32"}  # fmt: skip
    save_tiny_run(tmp_path / "run", tokenizer, CONFIG, formats)
    with pytest.raises(AutompError, match=r"o_proj \(fp4g32\), model\.layers\.1\.mlp\.up_proj \(nf4g64\)"):
        export(ExportSettings(run=tmp_path / "run", format="gptq", out=tmp_path / "gptq"))
    assert not (tmp_path / "gptq").exists() and not (tmp_path / ".gptq.partial").exists()
