"""Export an allocation as a llama.cpp ``llama-quantize`` recipe: one GGUF tensor type per tensor.

llama.cpp quantizes from its own 16-bit GGUF file, so this export is a recipe, not weights (``--format
gguf`` writes automp's own weights instead). ``gguf_map.json`` names its engine ``llama.cpp`` and gives the
whole command sequence: ``convert_hf_to_gguf.py`` (the original model to ``model-f16.gguf``), optionally
``llama-imatrix`` on the run's calibration text, then::

    llama-quantize --token-embedding-type EMBD --output-tensor-type HEAD --tensor-type-file tensor_types.txt \
        model-f16.gguf model-automp.gguf BASE

(``--imatrix imatrix.gguf`` after the optional step), and ``llama-perplexity`` on the result; file names are
relative to the export directory. ``tensor_types.txt`` holds bare ``NAME=TYPE`` lines, one per tensor
(llama-quantize reads the file as whitespace-separated ``--tensor-type`` values), and is complete on its
own. ``tensor_types.args`` holds the equivalent arguments, for ``$(cat tensor_types.args)``:
``--token-embedding-type``, ``--output-tensor-type`` and one ``--tensor-type NAME=TYPE`` per layer.

llama-quantize matches each ``NAME`` as a regular expression (``std::regex_search``) against the tensor
names, and the first match wins. Names are written in full (``blk.3.ffn_down.weight``), each matching only
its own tensor; ``output.weight`` (which would also match ``blk.N.attn_output.weight``) comes last. The
overrides apply only when the base type is a quantized type: with ``F16`` or ``BF16`` as base,
llama-quantize skips its per-tensor logic and ignores every ``--tensor-type``. So ``BASE`` is the quantized
type holding the most weights (``Q8_0`` when nothing is quantized), and every tensor, 16-bit ones included,
gets its own override.

A layer already in a GGUF format (``q4_k``, ``q8_0``, ...) keeps its type (``Format.ggml_type``); automp's
own formats get the nearest type:

============================  =========  ========================================================
automp format                 GGUF type  bits per weight as stored (block bytes * 8 / block size)
============================  =========  ========================================================
q2_k ... q8_0, iq4_nl         the same   (Q5_K 5.5, Q6_K 6.5625; the others below)
w8, w8g*, w8g*a               Q8_0       8.5      (32 int8 + fp16 scale)
w4g32                         Q4_0       4.5      (32 x 4 bit + fp16 scale)
w4g32a                        Q4_1       5.0      (32 x 4 bit + fp16 scale + fp16 min)
w4, w4g64, w4g128 (and ...a)  Q4_K       4.5      (256-superblock: 6-bit sub-scales and mins)
w3, w3g* (and ...a)           Q3_K       3.4375
w2, w2g* (and ...a)           Q2_K       2.625
nf4g*                         IQ4_NL     4.5      (non-linear 4-bit codebook, blocks of 32)
fp4g*                         MXFP4      4.25     (e2m1, blocks of 32, power-of-two scale)
fp16 / bf16                   F16 / BF16 16
============================  =========  ========================================================

Tensor names follow llama.cpp's converter: ``blk.N.attn_q``/``attn_k``/``attn_v``/``attn_qkv``/
``attn_output``, ``blk.N.ffn_gate``/``ffn_up``/``ffn_down`` (``fc1``/``fc2`` map to ``ffn_up``/``ffn_down``),
``token_embd`` for the token embedding and ``output`` for ``lm_head``. ``EMBD`` and ``HEAD`` are their
allocated types when the run allocated them (``--embeddings``, ``--lm-head``), else F16 (a tied head is no
tensor of its own). K-quants need rows of a multiple of 256 and the
others rows of a multiple of 32. llama.cpp substitutes a fallback type for other shapes, and those tensors
are reported as warnings. A run with ``+rN`` layers is refused: their low-rank corrections fit automp's
quantization error, not the weights llama-quantize would produce.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from automp.errors import AutompError
from automp.export.peft_adapter import recipe_reason, refuse_corrections
from automp.export.run_dir import RunDir
from automp.formats import Format
from automp.model import EMBED_ROLE, HEAD_ROLE

TYPES_FILE = "tensor_types.txt"  # for llama-quantize --tensor-type-file
ARGS_FILE = "tensor_types.args"  # the same as command-line arguments
MAP_FILE = "gguf_map.json"
GGUF_BITS = {  # bits per weight as stored
    "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q4_0": 4.5, "Q4_1": 5.0,
    "Q4_K": 4.5, "Q3_K": 3.4375, "Q2_K": 2.625, "IQ4_NL": 4.5, "MXFP4": 4.25,
}  # fmt: skip
GGUF_BLOCK = {"Q6_K": 256, "Q5_K": 256, "Q4_K": 256, "Q3_K": 256, "Q2_K": 256,
              "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "IQ4_NL": 32, "MXFP4": 32}  # fmt: skip
BASE_FTYPES = {"MXFP4": "MXFP4_MOE"}  # llama-quantize's file-type name where it differs from the tensor type
GGUF_NAMES = {  # automp role -> llama.cpp tensor name inside blk.N
    "q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv", "o": "attn_output",
    "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down", "fc1": "ffn_up", "fc2": "ffn_down",
}  # fmt: skip
EMBEDDING_TYPE = "F16"  # an embedding or head automp did not allocate: the converter's --outtype f16, kept


def gguf_type(fmt: Format) -> str:
    """The GGUF tensor type of an automp format: its own for GGUF formats, else the nearest."""
    if fmt.kind == "gguf":
        return fmt.ggml_type
    if not fmt.quantized:
        return "BF16" if fmt.name == "bf16" else "F16"
    if fmt.kind == "nf4":
        return "IQ4_NL"
    if fmt.kind == "fp4":
        return "MXFP4"
    if fmt.bits == 8:
        return "Q8_0"
    if fmt.bits == 4 and fmt.group_size == 32:
        return "Q4_0" if fmt.symmetric else "Q4_1"
    return f"Q{fmt.bits}_K"


def gguf_tensor_name(role: str, block: int, name: str) -> str:
    if role == HEAD_ROLE:
        return "output.weight"
    if role == EMBED_ROLE:
        return "token_embd.weight"
    if role not in GGUF_NAMES:
        raise AutompError(f"no llama.cpp tensor name is known for layer {name} (role {role!r})")
    return f"blk.{block}.{GGUF_NAMES[role]}.weight"


def export_gguf_map(run: RunDir, out: Path) -> dict:
    """Write ``tensor_types.txt``, ``tensor_types.args`` and ``gguf_map.json`` into ``out``; returns the report."""
    refuse_corrections(run, "gguf-map", recipe_reason("llama-quantize"))
    rows = _rows(run)
    weights = Counter()
    for row in rows:
        weights[row["gguf_type"]] += row["numel"]
    quantized = [kind for kind, _ in weights.most_common() if kind not in ("F16", "BF16")]
    base = quantized[0] if quantized else "Q8_0"  # a 16-bit base would disable every override
    layers = [row for row in rows if row["tensor"] not in ("output.weight", "token_embd.weight")]
    head = next((row["gguf_type"] for row in rows if row["tensor"] == "output.weight"), EMBEDDING_TYPE)
    embd = next((row["gguf_type"] for row in rows if row["tensor"] == "token_embd.weight"), EMBEDDING_TYPE)
    tied = getattr(run.config, "tie_word_embeddings", False) and not any(r["tensor"] == "output.weight" for r in rows)
    types = [("token_embd.weight", embd)] + [(row["tensor"], row["gguf_type"]) for row in layers]
    types += [] if tied else [("output.weight", head)]  # last: it would also match blk.N.attn_output.weight
    (out / TYPES_FILE).write_text("".join(f"{name}={kind}\n" for name, kind in types))
    args = [f"--token-embedding-type {embd}", f"--output-tensor-type {head}"]
    args += [f"--tensor-type {row['tensor']}={row['gguf_type']}" for row in layers]
    (out / ARGS_FILE).write_text("\n".join(args) + "\n")

    total = sum(row["numel"] for row in rows)
    report = {
        "engine": "llama.cpp",
        "base_type": base,
        "token_embedding_type": embd,
        "output_tensor_type": head,
        "commands": _commands(run, BASE_FTYPES.get(base, base), embd, head),
        "avg_bits_automp": sum(row["automp_bits"] * row["numel"] for row in rows) / total,
        "avg_bits_gguf": sum(row["gguf_bits"] * row["numel"] for row in rows) / total,
        "gguf_bits_per_type": {kind: GGUF_BITS[kind] for kind in sorted(weights)},
        "tensors": rows,
        "warnings": _fallback_warnings(run, rows),
    }
    (out / MAP_FILE).write_text(json.dumps(report, indent=1))
    return {key: value for key, value in report.items() if key != "tensors"}


def _rows(run: RunDir) -> list[dict]:
    rows = []
    for layer in run.inventory.layers:
        fmt = run.allocation.format_of(layer.name)
        kind = gguf_type(fmt)
        rows.append({
            "layer": layer.name,
            "tensor": gguf_tensor_name(layer.role, layer.block, layer.name),
            "automp_format": fmt.name,
            "automp_bits": fmt.bits_per_weight(layer.out_features, layer.in_features),
            "gguf_type": kind,
            "gguf_bits": GGUF_BITS[kind],
            "numel": layer.numel,
        })  # fmt: skip
    return rows


def _commands(run: RunDir, base: str, embd: str, head: str) -> dict:
    """The llama.cpp command sequence, with the run's own model and calibration text where they are files."""
    settings = run.settings
    model = settings.get("model") or "MODEL_DIR"
    calib = next((text for text in (settings.get("calib") or "").split(",") if text.endswith(".txt")), "CALIB.txt")
    ctx = settings.get("seqlen") or 512
    quantize = f"llama-quantize --token-embedding-type {embd} --output-tensor-type {head} --tensor-type-file"
    return {  # in order; the imatrix step and quantize_imatrix replace quantize when an importance matrix is wanted
        "convert": f"python convert_hf_to_gguf.py {model} --outtype f16 --outfile model-f16.gguf",
        "imatrix": f"llama-imatrix -m model-f16.gguf -f {calib} -c {ctx} -o imatrix.gguf",
        "quantize": f"{quantize} {TYPES_FILE} model-f16.gguf model-automp.gguf {base}",
        "quantize_imatrix": f"{quantize} {TYPES_FILE} --imatrix imatrix.gguf model-f16.gguf model-automp.gguf {base}",
        "quantize_args": f"llama-quantize $(cat {ARGS_FILE}) model-f16.gguf model-automp.gguf {base}",
        "perplexity": f"llama-perplexity -m model-automp.gguf -f TEXT.txt -c {ctx}",
    }


def _fallback_warnings(run: RunDir, rows: list[dict]) -> list[str]:
    in_features = {layer.name: layer.in_features for layer in run.inventory.layers}
    misfits = [f"{row['tensor']} ({row['gguf_type']}, row of {in_features[row['layer']]})" for row in rows
               if in_features[row["layer"]] % GGUF_BLOCK.get(row["gguf_type"], 1)]  # fmt: skip
    if not misfits:
        return []
    return ["llama.cpp substitutes a fallback type where a row is not a multiple of the type's block (256 for "
            "K-quants, 32 otherwise): " + ", ".join(misfits)]  # fmt: skip
