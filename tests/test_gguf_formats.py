"""GGUF (llama.cpp) tensor types: exact sizes, gguf-py's decoder and quantizer as oracles, the importance
matrix, GPTQ on the fixed grid, storage round trips, and (with AUTOMP_GGML_LIB) llama.cpp byte for byte."""

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from transformers import AutoModelForCausalLM, LlamaConfig

from automp import Allocation, AutompError, quantize_
from automp.checkpoint import load_quantized, save_quantized
from automp.export import RunDir
from automp.formats import get_format, parse_formats
from automp.pipeline import export
from automp.quantizers import gguf_pack
from automp.quantizers.awq_clip import clip_weight
from automp.quantizers.gguf_weight import GGUFWeight
from automp.quantizers.gptq import gptq_quantize
from automp.quantizers.qweight import QuantizedWeight, load_qweight
from automp.quantizers.rtn import rtn_quantize
from automp.sensitivity.windows import load_codes, save_codes
from automp.settings import ExportSettings

BITS = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625,
        "q8_0": 8.5, "q4_0": 4.5, "iq4_nl": 4.5}  # fmt: skip
TYPES = list(BITS)
K_QUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def _weight(rows=16, cols=512, seed=0, heavy=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    if heavy:  # heavy tails, an outlier column, an all-zero block and a constant one
        w = w * torch.randn(rows, cols, generator=gen).exp()
        w[:, 5] *= 40
        w[1, :256] = 0
        w[2, 256:288] = -0.01
    return w


def _importance(cols=512, seed=1):
    return torch.randn(cols, generator=torch.Generator().manual_seed(seed)).mul(1.5).exp()


def _qtype(name):
    return GGMLQuantizationType[get_format(name).ggml_type]


def test_names_types_and_groups():
    assert get_format("Q4_K") == get_format("q4_k") and get_format(" IQ4_NL ").name == "iq4_nl"
    assert [f.ggml_type for f in parse_formats("q2_k,Q8_0,fp16,bf16,w4g128,nf4g64")] == [
        "Q2_K", "Q8_0", "F16", "BF16", None, None
    ]  # fmt: skip
    assert {n: (get_format(n).bits, get_format(n).group_size) for n in TYPES} == {
        "q2_k": (2, 16), "q3_k": (3, 16), "q4_k": (4, 32), "q5_k": (5, 32), "q6_k": (6, 16),
        "q8_0": (8, 32), "q4_0": (4, 32), "iq4_nl": (4, 32),
    }  # fmt: skip
    with pytest.raises(AutompError, match="q4_k, q5_k"):
        get_format("q4_1")


@pytest.mark.parametrize("name", TYPES)
def test_stored_bits_are_exact(name):
    fmt = get_format(name)
    rows, cols = 3, 768
    assert fmt.storage_bits(rows, cols) == rows * (cols // fmt.block_size) * fmt.type_size * 8
    assert fmt.bits_per_weight(rows, cols) == BITS[name]
    q = rtn_quantize(_weight(rows, cols), fmt)
    assert isinstance(q, GGUFWeight) and q.shape == (rows, cols)
    assert q.stored_bytes() * 8 == fmt.storage_bits(rows, cols) == q.blocks.numel() * 8


@pytest.mark.parametrize("name", TYPES)
def test_bad_row_length_is_one_clear_error_naming_the_fallback(name):
    fmt = get_format(name)
    fallback = {"q2_k": "Q4_0", "q3_k": "Q4_0", "q4_k": "Q5_0", "q5_k": "Q5_1", "q6_k": "Q8_0"}
    if fmt.block_size == 256:
        with pytest.raises(AutompError, match=f"row length 288 .* store this tensor as {fallback[name]} instead"):
            rtn_quantize(torch.randn(4, 288), fmt)
    with pytest.raises(AutompError, match="row length 100 .* store this tensor as F16 instead"):
        fmt.storage_bits(4, 100)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("imatrix", [False, True])
def test_decoder_equals_gguf_py(name, imatrix):
    w = _weight(heavy=True)
    q = rtn_quantize(w, get_format(name), _importance() if imatrix else None)
    reference = gguf_dequantize(q.blocks.numpy(), _qtype(name))
    assert np.array_equal(q.dequantize().numpy(), reference)
    assert (q.dequantize() - w).abs().max() < w.abs().max() / 2  # and it is a quantization of w


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_q8_0_q4_0_are_gguf_py_quantize_byte_for_byte(name):
    w = _weight(32, 512, heavy=True)
    assert np.array_equal(rtn_quantize(w, get_format(name)).blocks.numpy(), gguf_quantize(w.numpy(), _qtype(name)))


@pytest.mark.parametrize("name", TYPES)
def test_packing_round_trips_any_bytes(name):
    fmt = get_format(name)
    blocks = torch.randint(0, 256, (5, fmt.type_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gguf_pack.pack(fmt.ggml_type, gguf_pack.unpack(fmt.ggml_type, blocks)), blocks)


@pytest.mark.parametrize("name", [n for n in TYPES if n != "q8_0"])  # llama.cpp's Q8_0 ignores the imatrix
def test_imatrix_lowers_the_importance_weighted_error(name):
    fmt, w, importance = get_format(name), _weight(32, 512), _importance()

    def weighted(q):
        return ((q.dequantize() - w).pow(2) * importance).sum().item()

    assert weighted(rtn_quantize(w, fmt, importance)) < 0.97 * weighted(rtn_quantize(w, fmt))


def test_q8_0_ignores_the_imatrix_like_llama_cpp():
    w, fmt = _weight(), get_format("q8_0")
    assert torch.equal(rtn_quantize(w, fmt, _importance()).blocks, rtn_quantize(w, fmt).blocks)


def _correlated_hessian(cols=512, seed=2):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = torch.randn(1024, cols, generator=gen) @ mix * (torch.rand(cols, generator=gen) * 2 + 0.1)
    return x.T @ x / len(x)


def _hessian_error(w, q, H):
    d = (w - q).double()
    return torch.einsum("ri,ij,rj->", d, H.double(), d).item()


@pytest.mark.parametrize("name", TYPES)
def test_gptq_beats_imatrix_rtn_on_the_hessian_error(name):
    fmt, w, H = get_format(name), _weight(16, 256), _correlated_hessian(256)
    gptq = gptq_quantize(w, H, fmt)
    assert isinstance(gptq, GGUFWeight) and gptq.shape == w.shape
    assert np.array_equal(gptq.dequantize().numpy(), gguf_dequantize(gptq.blocks.numpy(), _qtype(name)))
    rtn = rtn_quantize(w, fmt, torch.diag(H))
    assert _hessian_error(w, gptq.dequantize(), H) < 0.8 * _hessian_error(w, rtn.dequantize(), H)


@pytest.mark.parametrize("name", K_QUANTS)
def test_gptq_with_a_diagonal_hessian_is_the_imatrix_rtn(name):
    # no correlation: no error feedback; GPTQ's nearest code on the fixed grid is llama.cpp's requantization
    w, H = _weight(8, 256), torch.diag(_importance(256))
    gptq = gptq_quantize(w, H, get_format(name), damp=0.0, act_order=False)
    assert torch.equal(gptq.blocks, rtn_quantize(w, get_format(name), torch.diag(H)).blocks)


def test_gptq_dead_inputs_and_act_order():
    w, H = _weight(8, 256), _correlated_hessian(256)
    H[7, :], H[:, 7] = 0, 0
    q = gptq_quantize(w, H, get_format("q4_k"), act_order=True)
    assert torch.isfinite(q.dequantize()).all() and q.dequantize()[:, 7].abs().max() < w.abs().max()


@pytest.mark.parametrize("name", TYPES)
def test_state_dict_round_trip_is_exact(name, tmp_path):
    q = rtn_quantize(_weight(heavy=True), get_format(name), _importance())
    back = load_qweight(name.upper(), q.shape, q.state_dict())
    assert isinstance(back, GGUFWeight) and torch.equal(back.blocks, q.blocks)
    assert torch.equal(back.dequantize(), q.dequantize())
    save_codes(tmp_path / "codes.safetensors", {name: q, "w4g128": rtn_quantize(_weight(), get_format("w4g128"))})
    codes = load_codes(tmp_path / "codes.safetensors")
    assert torch.equal(codes[name].blocks, q.blocks) and isinstance(codes["w4g128"], QuantizedWeight)


def test_awq_clipping_works_on_gguf_formats():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 256, generator=gen)
    weight[:, ::37] *= 5
    x = torch.randn(512, 256, generator=gen)
    for fmt in (get_format("q4_0"), get_format("q3_k")):
        clipped = clip_weight(weight, x, fmt)
        assert (clipped.abs() <= weight.abs()).all() and not torch.equal(clipped, weight)
        errors = [(x @ (rtn_quantize(w, fmt).dequantize() - weight).T).pow(2).mean().item() for w in (weight, clipped)]
        assert errors[1] < errors[0], (fmt.name, errors)


def test_run_directory_round_trip_and_compressed_tensors_refusal(tmp_path, tokenizer):
    config = LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    block = "model.layers.0."
    chosen = {"self_attn.q_proj": "q8_0", "self_attn.k_proj": "q4_0", "self_attn.v_proj": "iq4_nl",
              "self_attn.o_proj": "w4g128", "mlp.gate_proj": "q4_0", "mlp.up_proj": "fp16",
              "mlp.down_proj": "q4_k"}  # fmt: skip
    formats = {block + name: fmt for name, fmt in chosen.items()}
    allocation = Allocation(formats=formats)
    qweights = quantize_(model, allocation, "rtn", progress=False)
    save_quantized(tmp_path / "run", model, tokenizer, allocation, qweights)
    stored = RunDir.open(tmp_path / "run").quantized_weights()
    assert {n: type(q).__name__ for n, q in stored.items()} == {
        n: "QuantizedWeight" if f == "w4g128" else "GGUFWeight" for n, f in formats.items() if f != "fp16"
    }
    for name, q in stored.items():
        assert torch.equal(q.dequantize(), qweights[name].dequantize())
    loaded = load_quantized(tmp_path / "run", torch.float32)
    down = block + "mlp.down_proj"
    assert torch.equal(loaded.get_submodule(down).weight, qweights[down].dequantize())
    with pytest.raises(AutompError, match=r"cannot express GGUF .*mlp\.down_proj \(q4_k\)"):
        export(ExportSettings(run=tmp_path / "run", format="compressed-tensors", out=tmp_path / "ct"))


# ---- llama.cpp itself (needs a shared libggml-base.so) ----------------------------------------

GGML_LIB = os.environ.get("AUTOMP_GGML_LIB")


@pytest.mark.skipif(not GGML_LIB, reason="set AUTOMP_GGML_LIB to llama.cpp's libggml-base.so")
@pytest.mark.parametrize("name", TYPES)
def test_byte_identical_to_llama_cpp(name):
    from automp.quantizers.ggml_lib import ggml_dequantize, ggml_quantize

    fmt = get_format(name)
    for heavy in (False, True):
        w = _weight(24, 1024, seed=3, heavy=heavy)
        for imatrix in (None, _importance(1024), _importance(1024) * (torch.rand(1024) > 0.3)):
            ours = rtn_quantize(w, fmt, imatrix)
            assert torch.equal(ours.blocks, ggml_quantize(GGML_LIB, fmt, w, imatrix)), (name, heavy, imatrix)
            assert np.array_equal(ours.dequantize().numpy(), ggml_dequantize(GGML_LIB, fmt, ours.blocks).numpy())
    gptq = gptq_quantize(w[:, :256], _correlated_hessian(256), fmt)  # GPTQ's blocks decode alike in llama.cpp
    assert np.array_equal(gptq.dequantize().numpy(), ggml_dequantize(GGML_LIB, fmt, gptq.blocks).numpy())


def _blocks(n_layer: int, n_head: int, n_kv: int, hidden: int = 256):
    from automp.sensitivity.table import LayerStats

    head_dim, layers = hidden // n_head, []
    for block in range(n_layer):
        for role, out in (("q", hidden), ("k", n_kv * head_dim), ("v", n_kv * head_dim), ("o", hidden),
                          ("gate", 3 * hidden), ("up", 3 * hidden), ("down", hidden)):  # fmt: skip
            layers.append(LayerStats.model_construct(name=f"{block}.{role}", block=block, role=role,
                                                     out_features=out, in_features=hidden))  # fmt: skip
    return layers


def test_llamacpp_recipes_bump_the_tensors_llama_quantize_bumps():
    """llama_tensor_get_type's rules, worked out by hand for 16 blocks (n/8 = 2, n/16 = 1, 7n/8 = 14)."""
    from automp.search.gguf_recipes import recipe, use_more_bits

    more = [i for i in range(16) if use_more_bits(i, 16)]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]  # first/last eighth, then every third from n/8
    layers = _blocks(16, n_head=8, n_kv=2)  # GQA 4
    q2k = recipe("Q2_K", layers)
    assert {q2k[f"{b}.v"] for b in range(16)} == {"q4_k"}  # n_gqa >= 4
    assert {q2k[f"{b}.{r}"] for b in range(16) for r in ("o", "down")} == {"q3_k"}
    assert {q2k[f"{b}.{r}"] for b in range(16) for r in ("q", "k", "gate", "up")} == {"q2_k"}
    assert recipe("Q2_K", _blocks(2, n_head=8, n_kv=4))["0.v"] == "q3_k"  # n_gqa 2
    q3km = recipe("Q3_K_M", layers)
    assert [q3km[f"{b}.v"] for b in range(4)] == ["q5_k", "q5_k", "q4_k", "q4_k"]
    assert [q3km[f"{b}.down"] for b in range(3)] == ["q5_k", "q4_k", "q4_k"] and q3km["5.o"] == "q4_k"
    q4km = recipe("Q4_K_M", layers)
    assert [b for b in range(16) if q4km[f"{b}.v"] == "q6_k"] == more
    assert [b for b in range(16) if q4km[f"{b}.down"] == "q6_k"] == more
    q4ks = recipe("Q4_K_S", layers)
    assert [q4ks[f"{b}.v"] for b in range(5)] == ["q5_k"] * 4 + ["q4_k"]
    assert [q4ks[f"{b}.down"] for b in range(3)] == ["q5_k", "q5_k", "q4_k"]
    assert set(recipe("Q3_K_S", layers).values()) == {"q3_k"} and set(recipe("Q6_K", layers).values()) == {"q6_k"}
