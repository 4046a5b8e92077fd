"""Export to a compressed-tensors ``pack-quantized`` checkpoint: loads in plain transformers and in vLLM.

The stored codes map exactly, with no re-quantization. automp keeps unsigned ``b``-bit codes with
the symmetric zero fixed at ``2**(b-1)``; compressed-tensors keeps signed values
``q = code - 2**(b-1)`` and adds the same offset back inside its packer. So ``pack_to_int32``
receives ``code - 2**(b-1)``, and asymmetric zero-points go through the same shift (``(q - zp) * scale``
equals automp's ``(code - zero) * scale``). Each layer stores

* ``weight_packed``: int32, the codes packed densely along the input dimension (``in * b / 32`` words per row),
* ``weight_scale``: automp's fp16 scales, shape (out, groups), or (out, 1) per channel,
* ``weight_zero_point`` (asymmetric only): int32, zero-points packed along the output dimension,
* ``weight_shape``: int64 (out, in), 16 bytes per layer and the only bytes beyond automp's count.

There is one config group per format, whose ``targets`` are exact module names (compressed-tensors
and vLLM match a target either exactly or as an ``re:`` regex). ``ignore`` lists every other linear
module (16-bit layers, ``lm_head``). The codebook formats (nf4, fp4) have no compressed-tensors
equivalent: the int ``pack-quantized`` format has no codebook, and its fp4 formats (NVFP4, MXFP4) use
fp8 or power-of-two group scales. Those formats are refused, as are GGUF (llama.cpp) formats, whose
blocks (super-block scales, quantized sub-block scales and mins) compressed-tensors cannot express.
GPT-2's ``Conv1D`` layers are refused too, because compressed-tensors compresses ``nn.Linear`` only.

A layer in a ``+rN`` format is written in its base format (``Format.base``, grouped with that format's
layers), and its low-rank correction ``B A`` goes into a PEFT LoRA adapter in ``DIR/adapter/``
(``peft_adapter.py``): ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR), DIR / "adapter")``
computes what automp's model computes, and vLLM serves it with ``--enable-lora``. The byte counts include the
adapter's tensors (``adapter_bytes``), and the report's ``adapter`` says where it is and which
``--max-lora-rank`` vLLM needs.

Loading: ``AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32)`` needs no flags, on CPU too.
transformers keeps the packed weights and decompresses them on the first forward pass; with
``quantization_config=CompressedTensorsConfig(dequantize=True)`` it decompresses at load time. In float32
the dequantized weights are bit-identical to automp's. In float16 they are too, because both round the
exact product ``(code - zero) * scale`` to fp16 once.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from automp.checkpoint import DENSE_TENSORS, payload_bytes, quantized_bytes
from automp.errors import AutompError
from automp.export.peft_adapter import split_corrections, write_adapter
from automp.export.run_dir import RunDir, listing
from automp.export.vllm_support import lora_warnings, vllm_warnings
from automp.formats import Format
from automp.quantizers.qweight import QuantizedWeight

MODEL_FILE = "model.safetensors"
QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
# Files that travel with a model directory (tokenizers of every kind, generation defaults).
AUX_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
             "generation_config.json", "chat_template.*")  # fmt: skip


def export_compressed_tensors(run: RunDir, out: Path, engine: str) -> dict:
    """Write the checkpoint (and, for ``+rN`` layers, the LoRA adapter) into ``out``; returns the byte counts,
    the adapter written (None without corrections) and the engine warnings."""
    _check_representable(run)
    qweights = run.quantized_weights()
    bases, corrections = split_corrections(qweights)
    tensors = run.dense_tensors()
    for name, qweight in bases.items():
        tensors.update(pack_layer(name, qweight))
    save_file(tensors, out / MODEL_FILE, metadata={"format": "pt"})
    _write_config(run, out, quantization_config(run.skeleton, bases), _stored_dtype(tensors))
    for pattern in AUX_FILES:
        for file in run.path.glob(pattern):
            shutil.copy2(file, out / file.name)
    adapter = write_adapter(out, corrections) if corrections else None

    on_disk = _tensor_bytes(out / MODEL_FILE)
    adapter_bytes = adapter["bytes"] if adapter else 0
    quant_on_disk = sum(size for name, size in on_disk.items() if name.rsplit(".", 1)[-1] in QUANT_SUFFIXES)
    quant_on_disk += adapter_bytes
    computed = sum(q.stored_bytes() for q in qweights.values())  # a +rN layer's bytes include its correction
    formats = Counter(q.fmt.name for q in qweights.values())
    warnings = []
    if engine == "vllm":
        warnings = vllm_warnings(run.inventory, run.allocation) + lora_warnings(run.inventory, run.allocation)
    return {
        "quantized_bytes_on_disk": quant_on_disk,
        "quantized_bytes_automp": computed,
        "quantized_bytes_ratio": quant_on_disk / computed if computed else 1.0,
        "weight_shape_bytes": sum(size for name, size in on_disk.items() if name.endswith(".weight_shape")),
        "adapter_bytes": adapter_bytes,
        "payload_bytes": payload_bytes(out / MODEL_FILE) + adapter_bytes,
        "automp_payload_bytes": quantized_bytes(run.path) + payload_bytes(run.path / DENSE_TENSORS),
        "layers_by_format": dict(sorted(formats.items())),
        "adapter": adapter,
        "warnings": warnings,
    }


def pack_layer(name: str, qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One layer's compressed-tensors tensors, from automp's stored codes, scales and zero-points."""
    bits = qweight.fmt.bits
    out = {
        f"{name}.weight_packed": pack_to_int32(_signed(qweight.codes, bits), bits),
        f"{name}.weight_scale": qweight.scale.contiguous(),
        f"{name}.weight_shape": torch.tensor(qweight.shape, dtype=torch.int64),
    }
    if qweight.zero is not None:  # zero-points pack along the output dimension (packed_dim=0)
        out[f"{name}.weight_zero_point"] = pack_to_int32(_signed(qweight.zero, bits), bits, packed_dim=0).contiguous()
    return out


