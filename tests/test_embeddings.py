"""The token embedding (and the output head) as allocated layers: inventory, RTN quantization, exact bytes,
checkpoint round trip, their own measured proxies, search, the llama.cpp exports, and the combinations refused."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from automp import AutompError
from automp.allocation import Allocation
from automp.checkpoint import model_bytes, payload_bytes, save_quantized
from automp.cli import app
from automp.data import load_windows
from automp.export import RunDir, export_run
from automp.export.gguf_file import GGUF_FILE, export_gguf
from automp.export.gguf_map import ARGS_FILE, TYPES_FILE, export_gguf_map
from automp.formats import parse_formats
from automp.model import inventory, linear_weight, load_model
from automp.pipeline import search_problem
from automp.quantize import quantize_
from automp.quantizers.rtn import rtn_quantize
from automp.search.evaluator import AllocationEvaluator
from automp.search.gguf_recipes import recipe
from automp.sensitivity.prepass import Prepass
from automp.sensitivity.profile import PREPASS_DIR, profile_model
from automp.sensitivity.table import PROXIES, CalibInfo
from automp.settings import SearchSettings
from conftest import save_tiny_run

EMBED = "model.embed_tokens"
SEQLEN = 64
FORMATS = "w2g64,w4g128,w8,fp16"
# rows of 256: K-quants fit the embedding (384 x 256) and the head (384 x 256)
GGUF_CONFIG = dict(vocab_size=384, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, bos_token_id=0,
                   eos_token_id=1)  # fmt: skip


def _gguf_formats(embedding: str = "q4_k", head: str = "q6_k") -> dict[str, str]:
    layers = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    return {EMBED: embedding, **{f"model.layers.0.{name}": "q8_0" for name in layers}, "lm_head": head}


def test_inventory_puts_the_embedding_first_and_refuses_a_tied_one(tiny_dirs):
    model, _ = load_model(tiny_dirs["llama"], device="cpu")
    layers = inventory(model, include_lm_head=True, include_embeddings=True).layers
    first, last = layers[0], layers[-1]
    assert (first.name, first.block, first.role, first.out_features, first.in_features) == (EMBED, -1, "embed", 384, 64)
    assert last.role == "lm_head" and len(layers) == 2 + 14
    assert tuple(linear_weight(model.get_submodule(EMBED)).shape) == (384, 64)  # rows are tokens
    tied, _ = load_model(tiny_dirs["gpt2"], device="cpu")  # GPT-2 ties wte to lm_head
    with pytest.raises(AutompError, match="ties its token embedding to its output head"):
        inventory(tied, include_embeddings=True)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_embedding_is_rtn_its_bytes_exact_and_the_checkpoint_reproduces_logits(method, tiny_dirs, tokenizer, tmp_path):
    model, _ = load_model(tiny_dirs["llama"], device="cpu")
    original = model.get_submodule(EMBED).weight.detach().clone()
    ids = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    names = [layer.name for layer in inventory(model, include_embeddings=True).layers]
    allocation = Allocation(formats=dict.fromkeys(names, "w4g32") | {EMBED: "w3g32a"})
    qweights = quantize_(model, allocation, method, calib=ids, batch_size=2, progress=False)
    embedding = qweights[EMBED]
    # RTN whatever the method: rows are looked up, there is no Hessian
    assert torch.equal(embedding.dequantize(), rtn_quantize(original, embedding.fmt).dequantize())
    assert torch.equal(model.get_submodule(EMBED).weight, embedding.dequantize())
    # 384 rows of 64: 3-bit codes, one fp16 scale and one 3-bit zero-point per 32 values
    assert embedding.stored_bytes() == (384 * 64 * 3 + 384 * 2 * (16 + 3)) // 8 == 11040
    before = model(ids).logits
    save_quantized(tmp_path, model, tokenizer, allocation, qweights)
    assert sum(payload_bytes(path) for path in tmp_path.glob("*.safetensors")) == model_bytes(model, qweights)
    reloaded, _ = load_model(tmp_path, device="cpu")
    assert torch.equal(reloaded(ids).logits, before)
    dense = sum(p.numel() for p in model.parameters()) - sum(q.shape[0] * q.shape[1] for q in qweights.values())
    assert model_bytes(model, qweights) == sum(q.stored_bytes() for q in qweights.values()) + 2 * dense


def test_cli_quantize_embeddings_and_eval_of_the_run_reproduce(tiny_dirs, tmp_path):
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text("def quantize(model):\n    return model\n" * 80)
    run = CliRunner().invoke(app, ["quantize", "--model", str(tiny_dirs["llama"]), "--scheme", "w4g32",
                                   "--embeddings", "--eval", str(eval_text), "--seqlen", "32", "--out",
                                   str(tmp_path / "run"), "--json"])  # fmt: skip
    assert run.exit_code == 0, run.output
    metrics = json.loads(run.stdout.strip().splitlines()[-1])
    assert metrics["embeddings_quantized"] and not metrics["lm_head_quantized"] and metrics["layers"] == 15
    assert json.loads((tmp_path / "run" / "automp_quant.json").read_text())["formats"][EMBED] == "w4g32"
    again = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "run"), "--ppl", str(eval_text),
                                     "--seqlen", "32", "--json"])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["ppl"] == pytest.approx(metrics["ppl"], rel=1e-6)


# ---- the profile ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profiled(trained_dir, tmp_path_factory):
    """The trained tiny Llama profiled with its embedding and head (KL too)."""
    model, tokenizer = load_model(trained_dir, device="cpu")
    calib = load_windows(str(trained_dir.parent / "calib.txt"), tokenizer, SEQLEN, nsamples=6, seed=0)
    kl_windows = load_windows(str(trained_dir.parent / "eval.txt"), tokenizer, SEQLEN, nsamples=2, seed=1)
    work = tmp_path_factory.mktemp("profile-embed")
    table = profile_model(
        model, parse_formats(FORMATS), calib, model_name=str(trained_dir),
        calib_info=CalibInfo(spec="calib.txt", nsamples=6, seqlen=SEQLEN, seed=0), kl_windows=kl_windows,
        work_dir=work, progress=False, lm_head=True, embeddings=True,
    )  # fmt: skip
    return model, calib, table, Prepass(work / PREPASS_DIR)


def test_profile_measures_every_proxy_for_the_embedding_and_the_head(profiled):
    model, _, table, _ = profiled
    assert [table.layers[0].role, table.layers[-1].role] == ["embed", "lm_head"]
    vocab, hidden = model.get_submodule(EMBED).weight.shape
    for name in (EMBED, "lm_head"):
        costs = table.costs[name]
        assert costs["w4g128"].bits == 4 * vocab * hidden + vocab * 16 and costs["fp16"].bits == 16 * vocab * hidden
        for proxy, field in PROXIES.items():
            values = [getattr(costs[fmt], field) for fmt in ("w2g64", "w4g128", "w8", "fp16")]
            assert values[-1] == 0.0, (name, proxy)
            assert values[0] > values[1] > values[2] > 0, (name, proxy, values)  # fewer bits, more damage
    # the checkpoint's bytes besides the allocated layers: 5 norms only (the embedding and head are allocated)
    assert table.dense_bytes == 2 * (2 * 2 * hidden + hidden)


def test_embedding_proxies_match_a_direct_per_token_computation(profiled):
    """output_err = sum_v (c_v / n) ||dW_v||^2 from the token counts; output_grad = ModelOpt's score summed over
    every calibration token exactly, 1/2 T' mean_i sum_t (dL_i/dy_t)^2 . dW[v_t]^2."""
    model, calib, table, prepass = profiled
    embedding = model.get_submodule(EMBED)
    weight = embedding.weight.detach().clone()
    counts = torch.bincount(calib.flatten(), minlength=weight.shape[0]).double()
    assert torch.allclose(prepass.layer(EMBED).hessian.double(), counts / calib.numel(), atol=1e-7)
    grads = []

    def keep_output_grad(_module, _inputs, output) -> None:
        output.register_hook(lambda grad: grads.append(grad[0]))

    handle = embedding.register_forward_hook(keep_output_grad)
    for window in calib:
        ids = window.unsqueeze(0)
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:])
        loss.backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    tokens = calib.shape[1] - 1
    for fmt in parse_formats("w2g64,w4g128"):
        error = (rtn_quantize(weight, fmt).dequantize() - weight).double()
        cost = table.costs[EMBED][fmt.name]
        assert cost.output_err == pytest.approx(float((counts * error.pow(2).sum(1)).sum() / calib.numel()), rel=1e-6)
        pairs = zip(grads, calib, strict=True)  # per window: (T, hidden) output gradients, the T tokens
        exact = sum(float((g.double().pow(2) * error[window].pow(2)).sum()) for g, window in pairs)
        assert cost.output_grad == pytest.approx(0.5 * tokens * exact / len(calib), rel=1e-4)
        assert cost.weight_mse == pytest.approx(float(error.pow(2).sum()), rel=1e-9)


