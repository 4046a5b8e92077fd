"""llama.cpp exports: automp's weights as one GGUF file (read back with gguf-py) and the llama-quantize recipe."""

import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from automp import AutompError
from automp.cli import app
from automp.export import RunDir
from automp.export.gguf_file import GGUF_FILE, export_gguf, permute, unpermute
from automp.export.gguf_map import ARGS_FILE, TYPES_FILE, export_gguf_map
from conftest import save_tiny_run

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# head_dim 32 with 4 query and 2 KV heads: the q/k permutation differs per head and between q and k
CONFIG = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-5,
              initializer_range=0.1, bos_token_id=0, eos_token_id=1)  # fmt: skip
FORMATS = {  # GGUF formats (K-quants where rows are 256 long: down_proj), one 16-bit layer, a quantized head
    "model.layers.0.self_attn.q_proj": "q8_0", "model.layers.0.self_attn.k_proj": "q4_0",
    "model.layers.0.self_attn.v_proj": "iq4_nl", "model.layers.0.self_attn.o_proj": "q8_0",
    "model.layers.0.mlp.gate_proj": "q4_0", "model.layers.0.mlp.up_proj": "fp16",
    "model.layers.0.mlp.down_proj": "q4_k",
    "model.layers.1.self_attn.q_proj": "q8_0", "model.layers.1.self_attn.k_proj": "q8_0",
    "model.layers.1.self_attn.v_proj": "q4_0", "model.layers.1.self_attn.o_proj": "iq4_nl",
    "model.layers.1.mlp.gate_proj": "q8_0", "model.layers.1.mlp.up_proj": "q4_0",
    "model.layers.1.mlp.down_proj": "q6_k",
    "lm_head": "q8_0",
}  # fmt: skip


