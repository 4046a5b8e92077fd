"""automp's own checkpoint of a quantized model, and the byte count of a model as stored.

A checkpoint directory holds the model's ``config.json`` and tokenizer, ``automp_quant.json`` (the
allocation), ``quantized.safetensors`` (bit-packed codes, fp16 scales, packed zero-points per
quantized layer) and ``model.safetensors`` (every other tensor in 16-bit, tied copies once).
``automp eval --model DIR`` loads it back as a dequantized model.

A streamed run's codes do not fit in host memory together: they wait on disk (:class:`SpilledWeights`) and the
checkpoint stores them in shards of about ``SHARD_BYTES``, ``quantized-00001.safetensors`` and on, listed by
``quantized.safetensors.index.json``. Writing holds one shard, and the dense tensors are read one at a time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from automp.allocation import Allocation
from automp.errors import AutompError
from automp.model import check_finite, set_linear_weight
from automp.quantizers.qweight import QWeight, load_qweight, load_qweights, save_qweights

QUANT_FILE = "automp_quant.json"
QUANT_TENSORS = "quantized.safetensors"
QUANT_INDEX = "quantized.safetensors.index.json"  # a sharded checkpoint's layer -> shard file
DENSE_TENSORS = "model.safetensors"
SHARD_BYTES = 2 * 1024**3  # packed bytes per shard of a sharded checkpoint


def _stored_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype == torch.float32 else dtype


def _dense_tensors(model: nn.Module, quantized: Iterable[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict except quantized weights, each storage once (tied weights), in 16-bit on the
    host. Read one at a time: a quantized weight of a streamed model is never onloaded."""
    skip = {f"{name}.weight" for name in quantized}
    seen: dict[tuple[int, tuple], torch.Tensor] = {}  # holding each source: a freed one's address could come again
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        persistent = [name for name in module._buffers if name not in module._non_persistent_buffers_set]
        for name in [*module._parameters.keys(), *persistent]:
            full = f"{prefix}.{name}" if prefix else name
            if full in skip or full in out:
                continue
            tensor = getattr(module, name)  # a streamed module's tensor comes onto its device here
            if tensor is None:
                continue
            key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
            if key not in seen:
                seen[key] = tensor
                out[full] = tensor.detach().to("cpu", _stored_dtype(tensor.dtype)).contiguous()
    return out


def payload_bytes(path: Path) -> int:
    """Tensor bytes in a safetensors file: its size less the 8-byte length and the JSON header."""
    with open(path, "rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
    return Path(path).stat().st_size - 8 - header


def quantized_bytes(path: Path) -> int:
    """Tensor bytes of a checkpoint's quantized layers, in one file or in shards."""
    return sum(payload_bytes(Path(path) / name) for name in _quantized_files(Path(path)))


def _quantized_files(path: Path) -> list[str]:
    index = path / QUANT_INDEX
    if not index.is_file():
        return [QUANT_TENSORS]
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except Exception as err:
        raise AutompError(f"corrupt automp checkpoint in {path}: {index.name}: {err}") from err


def model_bytes(model: nn.Module, qweights: Mapping[str, QWeight]) -> int:
    """Bytes of the model as stored: packed quantized layers plus every other tensor in 16-bit."""
    dense = _dense_tensors(model, set(qweights))
    return sum(q.stored_bytes() for q in qweights.values()) + sum(t.numel() * t.element_size() for t in dense.values())


def save_quantized(
    out_dir: Path, model: nn.Module, tokenizer, allocation: Allocation, qweights: Mapping[str, QWeight]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    allocation.save(out_dir / QUANT_FILE)
    write_qweights(out_dir, qweights)
    save_file(_dense_tensors(model, set(qweights)), out_dir / DENSE_TENSORS)


def write_qweights(out_dir: Path, qweights: Mapping[str, QWeight]) -> None:
    """``out_dir/quantized.safetensors``: every layer's packed tensors, its shape in the header. Weights spilled to
    disk go into shards of about ``SHARD_BYTES`` instead, one read at a time."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if not isinstance(qweights, SpilledWeights) or not qweights:
        _write_quantized_file(Path(out_dir) / QUANT_TENSORS, qweights)
        return
    weight_map: dict[str, str] = {}
    shard: dict[str, QWeight] = {}  # one shard in memory at a time

    def write() -> None:
        file = f"quantized-{len(set(weight_map.values())) + 1:05d}.safetensors"
        _write_quantized_file(Path(out_dir) / file, shard)
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()

    for name in qweights:
        shard[name] = qweights[name]
        if sum(q.stored_bytes() for q in shard.values()) >= SHARD_BYTES:
            write()
    if shard:
        write()
    (Path(out_dir) / QUANT_INDEX).write_text(json.dumps({"weight_map": weight_map}, indent=1))


def _write_quantized_file(file: Path, qweights: Mapping[str, QWeight]) -> None:
    packed = {f"{name}.{key}": t for name, q in qweights.items() for key, t in q.state_dict().items()}
    shapes = {name: json.dumps(q.shape) for name, q in qweights.items()}  # header metadata, not payload
    save_file(packed, file, metadata=shapes or None)  # an empty header map is unreadable


def read_qweights(path: Path, allocation: Allocation) -> dict[str, QWeight]:
    """Every quantized layer's stored weight (codes, scales, zero-points, corrections), exactly as saved."""
    packed, shapes = {}, {}
    try:
        for name in _quantized_files(Path(path)):
            packed |= load_file(Path(path) / name)
            with safe_open(Path(path) / name, "pt") as handle:
                shapes |= {layer: tuple(json.loads(shape)) for layer, shape in (handle.metadata() or {}).items()}
    except AutompError:
        raise
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


class SpilledWeights(MutableMapping[str, QWeight]):
    """Stored weights waiting on disk, a file per layer, each read back when asked for: what a streamed run quantizes
    (``quantize_(..., codes=SpilledWeights(dir))``), which need not fit in host memory together. The directory is
    scratch: emptied when opened."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        self.names: dict[str, None] = {}  # in the order they came

    def _file(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def __setitem__(self, name: str, qweight: QWeight) -> None:
        save_qweights(self._file(name), {name: qweight.to("cpu")})
        self.names[name] = None

    def __getitem__(self, name: str) -> QWeight:
        if name not in self.names:
            raise KeyError(name)
        return load_qweights(self._file(name))[name]

    def __delitem__(self, name: str) -> None:
        del self.names[name]
        self._file(name).unlink()

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.names))

    def __len__(self) -> int:
        return len(self.names)


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
