"""A quantized weight as it is stored: b-bit codes, fp16 group scales, optional b-bit zero-points.

``QuantizedWeight`` is what every quantizer returns for automp's own formats and what checkpoints hold.
Codes and zero-points are bit-packed densely (``n * bits`` bits, no padding per value), so the bytes on
disk equal ``Format.storage_bits`` / 8. GGUF formats are held as llama.cpp's blocks instead
(``GGUFWeight``, same interface). A ``+rN`` format's weight is a ``CorrectedWeight``: either of those plus
its low-rank correction (``lowrank.py``). :func:`load_qweight` rebuilds any of them from its stored tensors;
:func:`save_qweights` / :func:`load_qweights` keep some of them in one safetensors file that names their formats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from automp.formats import Format, GroupParams, decode, encode, get_format
from automp.quantizers.gguf_weight import GGUFWeight
from automp.quantizers.lowrank import LowRankCorrection, fit_correction


@dataclass
class QuantizedWeight:
    fmt: Format
    codes: torch.Tensor  # (out, in) uint8
    scale: torch.Tensor  # (out, in // group) fp16
    zero: torch.Tensor | None  # (out, in // group) uint8, asymmetric formats only

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def _grouped(self) -> tuple[int, int, int]:
        rows, cols = self.shape
        g = self.fmt.group(cols)
        return rows, cols // g, g

    def params(self) -> GroupParams:
        zero = self.zero.float() if self.zero is not None else None
        return GroupParams(self.scale.float(), zero)

    def dequantize(self) -> torch.Tensor:
        rows, groups, g = self._grouped()
        codes = self.codes.long().reshape(rows, groups, g)
        return decode(self.fmt, codes, self.params()).reshape(rows, groups * g)

    @classmethod
    def from_grid(cls, fmt: Format, w: torch.Tensor, params: GroupParams) -> QuantizedWeight:
        """Encode ``w`` (out, in) with per-group params of shape (out, in // group)."""
        rows, cols = w.shape
        g = fmt.group(cols)
        codes = encode(fmt, w.float().reshape(rows, cols // g, g), params).reshape(rows, cols)
        zero = params.zero.to(torch.uint8) if params.zero is not None else None
        return cls(fmt, codes.to(torch.uint8), params.scale.half(), zero)

    # ---- storage --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"codes": pack_bits(self.codes, self.fmt.bits), "scale": self.scale.contiguous()}
        if self.zero is not None:
            out["zero"] = pack_bits(self.zero, self.fmt.bits)
        return out

    @classmethod
    def from_state_dict(
        cls, fmt_name: str, shape: tuple[int, int], tensors: dict[str, torch.Tensor]
    ) -> QuantizedWeight:
        fmt = get_format(fmt_name)
        rows, cols = shape
        groups = cols // fmt.group(cols)
        codes = unpack_bits(tensors["codes"], fmt.bits, rows * cols).reshape(rows, cols)
        zero = None
        if "zero" in tensors:
            zero = unpack_bits(tensors["zero"], fmt.bits, rows * groups).reshape(rows, groups)
        return cls(fmt, codes, tensors["scale"], zero)

    def stored_bytes(self) -> int:
        """Bytes of the packed codes, scales and zero-points."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def to(self, device: torch.device | str) -> QuantizedWeight:
        zero = None if self.zero is None else self.zero.to(device)
        return QuantizedWeight(self.fmt, self.codes.to(device), self.scale.to(device), zero)


@dataclass
class CorrectedWeight:
    """A ``+rN`` format's weight: the quantized ``base`` plus its low-rank correction ``B A``."""

    fmt: Format  # the format with its rank (``fmt.base`` is ``base.fmt``)
    base: QuantizedWeight | GGUFWeight
    correction: LowRankCorrection

    @classmethod
    def fit(
        cls, weight: torch.Tensor, base: QuantizedWeight | GGUFWeight, hessian: torch.Tensor | None, fmt: Format,
        method: str = "exact",
    ) -> CorrectedWeight:  # fmt: skip
        """Correct ``base`` (quantized from ``weight`` in ``fmt.base``) with a rank-``fmt.rank`` fit."""
        return cls(fmt, base, fit_correction(weight, base.dequantize(), hessian, fmt.rank, method))

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    def dequantize(self) -> torch.Tensor:
        quantized = self.base.dequantize()
        return quantized + self.correction.delta().to(quantized.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        lora = {"lora_A": self.correction.A.contiguous(), "lora_B": self.correction.B.contiguous()}
        return self.base.state_dict() | lora

    @classmethod
    def from_state_dict(
        cls, fmt_name: str, shape: tuple[int, int], tensors: dict[str, torch.Tensor]
    ) -> CorrectedWeight:
        fmt = get_format(fmt_name)
        base = {k: v for k, v in tensors.items() if not k.startswith("lora_")}
        correction = LowRankCorrection(A=tensors["lora_A"], B=tensors["lora_B"])
        return cls(fmt, load_qweight(fmt.base.name, shape, base), correction)

    def stored_bytes(self) -> int:
        """The base's bytes plus ``A`` and ``B`` in fp16: exactly ``fmt.storage_bits(*shape) / 8``."""
        return self.base.stored_bytes() + (self.correction.A.numel() + self.correction.B.numel()) * 2

    def to(self, device: torch.device | str) -> CorrectedWeight:
        correction = LowRankCorrection(self.correction.A.to(device), self.correction.B.to(device))
        return CorrectedWeight(self.fmt, self.base.to(device), correction)


QWeight = QuantizedWeight | GGUFWeight | CorrectedWeight  # what quantizers return and checkpoints hold


def load_qweight(fmt_name: str, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> QWeight:
    """A stored weight rebuilt from its ``state_dict()`` tensors: the class its format calls for."""
    fmt = get_format(fmt_name)
    cls = CorrectedWeight if fmt.rank else GGUFWeight if fmt.kind == "gguf" else QuantizedWeight
    return cls.from_state_dict(fmt_name, shape, tensors)


def save_qweights(path: Path, layers: Mapping[str, QWeight]) -> None:
    """``layers`` in one safetensors file, written atomically: each one's ``state_dict`` tensors as ``<name>.<key>``,
    its format and shape in the header."""
    packed = {f"{name}.{key}": t for name, q in layers.items() for key, t in q.state_dict().items()}
    layout = {name: [q.fmt.name, list(q.shape)] for name, q in layers.items()}
    partial = Path(path).with_name(f".{Path(path).name}.partial")
    save_file(packed, partial, metadata={"layers": json.dumps(layout)})
    os.replace(partial, path)


def load_qweights(path: Path) -> dict[str, QWeight]:
    """The stored weights :func:`save_qweights` wrote to ``path``."""
    with safe_open(path, "pt") as handle:
        layout = json.loads(handle.metadata()["layers"])
    packed = load_file(path)
    return {
        name: load_qweight(fmt, tuple(shape), {k.removeprefix(name + "."): v for k, v in packed.items()
                                               if k.startswith(name + ".")})
        for name, (fmt, shape) in layout.items()
    }  # fmt: skip


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers densely into a uint8 tensor (big-endian bit order)."""
    flat = values.reshape(-1).to(torch.uint8).cpu().numpy()
    bit_matrix = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits :]
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    stream = np.unpackbits(packed.cpu().numpy())[: count * bits].reshape(count, bits)
    padded = np.concatenate([np.zeros((count, 8 - bits), dtype=np.uint8), stream], axis=1)
    return torch.from_numpy(np.packbits(padded, axis=1).reshape(-1))
