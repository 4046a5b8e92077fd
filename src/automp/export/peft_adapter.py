"""The low-rank corrections of ``+rN`` layers as a PEFT LoRA adapter, and the exports that refuse them.

A ``+rN`` layer computes ``W = Q + B A`` (``quantizers/lowrank.py``): ``Q`` in the base format and the fp16
factors ``A`` (r x in) and ``B`` (out x r). A deployable export writes ``Q`` like any other layer, in
``fmt.base``, and the factors beside it as a LoRA adapter in the export's ``adapter/`` folder (``ADAPTER_DIR``):

* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r, in) and
  ``base_model.model.<module>.lora_B.weight`` (out, r) per corrected module, automp's fp16 factors as they are,
  so its payload is exactly the formats' ``correction_bits`` / 8;
* ``adapter_config.json``: PEFT's own ``LoraConfig`` serialization with ``target_modules`` the exact module names,
  ``r`` and ``lora_alpha`` the largest rank, and ``rank_pattern`` / ``alpha_pattern`` giving each module its own
  rank as both r and alpha, so that every module's scale ``alpha / r`` is exactly 1; no dropout, no bias,
  ``task_type`` ``CAUSAL_LM``. ``base_model_name_or_path`` is left empty: the base is the export directory
  itself (the adapter's parent), wherever it is moved.

Loading without automp: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT), OUT / "adapter")``
(transformers decompresses the base, PEFT adds ``B A x`` on top), or, in vLLM,
``vllm serve OUT --enable-lora --lora-modules automp=OUT/adapter --max-lora-rank R``.

What the engines serve (sources read for this export):

* PEFT matches ``rank_pattern``/``alpha_pattern`` keys as ``(.*\\.)?(KEY)$`` regexes against module names
  (``peft.utils.other.get_pattern_key``); an exact module name matches only that module. PEFT's own LoRA conversion
  writes the same per-module rank-as-alpha patterns (``peft/tuners/lora/conversion.py``).
* vLLM applies LoRA on top of any quantized linear method, compressed-tensors and GPTQ included (LoRA layers call
  ``base_layer.quant_method.apply`` and add the adapter; https://github.com/vllm-project/vllm/pull/4012, status
  table in https://github.com/vllm-project/vllm/issues/29424). It reads ``r``, ``lora_alpha`` and ``use_rslora``
  only and ignores ``rank_pattern``/``alpha_pattern``: its scale is ``lora_alpha / r`` for the whole adapter
  (``vllm/lora/peft_helper.py``), 1 here because both are the largest rank; each module's factors are copied into
  max-rank slots by their own shape and zero-padded (``set_lora``), so smaller ranks are served exactly.
  ``--max-lora-rank`` must be at least the adapter's ``r`` and one of the values vLLM accepts
  (``vllm_support.py``: the report's ``vllm_max_lora_rank``, None where no value serves it, and ``lora_warnings``).
  q/k/v and gate/up adapters are packed into vLLM's fused modules, each with its own rank.
  https://github.com/vllm-project/vllm/issues/50059 reports unstable outputs for large all-layer adapters on
  compressed-tensors int4 bases in vLLM 0.17-0.24 (open).
* llama.cpp's ``convert_lora_to_gguf.py --base DIR ADAPTER`` writes one ``adapter.lora.alpha`` (``lora_alpha``)
  and llama.cpp scales each tensor by ``alpha / rank`` of that tensor, or by 1 when alpha is 0
  (``llama_adapter_lora_weight::get_scale``). automp writes no llama.cpp base for automp's integer formats, and
  compressed-tensors cannot hold GGUF formats, so no llama.cpp route exists for a ``+rN`` run yet.
* GPTQModel's own adapter loader (``gptqmodel/adapter/adapter.py``, ``Lora(path, rank)``) reads one safetensors
  file keyed ``<module>.lora_A.weight`` (no PEFT prefix) and expects every quantized module to have one.

Exports that cannot carry the corrections (``gptq``, ``gguf``, ``gguf-map``, ``gptq-dynamic``) refuse such a run
with one error from :func:`refuse_corrections`, before anything is written.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from automp.checkpoint import payload_bytes
from automp.errors import AutompError
from automp.export.run_dir import RunDir, listing
from automp.export.vllm_support import vllm_max_lora_rank
from automp.quantizers.lowrank import LowRankCorrection
from automp.quantizers.qweight import CorrectedWeight, QWeight

ADAPTER_DIR = "adapter"  # inside the export directory
ADAPTER_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix for the wrapped model's parameters
CORRECTION_ROUTE = (
    "--format compressed-tensors writes them as a PEFT LoRA adapter beside the quantized base "
    f"({ADAPTER_DIR}/, for vLLM --enable-lora or transformers with PEFT)"
)


def split_corrections(qweights: dict[str, QWeight]) -> tuple[dict[str, QWeight], dict[str, LowRankCorrection]]:
    """Every layer's quantized base (``fmt.base``), and the corrections of the ``+rN`` layers by name."""
    bases = {name: q.base if isinstance(q, CorrectedWeight) else q for name, q in qweights.items()}
    corrections = {name: q.correction for name, q in qweights.items() if isinstance(q, CorrectedWeight)}
    return bases, corrections


def write_adapter(out: Path, corrections: dict[str, LowRankCorrection]) -> dict:
    """Write ``out/adapter/`` (PEFT's config and ``adapter_model.safetensors``); returns what it holds."""
    from peft import LoraConfig, TaskType

    folder = Path(out) / ADAPTER_DIR
    folder.mkdir()
    ranks = {name: c.rank for name, c in corrections.items()}
    top = max(ranks.values())
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=top,
        lora_alpha=top,  # vLLM's one scale, lora_alpha / r, is 1
        target_modules=sorted(ranks),
        rank_pattern=ranks,
        alpha_pattern=ranks,  # PEFT's per-module scale alpha / r is 1 too
        lora_dropout=0.0,
        bias="none",
        inference_mode=True,
        base_model_name_or_path=None,  # the export directory, the adapter's parent
    )
    config.save_pretrained(str(folder))
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(corrections):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = corrections[name].A.contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = corrections[name].B.contiguous()  # (out, r)
    save_file(tensors, folder / ADAPTER_FILE, metadata={"format": "pt"})
    return {
        "dir": ADAPTER_DIR,
        "modules": len(ranks),
        "max_rank": top,
        "modules_by_rank": dict(sorted(Counter(ranks.values()).items())),
        "bytes": payload_bytes(folder / ADAPTER_FILE),
        "vllm_max_lora_rank": vllm_max_lora_rank(top),
    }


def recipe_reason(tool: str) -> str:
    """Why a recipe export cannot carry corrections: ``tool`` quantizes again and makes other weights."""
    return (
        f"{tool} quantizes the model again from this recipe, and the corrections fit automp's own quantization "
        f"error, not the weights {tool} makes"
    )


def refuse_corrections(run: RunDir, export_format: str, why: str, advice: str = CORRECTION_ROUTE) -> None:
    """One AutompError naming every ``+rN`` layer of ``run`` (none: nothing happens), for an export that cannot
    carry the corrections: ``why`` says why, ``advice`` what to do instead."""
    ranked = sorted(f"{lay.name} ({run.allocation.formats[lay.name]})" for lay in run.inventory.layers
                    if run.allocation.format_of(lay.name).rank)  # fmt: skip
    if ranked:
        raise AutompError(
            f"--format {export_format} cannot carry low-rank corrections (+rN): {why}. {advice}. "
            f"Layers with corrections: {listing(ranked)}"
        )