def test_per_window_terms_refuse_the_embedding(trained_dir, tmp_path):
    model, tokenizer = load_model(trained_dir, device="cpu")
    calib = load_windows(str(trained_dir.parent / "calib.txt"), tokenizer, SEQLEN, nsamples=2, seed=0)
    with pytest.raises(AutompError, match="not measured for the token embedding"):
        profile_model(model, parse_formats("w4g128,fp16"), calib, model_name="m", work_dir=tmp_path,
                      calib_info=CalibInfo(spec="c", nsamples=2, seqlen=SEQLEN, seed=0), progress=False,
                      per_window=True, embeddings=True)  # fmt: skip


# ---- search ---------------------------------------------------------------------------------------


def test_search_counts_the_embedding_at_its_allocated_format_or_keeps_it_16_bit(profiled, tmp_path):
    model, _, table, _ = profiled
    embedding = next(layer for layer in table.layers if layer.role == "embed")
    kept = SearchSettings(profile=tmp_path, target_size="1MB", out=tmp_path / "a.json")
    problem = search_problem(kept, table)
    assert problem.table is table  # as profiled: the embedding is allocated, its bytes are not fixed
    dropped = search_problem(kept.model_copy(update={"embeddings": False}), table)
    assert [layer.role for layer in dropped.table.layers].count("embed") == 0
    assert dropped.table.dense_bytes == table.dense_bytes + 2 * embedding.numel  # 16-bit, fixed cost
    usable = 10**6 - 2 * len(table.layers)  # packing slack: 2 bytes a layer
    assert problem.target_bits == pytest.approx((usable - table.dense_bytes) * 8 / table.weight_count(), abs=1e-8)
    head_only = SearchSettings(profile=tmp_path, target_bits=4.0, out=tmp_path / "b.json", embeddings=True)
    with pytest.raises(AutompError, match="no embed layer; profile again with --embeddings"):
        search_problem(head_only, dropped.table)
    table.save(tmp_path)
    for flag, allocated in (("--embeddings", True), ("--no-embeddings", False)):
        args = ["search", "--profile", str(tmp_path), "--target-bits", "4.5", flag, "--out", str(tmp_path / flag)]
        result = CliRunner().invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        assert (EMBED in Allocation.load(tmp_path / flag).formats) == allocated


