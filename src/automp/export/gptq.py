"""Export to a GPTQ checkpoint holding automp's own codes and scales: GPTQModel and vLLM load it, nothing is
re-quantized (``--format gptq-dynamic`` is the recipe instead, for GPTQModel to quantize again).

Each quantized layer ``NAME`` stores GPTQ's four tensors, from the stored codes, fp16 scales and zero-points:

* ``NAME.qweight``: int32 ``(in * bits / 32, out)``, the codes packed along the input dimension;
* ``NAME.qzeros``: int32 ``(groups, out * bits / 32)``, the zero-points packed along the output dimension;
* ``NAME.scales``: fp16 ``(groups, out)``, automp's scales transposed;
* ``NAME.g_idx``: int32 ``(in,)``, the group of each input column, ``col // group_size``.

Packing is GPTQ's: the values along the packed dimension form one little-endian bit stream, value ``i``
in stream bits ``[i * bits, (i + 1) * bits)``, 32 stream bits per int32 word. For 2/4/8 bits that is
``32 / bits`` values per word, the first in the lowest bits; for 3 bits, 32 values fill 3 words and values
10 and 21 straddle two words (GPTQ's "10 | 1 | 10 | 1 | 10" packer, and GPTQModel's unpack tables). So
the packed dimension must hold a whole number of words: ``in * bits`` and ``out * bits`` divisible by 32.

GPTQ dequantizes ``(code - zero) * scale``, automp's formula. Symmetric formats store the fixed zero
``2**(bits - 1)``, as GPTQ does for ``sym: true``. The checkpoint format is GPTQ v1 (``checkpoint_format:
gptq``), which stores ``zero - 1`` and which every loader reads; v1 cannot hold a zero-point of 0 (the
stored -1 overflows its field), so a run with an asymmetric zero-point of 0 is written as ``gptq_v2``
(zeros as they are), which GPTQModel and vLLM's ``gptq`` kernel (not older loaders) read. Per-channel
formats are ``group_size: -1``: one group of ``in`` columns, scales and qzeros with one row, ``g_idx`` all 0.

automp's act-order GPTQ fits its groups up front ("static groups") and keeps the codes in the original
column order, so the groups are contiguous and ``g_idx = arange(in) // group_size``: exactly the layout of
a checkpoint quantized without act-order. The config says ``desc_act: false`` (and ``static_groups:
false``, which only matters when quantizing); loaders then skip the act-order permutation and may use
their faster kernels, with identical results.

``config.json`` carries ``quantization_config`` (also written as ``quantize_config.json``): the format
with the most weights at the top level and ``dynamic`` overrides for the other layers, ``-:`` for 16-bit
ones, the same keys as ``--format gptq-dynamic``. The other tensors (embeddings, norms, 16-bit layers,
``lm_head`` unless quantized) are stored in fp16 in ``model.safetensors``. Refused with one error, before
anything is written: codebook (nf4, fp4) and GGUF-type layers, which GPTQ's integer grid cannot express,
and layers whose dimensions do not pack into whole int32 words, and ``+rN`` layers, whose low-rank corrections
GPTQ has no tensors for (``--format compressed-tensors`` writes them as a PEFT LoRA adapter, ``peft_adapter.py``).

Which kernels serve what (read from GPTQModel 7.6 and vLLM's ``gptq.py``/``gptq_marlin.py``/``gptq_utils.py``):

* GPTQModel, torch backend (CPU or GPU, fp16/bf16): 2/3/4/8 bits, symmetric and asymmetric, groups
  -1/16/32/64/128 and larger, both checkpoint formats; ``dynamic`` is honoured per module. Every layer
  this export writes.
* vLLM ``gptq_marlin`` (CUDA, compute capability 8.0+, fp16/bf16): symmetric 4- and 8-bit only, groups
  -1/32/64/128, best with ``out % 64 == 0`` and ``in % 128 == 0``. vLLM picks it whenever the top-level
  format fits; a ``dynamic`` override outside it (3-bit, 2-bit, asymmetric) then fails at load.
* vLLM ``gptq`` (exllama ``gptq_gemm``, fp16 only): 2/3/4/8 bits, symmetric and asymmetric through the
  stored zero-points, v1 and (recent vLLM) v2. ``--quantization gptq`` forces it for a whole checkpoint,
  4-bit layers included, whose ``gptq_gemm`` path vLLM itself logs as buggy (it recommends Marlin).
* vLLM honours ``dynamic`` (``-:`` skips, ``+:`` overrides bits/group_size/desc_act, and sym for Marlin),
  but matches keys against its own module names, where q/k/v and gate/up are fused into one module with
  one format: the keys for the fused names (see ``gptq_dynamic``) cover groups that share a format, and a
  group with mixed formats cannot load.
* transformers loads GPTQ checkpoints only through optimum and gptqmodel, which are not automp's
  dependencies.

``--engine vllm`` (the default) lists the layers each vLLM limit concerns as warnings.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from automp.checkpoint import DENSE_TENSORS, payload_bytes, quantized_bytes
from automp.errors import AutompError
from automp.export.gptq_dynamic import CONFIG_FILE, gptq_config
from automp.export.peft_adapter import refuse_corrections
from automp.export.run_dir import RunDir, listing
from automp.export.vllm_support import MARLIN_GROUPS, fused_warnings, tiling_warnings
from automp.formats import Format
from automp.quantizers.qweight import QuantizedWeight

MODEL_FILE = "model.safetensors"
AUX_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
             "generation_config.json", "chat_template.*")  # fmt: skip
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
KERNELS = {  # what each engine's kernels serve, as the report states it
    "gptqmodel-torch": "2/3/4/8-bit, sym and asym, groups -1/16/32/64/128+, fp16/bf16, CPU or GPU; dynamic honoured",
    "vllm-gptq_marlin": "4/8-bit sym only, groups -1/32/64/128, fp16/bf16, CUDA sm80+; chosen when the top level fits",
    "vllm-gptq": "2/3/4/8-bit, sym and asym (stored zero-points), fp16 only; forced with --quantization gptq",
}


def pack_int32(values: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers along ``dim`` into int32 words, GPTQ's little-endian bit stream."""
    v = values.movedim(dim, 0).to(torch.int64)
    span = 32 // math.gcd(bits, 32)  # values that fill a whole number of words: 32 // bits, or 32 for 3 bits
    if v.shape[0] % span:
        raise AutompError(f"{v.shape[0]} values of {bits} bits do not fill whole int32 words")
    if v.numel() and (v.min() < 0 or v.max() >= 2**bits):
        raise AutompError(f"values outside 0..{2**bits - 1} cannot be packed in {bits} bits")
    v = v.reshape(-1, span, *v.shape[1:])
    words = []
    for word in range(bits * span // 32):
        packed = torch.zeros_like(v[:, 0])
        for k in range(span):
            shift = bits * k - 32 * word  # where value k starts, relative to this word's lowest bit
            if -bits < shift < 32:
                packed |= v[:, k] << shift if shift >= 0 else v[:, k] >> -shift
        words.append(packed & 0xFFFFFFFF)
    stream = torch.stack(words, dim=1).flatten(0, 1)
    signed = torch.where(stream >= 2**31, stream - 2**32, stream).to(torch.int32)
    return signed.movedim(0, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """The inverse of ``pack_int32``: uint8 values, ``32 / bits`` times as many along ``dim``."""
    p = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    span = 32 // math.gcd(bits, 32)
    p = p.reshape(-1, bits * span // 32, *p.shape[1:])
    values = []
    for k in range(span):
        word, shift = divmod(bits * k, 32)
        value = p[:, word] >> shift
        if shift + bits > 32:  # the value's high bits are in the next word
            value = value | (p[:, word + 1] << (32 - shift))
        values.append(value & (2**bits - 1))
    return torch.stack(values, dim=1).flatten(0, 1).to(torch.uint8).movedim(0, dim).contiguous()


def zero_points(qweight: QuantizedWeight) -> torch.Tensor:
    """(out, groups) zero-points: the stored ones, or symmetric formats' fixed ``2**(bits-1)``."""
    if qweight.zero is not None:
        return qweight.zero.long()
    return torch.full(qweight.scale.shape, 2 ** (qweight.fmt.bits - 1), dtype=torch.long)


def pack_layer(name: str, qweight: QuantizedWeight, zero_offset: int) -> dict[str, torch.Tensor]:
    """One layer's GPTQ tensors; ``zero_offset`` is 1 for the v1 format (stores ``zero - 1``), 0 for v2."""
    bits, (_, cols) = qweight.fmt.bits, qweight.shape
    return {
        f"{name}.qweight": pack_int32(qweight.codes.T, bits, dim=0),  # (in * bits / 32, out)
        f"{name}.qzeros": pack_int32(zero_points(qweight).T - zero_offset, bits, dim=1),  # (groups, out * bits / 32)
        f"{name}.scales": qweight.scale.T.contiguous(),  # (groups, out) fp16
        f"{name}.g_idx": torch.arange(cols, dtype=torch.int32) // qweight.fmt.group(cols),  # (in,)
    }


def checkpoint_format(qweights: dict[str, QuantizedWeight]) -> tuple[str, str]:
    """``gptq`` (v1) unless an asymmetric zero-point is 0, which only ``gptq_v2`` can store; and why."""
    zero = sorted(name for name, q in qweights.items() if q.zero is not None and bool((q.zero == 0).any()))
    if zero:
        return "gptq_v2", "v1 stores zero - 1 and cannot hold the zero-point 0 of " + listing(zero)
    return "gptq", "GPTQ v1, which every GPTQ loader reads"


def export_gptq(run: RunDir, out: Path, engine: str) -> dict:
    """Write the checkpoint into ``out``; returns the format chosen, byte counts and the engine warnings."""
    _check_representable(run)
    qweights = run.quantized_weights()
    version, reason = checkpoint_format(qweights)
    tensors = _dense_fp16(run)
    for name, qweight in qweights.items():
        tensors.update(pack_layer(name, qweight, zero_offset=1 if version == "gptq" else 0))
    save_file(tensors, out / MODEL_FILE, metadata={"format": "pt"})
    config = gptq_config(run, desc_act=False, static_groups=False, checkpoint_format=version)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    run.config.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    data.update(dtype="float16", quantization_config=config)
    (out / "config.json").write_text(json.dumps(data, indent=2))
    for pattern in AUX_FILES:
        for file in run.path.glob(pattern):
            shutil.copy2(file, out / file.name)

    on_disk = sum(t.nbytes for key, t in tensors.items() if key.rsplit(".", 1)[-1] in QUANT_SUFFIXES)
    computed = sum(q.stored_bytes() for q in qweights.values())
    return {
        "checkpoint_format": version,
        "checkpoint_format_reason": reason,
        "default": {key: config[key] for key in ("bits", "group_size", "sym")},
        "overrides": len(config["dynamic"]),
        "desc_act": False,
        "quantized_bytes_on_disk": on_disk,
        "quantized_bytes_automp": computed,
        "quantized_bytes_ratio": on_disk / computed if computed else 1.0,
        "payload_bytes": payload_bytes(out / MODEL_FILE),
        "automp_payload_bytes": quantized_bytes(run.path) + payload_bytes(run.path / DENSE_TENSORS),
        "layers_by_format": dict(sorted(Counter(q.fmt.name for q in qweights.values()).items())),
        "kernels": KERNELS,
        "vllm_kernel": vllm_kernel(run),
        "warnings": vllm_gptq_warnings(run) if engine == "vllm" else [],
    }


def marlin_format(fmt: Format) -> bool:
    """Whether vLLM's ``gptq_marlin`` serves this quantized integer format."""
    return fmt.bits in (4, 8) and fmt.symmetric and fmt.group_size in MARLIN_GROUPS


def vllm_kernel(run: RunDir) -> str:
    """The vLLM GPTQ kernel that can serve every layer: ``gptq_marlin`` when all fit it, else ``gptq``."""
    quantized = [run.allocation.format_of(layer.name) for layer in run.inventory.layers]
    return "gptq_marlin" if all(marlin_format(f) for f in quantized if f.quantized) else "gptq"


def vllm_gptq_warnings(run: RunDir) -> list[str]:
    """One line per vLLM limit this checkpoint meets, each naming the layers concerned."""
    formats = {layer.name: run.allocation.format_of(layer.name) for layer in run.inventory.layers}
    warnings = []
    exllama = [f"{name} ({fmt.name})" for name, fmt in formats.items() if fmt.quantized and not marlin_format(fmt)]
    if exllama:
        warnings.append(
            "vLLM's gptq_marlin kernel serves symmetric 4/8-bit layers only; these layers need its gptq (exllama) "
            "kernel (fp16 activations only): serve the checkpoint with --quantization gptq, since vLLM picks "
            "gptq_marlin whenever the top-level format fits it and then refuses them: " + listing(exllama)
        )
    else:
        warnings += tiling_warnings(run.inventory, run.allocation)
    return warnings + fused_warnings(run.inventory, run.allocation)


def _check_representable(run: RunDir) -> None:
    refuse_corrections(run, "gptq", "a GPTQ checkpoint holds quantized weights only")
    formats = {layer.name: run.allocation.format_of(layer.name) for layer in run.inventory.layers}
    others = sorted(f"{name} ({fmt.name})" for name, fmt in formats.items() if fmt.quantized and fmt.kind != "int")
    if others:
        raise AutompError(
            "GPTQ checkpoints hold integer codes with fp16 scales only (no codebook or GGUF block formats), so "
            f"these layers cannot be exported with --format gptq: {listing(others)}; use --format gptq-dynamic, "
            "or quantize them with an integer format (w4g128, ...)"
        )
    uneven = []
    for lay in run.inventory.layers:
        bits = formats[lay.name].bits
        if formats[lay.name].quantized and (lay.in_features * bits % 32 or lay.out_features * bits % 32):
            uneven.append(f"{lay.name} ({lay.out_features}x{lay.in_features}, {bits} bits)")
    if uneven:
        raise AutompError(
            "GPTQ packs codes along the input and zero-points along the output dimension into whole int32 words, so "
            f"in * bits and out * bits must be multiples of 32; these layers do not pack: {listing(uneven)}"
        )


def _dense_fp16(run: RunDir) -> dict[str, torch.Tensor]:
    """The dense tensors in fp16 (what GPTQ loaders expect); bf16 values beyond fp16's range are refused."""
    tensors = {}
    for name, tensor in run.dense_tensors().items():
        half = tensor.half() if tensor.is_floating_point() else tensor
        if not torch.isfinite(half).all():
            raise AutompError(f"{name} has values beyond float16's range; a GPTQ checkpoint stores fp16 tensors")
        tensors[name] = half.contiguous()
    return tensors
