"""Write an automp run as one GGUF file that llama.cpp runs: automp's own weights, nothing re-quantized.

The file is what llama.cpp's ``convert_hf_to_gguf.py`` writes for the same Llama model, except that the
linear layers keep automp's quantization:

* layers in a GGUF format (``q4_k``, ``q8_0``, ...) are written as their stored blocks, byte for byte,
  with their GGML type, an allocated token embedding (``--embeddings``: ``token_embd``, rows of ``hidden``
  as llama.cpp stores them) and output head (``--lm-head``: ``output``) included; layers left in fp16/bf16
  and the dense tensors (an unallocated embedding or head) in their stored 16-bit type (F16 or BF16);
  norms and other 1-D tensors in F32, as the converter does (from automp's 16-bit copies: a converter
  run on an fp32 original keeps their last bits).
  A layer in one of automp's own formats (``w4g128``, ``nf4g64``, ...) has no GGUF encoding: the export
  refuses the run and names those layers.
* Llama's q/k projections are permuted from Hugging Face's rotate-half row order to GGML's interleaved
  one (the converter's ``LlamaModel.permute``). The permutation moves whole output rows, so it applies to
  the rows of quantized blocks exactly.
* Metadata keys, tensor names (gguf-py's tensor-name map), ``general.*`` (gguf-py's ``Metadata``, so
  ``general.name`` comes from the run directory's name) and the tokenizer (gguf-py's ``SpecialVocab`` for
  merges and special tokens) follow the converter.
  ``general.file_type`` is the file type of the GGML type that holds the most linear-layer weights (the
  token embedding is no linear layer),
  mapped as llama.cpp's loader maps the most common tensor type (Q4_K -> MOSTLY_Q4_K_M, ...).
* Tokenizer: a byte-level BPE ``tokenizer.json``. The converter names the pre-tokenizer by hashing the
  tokens of a probe text and refuses hashes it does not know, so it cannot name an automp-trained
  tokenizer; this export reads the pre-tokenizer itself instead. HF's plain ``ByteLevel`` (GPT-2 regex,
  no prefix space, no normalizer) is llama.cpp's ``gpt-2``; Llama 3's split regex followed by
  ``ByteLevel`` without regex is ``llama-bpe``. Any other pre-tokenizer, and SentencePiece tokenizers,
  are refused with one error before anything is written.

Runs with ``+rN`` layers are refused: llama.cpp applies a low-rank correction only as a separate LoRA
adapter (``--lora``), which this export does not write (``peft_adapter.py`` says why the PEFT adapter of
``--format compressed-tensors`` offers no llama.cpp route either).

Only ``LlamaForCausalLM`` is supported. The file is written under a temporary name and renamed into
place, so a failed export leaves no partial ``model.gguf``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from automp.errors import AutompError
from automp.export.peft_adapter import refuse_corrections
from automp.export.run_dir import RunDir
from automp.model import EMBED_ROLE
from automp.quantizers.gguf_weight import GGUFWeight

GGUF_FILE = "model.gguf"
GGUF_REASON = "llama.cpp applies a low-rank correction only as a separate LoRA adapter (--lora), not written here"
GGUF_ADVICE = (  # for a run with +rN layers
    "Quantize these layers without +rN for llama.cpp; --format compressed-tensors writes corrections as a PEFT "
    "LoRA adapter for vLLM or transformers (automp's integer formats only)"
)
ARCHITECTURES = ("LlamaForCausalLM",)
LLAMA3_REGEX = (  # Llama 3's tokenizer.json split pattern (llama.cpp: pre-tokenizer llama-bpe)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False}
PRE_TOKENIZERS = {  # llama.cpp's name -> the tokenizer.json pre_tokenizer steps it reproduces (no normalizer)
    "gpt-2": ({**BYTE_LEVEL, "use_regex": True},),  # HF's plain ByteLevel splits with GPT-2's regex
    "llama-bpe": (
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {**BYTE_LEVEL, "use_regex": False},
    ),
}
FILE_TYPES = {  # the GGML type with the most weights -> general.file_type (llama.cpp's loader's mapping)
    "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
    "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K", "IQ4_NL": "MOSTLY_IQ4_NL",
}  # fmt: skip


def export_gguf(run: RunDir, out: Path) -> dict:
    """Write ``out/model.gguf`` (automp's weights for llama.cpp); returns the report."""
    refuse_corrections(run, "gguf", GGUF_REASON, GGUF_ADVICE)
    import gguf

    hparams = json.loads((run.path / "config.json").read_text())
    _check_architecture(run, hparams)
    pre = tokenizer_pre(run.path)
    formats = _check_formats(run)
    tensors = list(_tensors(run, hparams))
    linear = [name for name, layer in run.inventory.by_name().items() if name in formats and layer.role != EMBED_ROLE]
    layers, layer_types = {f"{name}.weight" for name in linear}, Counter()
    for hf_name, _, data, qtype in tensors:
        if hf_name in layers:
            layer_types[qtype.name] += _numel(data, qtype)
    file_type = FILE_TYPES[layer_types.most_common(1)[0][0]]

    final, partial = Path(out) / GGUF_FILE, Path(out) / f".{GGUF_FILE}.partial"
    try:
        writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        for _, name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        _add_metadata(writer, run.path, hparams, gguf.LlamaFileType[file_type])
        _add_tokenizer(writer, run.path, hparams["vocab_size"], pre)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(final)
    finally:
        partial.unlink(missing_ok=True)
    counts = Counter(qtype.name for _, _, _, qtype in tensors)
    weights = sum(_numel(data, qtype) for _, _, data, qtype in tensors)
    return {
        "engine": "llama.cpp",
        "file": GGUF_FILE,
        "file_bytes": final.stat().st_size,
        "file_type": file_type,
        "tokenizer_pre": pre,
        "tensor_types": dict(sorted(counts.items())),
        "bits_per_weight": 8 * sum(t[2].nbytes for t in tensors) / weights,  # as llama.cpp prints BPW
        "warnings": [],
    }


def _check_architecture(run: RunDir, hparams: dict) -> None:
    arch = (hparams.get("architectures") or [type(run.skeleton).__name__])[0]
    if arch not in ARCHITECTURES:
        raise AutompError(
            f"--format gguf writes {', '.join(ARCHITECTURES)} models only, not {arch}; "
            "--format gguf-map gives the llama-quantize recipe for any model llama.cpp converts"
        )
    kind = _rope(hparams).get("rope_type") or "default"
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise AutompError(f"--format gguf: unsupported RoPE scaling {kind!r} in {run.path / 'config.json'}")


def _check_formats(run: RunDir) -> dict:
    """Each layer's Format; one error naming every layer in a format GGUF cannot store."""
    formats = {layer.name: run.allocation.format_of(layer.name) for layer in run.inventory.layers}
    misfits = [f"{name} ({fmt.name})" for name, fmt in formats.items() if fmt.quantized and fmt.kind != "gguf"]
    if misfits:
        raise AutompError(
            f"--format gguf stores GGUF formats (q2_k ... q8_0, iq4_nl) and fp16/bf16 only; {len(misfits)} layers "
            f"use automp's own formats: {', '.join(misfits)}. Run automp with --engine llama.cpp to get GGUF "
            "formats, or export the recipe with --format gguf-map"
        )
    return formats


def _rope(hparams: dict) -> dict:
    rope = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hparams.get("rope_theta"))
    if "type" in rope:
        rope.setdefault("rope_type", rope["type"])
    return rope