def test_evaluator_caches_the_embedding_when_an_allocation_first_names_it(trained_dir, profiled):
    model, calib, table, _ = profiled
    windows = calib[:2]
    formats = {layer.name: "w4g128" for layer in table.layers if layer.role != "lm_head"} | {EMBED: "w2g64"}
    with AllocationEvaluator(model, windows, ["w2g64", "w4g128"]) as lazy:
        measured = lazy(Allocation(formats=formats))
    with AllocationEvaluator(model, windows, ["w2g64", "w4g128"], include_embeddings=True) as eager:
        assert eager(Allocation(formats=formats)) == measured
    fresh, _ = load_model(trained_dir, device="cpu")
    quantize_(fresh, Allocation(formats=formats), "rtn", progress=False)
    with AllocationEvaluator(fresh, windows, ["fp16"]) as reference:  # the RTN model as quantize_ leaves it
        assert reference.fp.ppl == pytest.approx(measured, rel=1e-3)
        assert reference.fp.ppl != pytest.approx(lazy.baseline, rel=1e-3)


def test_llama_cpp_recipes_give_the_embedding_the_base_type_and_the_head_q6_k(profiled):
    _, _, table, _ = profiled
    formats = recipe("Q3_K_M", table.layers)
    assert formats[EMBED] == "q3_k"  # llama-quantize's token_embd: the file type's base type
    assert formats["lm_head"] == "q8_0"  # rows of 128: not a multiple of 256, so Q8_0 instead of Q6_K
    assert formats["model.layers.1.mlp.down_proj"] == "q4_k"  # two blocks: n_layer ignores embedding and head


