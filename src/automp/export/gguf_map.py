"""Export an allocation as llama.cpp ``llama-quantize --tensor-type`` overrides (the nearest GGUF type per tensor).

llama.cpp quantizes from its own 16-bit GGUF file, so this export is a recipe, not weights: run
``llama-quantize $(cat tensor_types.txt) model-f16.gguf model-automp.gguf BASE_TYPE`` to reproduce the
allocation. ``llama-quantize`` matches each ``NAME=TYPE`` pattern against tensor names with
``std::regex_search``, and the first match wins. Names are written in full (``blk.3.ffn_down.weight``),
so each pattern matches exactly one tensor.

============================  =========  ========================================================
automp format                 GGUF type  bits per weight as stored (block bytes * 8 / block size)
============================  =========  ========================================================
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
``attn_output``, ``blk.N.ffn_gate``/``ffn_up``/``ffn_down`` (``fc1``/``fc2`` map to ``ffn_up``/``ffn_down``)
and ``output`` for ``lm_head``. automp keeps the embeddings and, unless it was quantized, ``lm_head``
in 16-bit, so the argument list also pins ``--token-embedding-type F16`` and
``--output-tensor-type``. K-quants need rows of a multiple of 256 and the others rows of a multiple of
32. llama.cpp substitutes a fallback type for other shapes, and those tensors are reported as warnings.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from automp.errors import AutompError
from automp.export.run_dir import RunDir
from automp.formats import Format

ARGS_FILE = "tensor_types.txt"
MAP_FILE = "gguf_map.json"
GGUF_BITS = {  # bits per weight as stored
    "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K": 4.5,
    "Q3_K": 3.4375, "Q2_K": 2.625, "IQ4_NL": 4.5, "MXFP4": 4.25,
}  # fmt: skip
GGUF_BLOCK = {"Q4_K": 256, "Q3_K": 256, "Q2_K": 256, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "IQ4_NL": 32, "MXFP4": 32}
GGUF_NAMES = {  # automp role -> llama.cpp tensor name inside blk.N
    "q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv", "o": "attn_output",
    "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down", "fc1": "ffn_up", "fc2": "ffn_down",
}  # fmt: skip


def gguf_type(fmt: Format) -> str:
    """The nearest GGUF tensor type to an automp format."""
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
    if role == "lm_head":
        return "output.weight"
    if role not in GGUF_NAMES:
        raise AutompError(f"no llama.cpp tensor name is known for layer {name} (role {role!r})")
    return f"blk.{block}.{GGUF_NAMES[role]}.weight"


def export_gguf_map(run: RunDir, out: Path) -> dict:
    """Write ``tensor_types.txt`` (llama-quantize arguments) and ``gguf_map.json`` (mapping and bits) into ``out``."""
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
    weights = Counter()
    for row in rows:
        weights[row["gguf_type"]] += row["numel"]
    base = weights.most_common(1)[0][0]
    head = next((row["gguf_type"] for row in rows if row["tensor"] == "output.weight"), "F16")
    args = ["--token-embedding-type F16", f"--output-tensor-type {head}"]
    args += [f"--tensor-type {row['tensor']}={row['gguf_type']}" for row in rows if row["tensor"] != "output.weight"]
    (out / ARGS_FILE).write_text("\n".join(args) + "\n")

    total = sum(row["numel"] for row in rows)
    report = {
        "base_type": base,
        "command": f"llama-quantize $(cat {ARGS_FILE}) model-f16.gguf model-automp.gguf {base}",
        "avg_bits_automp": sum(row["automp_bits"] * row["numel"] for row in rows) / total,
        "avg_bits_gguf": sum(row["gguf_bits"] * row["numel"] for row in rows) / total,
        "gguf_bits_per_type": {kind: GGUF_BITS[kind] for kind in sorted(weights)},
        "tensors": rows,
        "warnings": _fallback_warnings(run, rows),
    }
    (out / MAP_FILE).write_text(json.dumps(report, indent=1))
    return {key: value for key, value in report.items() if key != "tensors"}


def _fallback_warnings(run: RunDir, rows: list[dict]) -> list[str]:
    in_features = {layer.name: layer.in_features for layer in run.inventory.layers}
    misfits = [f"{row['tensor']} ({row['gguf_type']}, row of {in_features[row['layer']]})" for row in rows
               if in_features[row["layer"]] % GGUF_BLOCK.get(row["gguf_type"], 1)]  # fmt: skip
    if not misfits:
        return []
    return ["llama.cpp substitutes a fallback type where a row is not a multiple of the type's block (256 for "
            "K-quants, 32 otherwise): " + ", ".join(misfits)]  # fmt: skip