# --- tensors -----------------------------------------------------------------------------------


def _tensors(run: RunDir, hparams: dict):
    """(HF name, GGUF name, numpy data, GGML type) for every tensor, in the model's state-dict order."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hparams["num_hidden_layers"])
    heads = {"q_proj": hparams["num_attention_heads"]}
    heads["k_proj"] = hparams.get("num_key_value_heads") or heads["q_proj"]
    dense = run.dense_tensors()
    qweights = run.quantized_weights()
    if (freqs := _llama3_rope_factors(hparams)) is not None:
        yield "", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs, gguf.GGMLQuantizationType.F32
    for hf_name in run.skeleton.state_dict():
        layer = hf_name.removesuffix(".weight")
        if hf_name not in dense and layer not in qweights:
            continue  # a tied copy (the output head of a tied model): llama.cpp reuses token_embd
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise AutompError(f"--format gguf: no llama.cpp tensor name for {hf_name}")
        n_head = heads.get(hf_name.split(".")[-2])
        if layer in qweights:
            data, qtype = _blocks(qweights[layer])
        else:
            data, qtype = _dense(dense[hf_name], name)
        yield hf_name, name, (data if n_head is None else permute(data, n_head)), qtype


def permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half q/k row order -> GGML's interleaved order (per head: 0, h/2, 1, h/2+1, ...).

    Only whole rows move, so ``rows`` may be weights, biases or rows of quantized block bytes.
    """
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of ``permute``: GGML's row order back to Hugging Face's."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _blocks(qweight: GGUFWeight) -> tuple[np.ndarray, object]:
    """The stored block bytes as they are (``GGUFWeight`` checks their layout when it is loaded)."""
    import gguf

    return qweight.blocks.cpu().numpy(), gguf.GGMLQuantizationType[qweight.fmt.ggml_type]