# ---- exports --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("embed-gguf")
    _, qweights = save_tiny_run(root / "run", tokenizer, GGUF_CONFIG, _gguf_formats())
    return root, RunDir.open(root / "run"), qweights


def test_gguf_writes_token_embd_and_output_as_automps_blocks(gguf_run):
    gguf = pytest.importorskip("gguf")
    root, run, qweights = gguf_run
    (root / "gguf").mkdir()
    report = export_gguf(run, root / "gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(root / "gguf" / GGUF_FILE).tensors}
    for name, layer, kind in (("token_embd.weight", EMBED, "Q4_K"), ("output.weight", "lm_head", "Q6_K")):
        tensor, want = tensors[name], qweights[layer]
        assert tensor.tensor_type == gguf.GGMLQuantizationType[kind] and int(tensor.n_bytes) == want.stored_bytes()
        assert tuple(reversed(tensor.shape.tolist())) == (384, 256)  # ne0 = hidden: a row is one token
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(384, 256)
        assert np.array_equal(got, want.dequantize().numpy()), name
    assert qweights[EMBED].stored_bytes() == 384 * 144  # one Q4_K block of 256 per token
    assert report["file_type"] == "MOSTLY_Q8_0"  # the token embedding is no linear layer
    assert report["tensor_types"] == {"F32": 3, "Q8_0": 7, "Q4_K": 1, "Q6_K": 1}


def test_gguf_map_writes_the_allocated_embedding_and_output_types(gguf_run, tmp_path):
    _, run, _ = gguf_run
    report = export_gguf_map(run, tmp_path)
    lines = (tmp_path / TYPES_FILE).read_text().splitlines()
    assert lines[0] == "token_embd.weight=Q4_K" and lines[-1] == "output.weight=Q6_K" and len(lines) == 9
    assert (tmp_path / ARGS_FILE).read_text().split()[:4] == [
        "--token-embedding-type", "Q4_K", "--output-tensor-type", "Q6_K"
    ]  # fmt: skip
    assert (report["token_embedding_type"], report["output_tensor_type"]) == ("Q4_K", "Q6_K")
    assert "--token-embedding-type Q4_K --output-tensor-type Q6_K" in report["commands"]["quantize"]


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "gptq-dynamic"])
def test_exports_without_a_quantized_embedding_refuse_the_run(fmt, tmp_path, tokenizer):
    formats = {EMBED: "w4g32", **{f"model.layers.0.{n}": "w4g32" for n in ("self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}}  # fmt: skip
    config = GGUF_CONFIG | {"hidden_size": 64, "intermediate_size": 128}
    save_tiny_run(tmp_path / "run", tokenizer, config, formats)
    (tmp_path / "out").mkdir()
    refused = rf"--format {fmt} quantizes linear layers only .*model\.embed_tokens \(w4g32\)"
    with pytest.raises(AutompError, match=refused):
        export_run(RunDir.open(tmp_path / "run"), fmt, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_refuses_a_tied_embedding_in_one_line(tiny_dirs, tmp_path):
    result = CliRunner().invoke(app, ["quantize", "--model", str(tiny_dirs["gpt2"]), "--scheme", "w4g32",
                                      "--embeddings", "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "tie_word_embeddings" in result.stderr and not (tmp_path / "out").exists()
