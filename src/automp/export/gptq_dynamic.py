"""Export an allocation as a GPTQModel ``quantize_config.json`` with per-module ``dynamic`` overrides.

This is a recipe: GPTQModel re-quantizes the 16-bit model with it (``--format gptq`` carries automp's own
weights instead). GPTQModel (and vLLM's GPTQ loaders) read ``dynamic`` as an ordered mapping from regex
keys to overrides. A ``+:`` key (or no prefix) replaces the top-level ``bits``/``group_size``/``sym`` for
modules it matches; a ``-:`` key leaves them unquantized. The first matching key wins, and keys match
with ``re.match`` against the full module name. Keys here are escaped full names anchored at both ends
(``+:^model\\.layers\\.1\\.mlp\\.down_proj$``), so ``layers.1`` never matches ``layers.10``; GPTQModel
also looks such literal keys up exactly instead of running the regex.

The top level holds the format that covers the most weights. Only layers that differ from it get a
key: other integer formats get ``+:``, 16-bit layers get ``-:``. vLLM matches keys against its own
module names, in which q/k/v and gate/up are one fused module (``self_attn.qkv_proj``,
``mlp.gate_up_proj``); a fused group whose members share one overridden format also gets a key for
that fused name (it matches no Hugging Face module). GPTQ has no codebooks, so nf4/fp4 layers (and
GGUF-type layers) become integer layers of the same bits and group size, and a warning lists them.
Per-channel formats are ``group_size: -1``. automp's act-order GPTQ with static groups corresponds to
GPTQModel's ``desc_act: true`` with ``static_groups: true``; GPTQModel reads both at the top level.
A run with ``+rN`` layers is refused: their low-rank corrections fit automp's quantization error, not the
weights GPTQModel would produce from the recipe.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from automp.export.peft_adapter import recipe_reason, refuse_corrections
from automp.export.run_dir import RunDir
from automp.formats import Format

CONFIG_FILE = "quantize_config.json"
VLLM_FUSED = {("k_proj", "q_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


def gptq_fields(fmt: Format) -> dict:
    """GPTQ's bits/group_size/sym for a quantized automp format (codebooks map to integer 4-bit)."""
    return {"bits": fmt.bits, "group_size": fmt.group_size or -1, "sym": fmt.symmetric}


def module_key(name: str) -> str:
    """A regex that ``re.match``-es exactly the module ``name`` and nothing else."""
    return "^" + re.escape(name) + "$"


def vllm_fused_name(group: list[str]) -> str | None:
    """vLLM's name for the module it fuses ``group`` into (``...self_attn.qkv_proj``), if it follows Llama's names."""
    parents = {name.rsplit(".", 1)[0] for name in group}
    fused = VLLM_FUSED.get(tuple(sorted(name.rsplit(".", 1)[-1] for name in group)))
    return f"{parents.pop()}.{fused}" if fused and len(parents) == 1 else None


def dynamic_overrides(run: RunDir) -> tuple[dict, dict]:
    """The top-level fields (the format with the most weights) and the ordered ``dynamic`` overrides."""
    layers = run.inventory.layers
    formats = {layer.name: run.allocation.format_of(layer.name) for layer in layers}
    weights = Counter()
    for layer in layers:
        if formats[layer.name].quantized:
            weights[tuple(gptq_fields(formats[layer.name]).items())] += layer.numel
    default = dict(weights.most_common(1)[0][0]) if weights else {"bits": 4, "group_size": 128, "sym": True}

    def override(fmt: Format) -> tuple[str, dict] | None:
        if not fmt.quantized:
            return "-:", {}
        return ("+:", gptq_fields(fmt)) if gptq_fields(fmt) != default else None

    dynamic = {}
    for layer in layers:
        if (found := override(formats[layer.name])) is not None:
            dynamic[found[0] + module_key(layer.name)] = found[1]
    for group in run.inventory.fused:  # vLLM's fused modules, when the group shares one overridden format
        fused = vllm_fused_name(group)
        shared = {formats[name] for name in group}
        if fused and len(shared) == 1 and (found := override(shared.pop())) is not None:
            dynamic[found[0] + module_key(fused)] = found[1]
    return default, dynamic


def gptq_config(run: RunDir, *, desc_act: bool, static_groups: bool, checkpoint_format: str) -> dict:
    """The GPTQModel quantization config of ``run``'s allocation (``quantize_config.json``'s content)."""
    default, dynamic = dynamic_overrides(run)
    head = next((layer for layer in run.inventory.layers if layer.role == "lm_head"), None)
    meta = {"quantizer": [f"automp:{version('automp')}"], "damp_percent": run.settings.get("damp", 0.01)}
    return {
        **default,
        "desc_act": desc_act,
        "static_groups": static_groups,
        "lm_head": head is not None and run.allocation.format_of(head.name).quantized,
        "quant_method": "gptq",
        "format": checkpoint_format,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "dynamic": dynamic,
        "meta": meta,
    }


def export_gptq_dynamic(run: RunDir, out: Path) -> dict:
    """Write ``quantize_config.json`` into ``out``; returns the default fields, the override count and warnings."""
    refuse_corrections(run, "gptq-dynamic", recipe_reason("GPTQModel"))
    settings = run.settings
    act_order = settings.get("method") == "gptq" and bool(settings.get("act_order", True))
    config = gptq_config(run, desc_act=act_order, static_groups=act_order, checkpoint_format="gptq")
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    formats = {name: run.allocation.format_of(name) for name in run.allocation.formats}
    others = [f"{name} ({fmt.name})" for name, fmt in formats.items() if fmt.quantized and fmt.kind != "int"]
    warnings = []
    if others:
        warnings.append("GPTQ has integer formats only; these layers are written as integer layers of the same bits "
                        "and group size: " + ", ".join(others))  # fmt: skip
    default = {key: config[key] for key in ("bits", "group_size", "sym")}
    return {"default": default, "overrides": len(config["dynamic"]), "desc_act": act_order, "warnings": warnings}
