"""Inventory, quantize_ on every architecture, checkpoint round trip and exact byte accounting."""

import pytest
import torch
from safetensors.torch import save_file

from automp.allocation import Allocation
from automp.checkpoint import model_bytes, payload_bytes, save_quantized
from automp.errors import AutompError
from automp.model import inventory, linear_weight, load_model
from automp.quantize import quantize_
from conftest import ARCHS

EXPECTED_ROLES = {
    "llama": ["q", "k", "v", "o", "gate", "up", "down"],
    "qwen2": ["q", "k", "v", "o", "gate", "up", "down"],
    "mistral": ["q", "k", "v", "o", "gate", "up", "down"],
    "opt": ["k", "v", "q", "o", "fc1", "fc2"],  # module definition order
    "gpt2": ["qkv", "o", "fc1", "fc2"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_inventory_roles_blocks_and_fusion(arch, tiny_dirs):
    model, _ = load_model(tiny_dirs[arch], device="cpu")
    inv = inventory(model)
    roles = EXPECTED_ROLES[arch]
    assert [layer.role for layer in inv.layers] == roles * 2
    assert [layer.block for layer in inv.layers] == [0] * len(roles) + [1] * len(roles)
    assert all("lm_head" not in layer.name and "emb" not in layer.name for layer in inv.layers)
    fused_roles = [sorted(inv.by_name()[n].role for n in group) for group in inv.fused]
    expected = {"gpt2": [], "opt": [["k", "q", "v"]] * 2}.get(arch, [["k", "q", "v"], ["gate", "up"]] * 2)
    assert fused_roles == expected
    if arch == "gpt2":  # Conv1D weights are stored (in, out); the inventory reports (out, in)
        qkv = inv.layers[0]
        assert (qkv.out_features, qkv.in_features) == (192, 64)
    head = inventory(model, include_lm_head=True).layers[-1]
    assert head.role == "lm_head" and head.out_features == model.config.vocab_size


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_every_architecture(arch, method, tiny_dirs, tokenizer):
    model, _ = load_model(tiny_dirs[arch], device="cpu")
    ids = torch.randint(0, tokenizer.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    inv = inventory(model)
    allocation = Allocation.uniform(inv, "w4g32")
    qweights = quantize_(model, allocation, method, calib=ids, batch_size=2, progress=False)
    assert set(qweights) == {layer.name for layer in inv.layers}
    for name, qweight in qweights.items():  # the model now runs exactly the stored weights
        assert torch.equal(linear_weight(model.get_submodule(name)).float(), qweight.dequantize())
    assert torch.isfinite(model(ids).logits).all()
    assert allocation.avg_bits(inv) == 4 + 16 / 32


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2 ties lm_head to the embedding
def test_checkpoint_round_trip_and_bytes(arch, tiny_dirs, tmp_path):
    model, tokenizer = load_model(tiny_dirs[arch], device="cpu")
    inv = inventory(model, include_lm_head=arch == "llama")
    names = [layer.name for layer in inv.layers]
    # a mixed allocation: every format family, and one layer left in 16-bit
    formats = ["w2g32", "w3g32a", "w8", "nf4g32", "fp4g32", "fp16"]
    allocation = Allocation(formats={n: formats[i % len(formats)] for i, n in enumerate(names)})
    qweights = quantize_(model, allocation, "rtn", progress=False)
    ids = torch.arange(40).view(2, 20) % tokenizer.vocab_size
    before = model(ids).logits
    save_quantized(tmp_path, model, tokenizer, allocation, qweights)
    reloaded, _ = load_model(tmp_path, device="cpu")
    assert torch.equal(reloaded(ids).logits, before)
    computed = model_bytes(model, qweights)
    assert sum(payload_bytes(p) for p in tmp_path.glob("*.safetensors")) == computed
    # parameters() yields tied tensors once, as the checkpoint stores them
    dense = sum(p.numel() for p in model.parameters()) - sum(q.codes.numel() for q in qweights.values())
    packed = sum(allocation.format_of(n).storage_bits(*q.shape) for n, q in qweights.items()) // 8
    assert computed == packed + 2 * dense


def test_bad_models_give_clear_errors(tiny_dirs, tmp_path):
    with pytest.raises(AutompError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(AutompError, match="no config.json"):
        load_model(tmp_path)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in tiny_dirs["llama"].iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AutompError, match="could not load"):
        load_model(corrupt)
    model, _ = load_model(tiny_dirs["llama"], device="cpu")
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, corrupt / "model.safetensors")
    with pytest.raises(AutompError, match="NaN or Inf"):
        load_model(corrupt)


def test_allocation_must_match_the_model(tiny_dirs):
    model, _ = load_model(tiny_dirs["llama"], device="cpu")
    inv = inventory(model)
    bad = Allocation(formats={layer.name: "w4g32" for layer in inv.layers[1:]})
    with pytest.raises(AutompError, match="missing"):
        quantize_(model, bad)
    with pytest.raises(AutompError, match="not divisible"):
        Allocation.uniform(inv, "w4g128")  # hidden size 64