def _signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def quantization_args(fmt: Format) -> QuantizationArgs:
    strategy = "group" if fmt.group_size else "channel"
    return QuantizationArgs(
        num_bits=fmt.bits, type="int", symmetric=fmt.symmetric, strategy=strategy, group_size=fmt.group_size
    )


def quantization_config(skeleton: nn.Module, qweights: dict[str, QuantizedWeight]) -> QuantizationConfig:
    """One config group per format present, targeting its layers by exact name; every other linear is ignored.

    ``qweights`` are the stored bases (``split_corrections``): a ``+rN`` layer is grouped by its base format."""
    by_format: dict[str, list[str]] = defaultdict(list)
    for name, qweight in qweights.items():
        by_format[qweight.fmt.name].append(name)
    groups = {
        f"group_{index}": QuantizationScheme(targets=names, weights=quantization_args(qweights[names[0]].fmt))
        for index, names in enumerate(by_format[key] for key in sorted(by_format))
    }
    linears = [name for name, module in skeleton.named_modules() if isinstance(module, nn.Linear)]
    ignore = [name for name in linears if name not in qweights]
    return QuantizationConfig(
        config_groups=groups, format="pack-quantized", quantization_status=QuantizationStatus.COMPRESSED, ignore=ignore
    )


def _check_representable(run: RunDir) -> None:
    formats = {name: run.allocation.format_of(name) for name in run.allocation.formats}
    quantized = {name: fmt for name, fmt in formats.items() if fmt.quantized}
    gguf = sorted(f"{name} ({fmt.name})" for name, fmt in quantized.items() if fmt.kind == "gguf")
    if gguf:
        ranked = any(fmt.rank for fmt in quantized.values() if fmt.kind == "gguf")
        requantize = " (quantized without +rN, which --format gguf refuses)" if ranked else ""
        raise AutompError(
            "compressed-tensors cannot express GGUF (llama.cpp) formats: their blocks carry super-block scales, "
            "quantized sub-block scales and mins or a non-linear codebook. Export this run with --format gguf "
            f"(a .gguf file for llama.cpp) instead{requantize}; GGUF layers: {listing(gguf)}"
        )
    codebooks = sorted(f"{name} ({fmt.name})" for name, fmt in quantized.items() if fmt.kind != "int")
    if codebooks:
        raise AutompError(
            "compressed-tensors has no codebook formats (its pack-quantized format is integer-only and its fp4 "
            f"formats use fp8 or power-of-two scales), so these layers cannot be exported: {listing(codebooks)}"
        )
    conv = sorted(name for name in quantized if isinstance(run.skeleton.get_submodule(name), Conv1D))
    if conv:
        raise AutompError(
            f"compressed-tensors compresses nn.Linear layers only, and these are GPT-2 Conv1D layers: {listing(conv)}"
        )


def _stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    half = (t.dtype for t in tensors.values() if t.is_floating_point() and t.dtype != torch.float32)
    return next(half, torch.float16)


def _write_config(run: RunDir, out: Path, qconfig: QuantizationConfig, dtype: torch.dtype) -> None:
    run.config.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    # The tensors are stored in 16-bit; a float32 default would also stop vLLM's Marlin kernels (fp16/bf16 only).
    data["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(data, indent=2))
    ModelCompressor(quantization_config=qconfig).update_config(str(out))


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, read from its header (the data offsets on disk)."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    header.pop("__metadata__", None)
    return {name: info["data_offsets"][1] - info["data_offsets"][0] for name, info in header.items()}
