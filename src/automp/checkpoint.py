"""automp's own checkpoint of a quantized model, and the byte count of a model as stored.

A checkpoint directory holds the model's ``config.json`` and tokenizer, ``automp_quant.json`` (the
allocation), ``quantized.safetensors`` (bit-packed codes, fp16 scales, packed zero-points per
quantized layer) and ``model.safetensors`` (every other tensor in 16-bit, tied copies once).
``automp eval --model DIR`` loads it back as a dequantized model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.model import check_finite, set_linear_weight
from automp.quantizers.qweight import QWeight, load_qweight

QUANT_FILE = "automp_quant.json"
QUANT_TENSORS = "quantized.safetensors"
DENSE_TENSORS = "model.safetensors"


def _stored_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype == torch.float32 else dtype


def _dense_tensors(model: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict except quantized weights, each storage once (tied weights)."""
    seen: set[tuple[int, tuple]] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if name.removesuffix(".weight") in quantized or key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu", _stored_dtype(tensor.dtype)).contiguous()
    return out


def payload_bytes(path: Path) -> int:
    """Tensor bytes in a safetensors file: its size less the 8-byte length and the JSON header."""
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
    return Path(path).stat().st_size - 8 - header


def model_bytes(model: nn.Module, qweights: dict[str, QWeight]) -> int:
    """Bytes of the model as stored: packed quantized layers plus every other tensor in 16-bit."""
    dense = _dense_tensors(model, set(qweights))
    return sum(q.stored_bytes() for q in qweights.values()) + sum(t.numel() * t.element_size() for t in dense.values())


def save_quantized(
    out_dir: Path, model: nn.Module, tokenizer, allocation: Allocation, qweights: dict[str, QWeight]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    allocation.save(out_dir / QUANT_FILE)
    write_qweights(out_dir, qweights)
    save_file(_dense_tensors(model, set(qweights)), out_dir / DENSE_TENSORS)


def write_qweights(out_dir: Path, qweights: dict[str, QWeight]) -> None:
    """``out_dir/quantized.safetensors``: every layer's packed tensors, its shape in the header."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    packed = {f"{name}.{key}": t for name, q in qweights.items() for key, t in q.state_dict().items()}
    shapes = {name: json.dumps(q.shape) for name, q in qweights.items()}  # header metadata, not payload
    save_file(packed, Path(out_dir) / QUANT_TENSORS, metadata=shapes or None)  # an empty header map is unreadable


def read_qweights(path: Path, allocation: Allocation) -> dict[str, QWeight]:
    """Every quantized layer's stored weight (codes, scales, zero-points, corrections), exactly as saved."""
    file = Path(path) / QUANT_TENSORS
    try:
        packed = load_file(file)
        with safe_open(file, "pt") as handle:
            shapes = {name: tuple(json.loads(shape)) for name, shape in (handle.metadata() or {}).items()}
    except Exception as err:
        raise AutompError(f"corrupt automp checkpoint in {path}: {err}") from err
    out = {}
    for name, fmt in allocation.formats.items():
        if fmt in ("fp16", "bf16"):
            continue
        tensors = {k.removeprefix(name + "."): v for k, v in packed.items() if k.startswith(name + ".")}
        if not tensors or name not in shapes:
            raise AutompError(f"corrupt automp checkpoint in {path}: no packed tensors for {name}")
        out[name] = load_qweight(fmt, shapes[name], tensors)
    return out


def load_quantized(path: Path, dtype: torch.dtype, qweights: dict[str, QWeight] | None = None) -> nn.Module:
    """The checkpoint as a dequantized model; ``qweights``: its stored weights when the caller already read them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    allocation = Allocation.load(path / QUANT_FILE)
    try:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
        dense = load_file(path / DENSE_TENSORS)
    except Exception as err:
        raise AutompError(f"corrupt automp checkpoint in {path}: {err}") from err
    qweights = read_qweights(path, allocation) if qweights is None else qweights
    tied = _tied_names(model)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in dense.items()}, strict=False)
    for name, qweight in qweights.items():
        set_linear_weight(model.get_submodule(name), qweight.dequantize())
        missing = [m for m in missing if m != name + ".weight"]
    if unexpected or set(missing) - tied:
        raise AutompError(f"corrupt automp checkpoint in {path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    check_finite(model)
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (restored by loading the first)."""
    first: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in first:
            tied.add(name)
        first.setdefault(ptr, name)
    return tied