def _save_run(path, tokenizer, formats: dict[str, str]) -> dict:
    """A random tiny Llama quantized with RTN under ``formats`` and saved as an automp run; returns its weights."""
    return save_tiny_run(path, tokenizer, CONFIG, formats)[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("gguf")
    qweights = _save_run(root / "run", tokenizer, FORMATS)
    run = RunDir.open(root / "run")
    (root / "out").mkdir()
    report = export_gguf(run, root / "out")
    return root, run, qweights, report, gguf.GGUFReader(root / "out" / GGUF_FILE)


def _value(reader, key: str):
    return reader.fields[key].contents()


def test_metadata_and_tokenizer_follow_the_converter(exported, tokenizer):
    root, run, _, report, reader = exported
    expected = {
        "general.architecture": "llama", "general.type": "model", "llama.block_count": 2,
        "llama.context_length": 64, "llama.embedding_length": 128, "llama.feed_forward_length": 256,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 50000.0,
        "llama.attention.key_length": 32, "llama.attention.value_length": 32, "llama.rope.dimension_count": 32,
        "llama.vocab_size": 384, "general.quantization_version": 2, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
        # most linear weights are Q8_0: 90,112 (and the head's 49,152) against Q4_0's 81,920
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
    }  # fmt: skip
    assert {key: _value(reader, key) for key in expected} == expected
    assert _value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    vocab = tokenizer.get_vocab()
    assert _value(reader, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    types = _value(reader, "tokenizer.ggml.token_type")
    assert types[:2] == [gguf.TokenType.CONTROL] * 2 and set(types[2:]) == {gguf.TokenType.NORMAL}
    merges = json.loads((root / "run" / "tokenizer.json").read_text())["model"]["merges"]
    assert _value(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    assert report["engine"] == "llama.cpp" and report["warnings"] == [] and report["tokenizer_pre"] == "gpt-2"
    assert report["file_bytes"] == (root / "out" / GGUF_FILE).stat().st_size
    assert report["tensor_types"] == {"F32": 5, "F16": 2, "Q8_0": 6, "Q4_0": 4, "IQ4_NL": 2, "Q4_K": 1, "Q6_K": 1}
    assert not list((root / "out").glob(".*"))  # no temporary file left


def test_every_tensor_is_automps_own_weight(exported):
    root, run, qweights, report, reader = exported
    dense = run.dense_tensors()
    hf_names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    blocks = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}  # fmt: skip
    hf_names |= {f"blk.{i}.{gg}": f"model.layers.{i}.{hf}" for i in range(2) for gg, hf in blocks.items()}
    assert sorted(t.name for t in reader.tensors) == sorted(f"{name}.weight" for name in hf_names)
    bits = 0
    for tensor in reader.tensors:
        layer = hf_names[tensor.name.removesuffix(".weight")]
        if layer in qweights:
            want, kind = qweights[layer].dequantize(), Q[FORMATS[layer].upper()]
        else:
            want = dense[layer + ".weight"].float()
            kind = Q.F32 if want.dim() == 1 else Q.F16
        assert tensor.tensor_type == kind, tensor.name
        assert tuple(reversed(tensor.shape.tolist())) == tuple(want.shape), tensor.name  # GGML lists dims inner first
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        heads = {"attn_q": 4, "attn_k": 2}.get(tensor.name.split(".")[-2])
        got = got if heads is None else unpermute(got, heads)
        assert np.array_equal(got, want.numpy()), tensor.name  # exact: the same bytes, rows moved back
        bits += tensor.n_bytes * 8
    assert report["bits_per_weight"] == pytest.approx(bits / sum(int(t.n_elements) for t in reader.tensors))


def test_permute_interleaves_the_two_rotary_halves_of_each_head():
    rows = np.arange(2 * 8)[:, None] * np.ones((1, 3))  # 2 heads of dim 8: row r holds r
    moved = permute(rows, 2)[:, 0].astype(int).tolist()
    assert moved == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]  # rotate-half pairs (i, i + d/2) adjacent
    assert np.array_equal(unpermute(permute(rows, 2), 2), rows)
    data = np.random.default_rng(0).integers(0, 255, (64, 34), dtype=np.uint8)  # rows of Q8_0 blocks
    assert np.array_equal(permute(data, 4), data[permute(np.arange(64), 4)])  # whole rows move, bytes intact


def test_automp_formats_are_one_clear_error_and_no_file(tmp_path, tokenizer):
    formats = FORMATS | {"model.layers.1.mlp.up_proj": "w4g128", "model.layers.0.self_attn.q_proj": "nf4g64"}
    _save_run(tmp_path / "run", tokenizer, formats)
    (tmp_path / "out").mkdir()
    with pytest.raises(AutompError, match=r"model\.layers\.0\.self_attn\.q_proj \(nf4g64\), .*up_proj \(w4g128\)"
                       r".*--engine llama\.cpp"):  # fmt: skip
        export_gguf(RunDir.open(tmp_path / "run"), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def _edit(path, file: str, edit) -> None:
    spec = json.loads((path / file).read_text())
    edit(spec)
    (path / file).write_text(json.dumps(spec))


def test_other_tokenizers_and_architectures_are_refused_before_writing(exported, tmp_path):
    shutil.copytree(exported[0] / "run", tmp_path / "run")
    (tmp_path / "out").mkdir()
    _edit(tmp_path / "run", "tokenizer.json", lambda spec: spec["pre_tokenizer"].update(add_prefix_space=True))
    with pytest.raises(AutompError, match="not one llama.cpp is known to reproduce"):  # none adds a prefix space
        export_gguf(RunDir.open(tmp_path / "run"), tmp_path / "out")
    _edit(tmp_path / "run", "tokenizer.json", lambda spec: spec["model"].update(byte_fallback=True))
    with pytest.raises(AutompError, match=r"SentencePiece-style .*--format gguf-map"):
        export_gguf(RunDir.open(tmp_path / "run"), tmp_path / "out")
    _edit(tmp_path / "run", "config.json", lambda spec: spec.update(architectures=["MistralForCausalLM"]))
    with pytest.raises(AutompError, match="LlamaForCausalLM models only, not MistralForCausalLM"):
        export_gguf(RunDir.open(tmp_path / "run"), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_tensor_type_file_names_written_tensors(exported, tmp_path):
    root, run, _, _, reader = exported
    report = export_gguf_map(run, tmp_path)
    lines = (tmp_path / TYPES_FILE).read_text().splitlines()
    assert all(re.fullmatch(r"[a-z0-9_.]+=[A-Z0-9_]+", line) for line in lines)  # what --tensor-type-file reads
    types = dict(line.split("=") for line in lines)
    assert len(types) == len(lines) and set(types) <= {t.name for t in reader.tensors}
    assert {name: Q[kind] for name, kind in types.items()} == {
        t.name: t.tensor_type for t in reader.tensors if t.name in types
    }  # the recipe asks for exactly the types --format gguf writes
    assert lines[-1] == "output.weight=Q8_0" and lines[0] == "token_embd.weight=F16"
    assert report["engine"] == "llama.cpp" and report["base_type"] == "Q8_0"  # quantized: F16 disables overrides
    assert f"--tensor-type-file {TYPES_FILE}" in report["commands"]["quantize"]
    assert report["commands"]["quantize"].endswith("model-f16.gguf model-automp.gguf Q8_0")
    args = (tmp_path / ARGS_FILE).read_text().split()
    assert args[:4] == ["--token-embedding-type", "F16", "--output-tensor-type", "Q8_0"]
    assert args[4::2] == ["--tensor-type"] * 14 and set(args[5::2]) == set(lines[1:-1])


def test_cli_export_writes_the_file_or_one_error_line(exported, tmp_path, tokenizer):
    root = exported[0]
    result = CliRunner().invoke(app, ["export", "--run", str(root / "run"), "--format", "gguf",
                                      "--out", str(tmp_path / "gguf"), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["engine"] == "llama.cpp" and printed["file_bytes"] == (tmp_path / "gguf" / GGUF_FILE).stat().st_size
    assert (tmp_path / "gguf" / GGUF_FILE).read_bytes() == (root / "out" / GGUF_FILE).read_bytes()  # deterministic
    _save_run(tmp_path / "w4", tokenizer, FORMATS | {"model.layers.1.mlp.up_proj": "w4g128"})
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "w4"), "--format", "gguf",
                                      "--out", str(tmp_path / "w4-gguf")])  # fmt: skip
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert "model.layers.1.mlp.up_proj (w4g128)" in result.stderr and not (tmp_path / "w4-gguf").exists()


def test_all_16_bit_run_exports_and_its_recipe_keeps_a_quantized_base(tmp_path, tokenizer):
    _save_run(tmp_path / "run", tokenizer, dict.fromkeys(FORMATS, "fp16"))
    run = RunDir.open(tmp_path / "run")
    (tmp_path / "gguf").mkdir()
    report = export_gguf(run, tmp_path / "gguf")  # the converter's --outtype f16 file, from automp's run
    assert report["file_type"] == "MOSTLY_F16" and report["tensor_types"] == {"F16": 16, "F32": 5}
    (tmp_path / "map").mkdir()
    mapping = export_gguf_map(run, tmp_path / "map")
    assert mapping["base_type"] == "Q8_0"  # any quantized base: with F16, llama-quantize ignores the overrides
    lines = (tmp_path / "map" / TYPES_FILE).read_text().splitlines()
    assert len(lines) == 16 and all(line.endswith("=F16") for line in lines)
