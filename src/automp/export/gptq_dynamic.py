"""Export an allocation as a GPTQModel ``quantize_config.json`` with per-module ``dynamic`` overrides.

GPTQModel (and vLLM's GPTQ loader) read ``dynamic`` as an ordered mapping from regex keys to
overrides. A ``+:`` key (or no prefix) replaces the top-level ``bits``/``group_size``/``sym`` for
modules it matches; a ``-:`` key leaves them unquantized. The first matching key wins, and keys
match with ``re.match`` against the full module name. Keys here are escaped full names anchored with ``$``
(``+:model\\.layers\\.1\\.mlp\\.down_proj$``), so ``layers.1`` never matches ``layers.10``.

The top level holds the format that covers the most weights. Only layers that differ from it get a
key: other integer formats get ``+:``, 16-bit layers get ``-:``. GPTQ has no codebooks, so nf4/fp4 layers
become integer 4-bit with the same group size, and a warning lists them. Per-channel formats are
``group_size: -1``. automp's act-order GPTQ with static groups corresponds to GPTQModel's
``desc_act: true`` with ``static_groups: true``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from automp.export.run_dir import RunDir
from automp.formats import Format

CONFIG_FILE = "quantize_config.json"


def gptq_fields(fmt: Format) -> dict:
    """GPTQ's bits/group_size/sym for a quantized automp format (codebooks map to integer 4-bit)."""
    return {"bits": fmt.bits, "group_size": fmt.group_size or -1, "sym": fmt.symmetric}


def export_gptq_dynamic(run: RunDir, out: Path) -> dict:
    """Write ``quantize_config.json`` into ``out``; returns the default fields, the override count and warnings."""
    layers = run.inventory.layers
    formats = {layer.name: run.allocation.format_of(layer.name) for layer in layers}
    weights = Counter()
    for layer in layers:
        if formats[layer.name].quantized:
            weights[tuple(gptq_fields(formats[layer.name]).items())] += layer.numel
    default = dict(weights.most_common(1)[0][0]) if weights else {"bits": 4, "group_size": 128, "sym": True}
    dynamic = {}
    for layer in layers:
        fmt, key = formats[layer.name], re.escape(layer.name) + "$"
        if not fmt.quantized:
            dynamic["-:" + key] = {}
        elif gptq_fields(fmt) != default:
            dynamic["+:" + key] = gptq_fields(fmt)
    settings = run.settings
    act_order = settings.get("method") == "gptq" and bool(settings.get("act_order", True))
    head = next((layer for layer in layers if layer.role == "lm_head"), None)
    config = {
        **default,
        "desc_act": act_order,
        "lm_head": head is not None and formats[head.name].quantized,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "dynamic": dynamic,
        "meta": {
            "quantizer": [f"automp:{version('automp')}"],
            "damp_percent": settings.get("damp", 0.01),
            "static_groups": act_order,
        },
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    codebooks = [f"{name} ({fmt.name})" for name, fmt in formats.items() if fmt.quantized and fmt.kind != "int"]
    warnings = []
    if codebooks:
        warnings.append("GPTQ has no codebook formats; these layers are written as integer 4-bit with the same "
                        "group size: " + ", ".join(codebooks))  # fmt: skip
    return {"default": default, "overrides": len(dynamic), "desc_act": act_order, "warnings": warnings}