def _dense(tensor: torch.Tensor, name: str) -> tuple[np.ndarray, object]:
    """1-D tensors and norms in F32 (as the converter writes them), the rest in their stored 16-bit type."""
    import gguf

    types = gguf.GGMLQuantizationType
    if tensor.dim() <= 1 or name.endswith("_norm.weight"):
        return tensor.float().numpy(), types.F32
    if tensor.dtype == torch.bfloat16:  # bit copy: numpy has no bfloat16
        return tensor.contiguous().view(torch.uint8).numpy(), types.BF16
    return tensor.half().numpy(), types.F16


def _numel(data: np.ndarray, qtype) -> int:
    import gguf

    if data.dtype != np.uint8:
        return data.size
    return math.prod(gguf.quant_shape_from_byte_shape(data.shape, qtype))


def _llama3_rope_factors(hparams: dict) -> np.ndarray | None:
    """Llama 3's per-frequency RoPE factors, as the converter writes them (``rope_freqs.weight``)."""
    rope = _rope(hparams)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base, dim = rope.get("rope_theta") or 10000.0, hparams.get("head_dim")
    dim = dim or hparams["hidden_size"] // hparams["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# --- metadata ----------------------------------------------------------------------------------


def _add_metadata(writer, path: Path, hparams: dict, file_type) -> None:
    """``general.*`` and ``llama.*`` keys in the converter's order (after the tensors are known)."""
    import gguf

    total, shared, expert, experts = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, path, None, total)
    meta.name = meta.name or path.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, experts)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams.get("num_key_value_heads") or hparams["num_attention_heads"])
    _add_rope(writer, _rope(hparams))
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    if (head_dim := hparams.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(hparams["vocab_size"])
    writer.add_rope_dimension_count(head_dim or hparams["hidden_size"] // hparams["num_attention_heads"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_rope(writer, rope: dict) -> None:
    import gguf

    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):  # fmt: skip
            if rope.get(key) is not None:
                add(rope[key])
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])


# --- tokenizer ---------------------------------------------------------------------------------


def tokenizer_pre(path: Path) -> str:
    """llama.cpp's pre-tokenizer name for the byte-level BPE ``tokenizer.json`` in ``path``; else an error."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise AutompError(f"--format gguf needs a byte-level BPE tokenizer.json; {path} has none")
    spec = json.loads(file.read_text())
    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte fallback)" if model.get("byte_fallback") else model.get("type")
        raise AutompError(
            f"--format gguf writes byte-level BPE tokenizers only; {file} is {kind}: export the recipe with "
            "--format gguf-map (llama.cpp's convert_hf_to_gguf.py converts SentencePiece tokenizers)"
        )
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for name, expected in PRE_TOKENIZERS.items():
        if norm is None and len(steps) == len(expected) and all(map(_has, steps, expected)):
            return name
    raise AutompError(
        f"--format gguf: the pre-tokenizer of {file} ({json.dumps(pre)}, normalizer {json.dumps(norm)}) is not "
        "one llama.cpp is known to reproduce (HF's plain ByteLevel = gpt-2, Llama 3's split + ByteLevel = llama-bpe)"
    )


def _has(step: dict, expected: dict) -> bool:
    return all(step.get(key, True if key == "use_regex" else None) == value for key, value in expected.items())


def _add_tokenizer(writer, path: Path, vocab_size: int, pre: str) -> None:
    """The converter's ``_set_vocab_gpt2``: tokens, types, merges and special tokens of a byte-level BPE."""
    import gguf

    tokens, types = _bpe_vocab(path, vocab_size)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("add_prefix_space") is not None:
        writer.add_add_space_prefix(config["add_prefix_space"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with _quiet("gguf"):  # gguf-py warns about pair templates (TemplateProcessing) that llama.cpp never uses
        gguf.SpecialVocab(path, load_merges=True).add_to_gguf(writer, quiet=True)


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _bpe_vocab(path: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types by id (the converter's ``get_vocab_base``); ids without a token are padding."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise AutompError(f"the tokenizer in {path} has ids beyond the model's vocab_size {vocab_size}")
    by_id = {i: token for token, i in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                kind = gguf.TokenType.CONTROL
            else:
                kind, token = gguf.TokenType.USER_DEFINED, token.replace("\u2581", " ")  # pre-normalized spaces
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _looks_special(token: str) -> bool:
    """The converter's ``does_token_look_special``: added tokens that are control tokens though not marked so."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )
