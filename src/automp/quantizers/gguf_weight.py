"""A weight quantized in a GGUF (llama.cpp) type, held as the exact bytes a .gguf file stores.

``blocks`` is a uint8 tensor of shape (rows, cols // block_size * type_size) in GGUF's own byte
layout (``gguf_pack.py``): ``gguf.GGUFWriter.add_tensor(name, blocks.numpy(), raw_dtype=...)`` writes it
as is, and llama.cpp reads it back unchanged. Same interface as ``QuantizedWeight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from automp.errors import AutompError
from automp.formats import Format, get_format
from automp.quantizers import gguf_pack


@dataclass
class GGUFWeight:
    fmt: Format
    blocks: torch.Tensor  # (out, in // block_size * type_size) uint8

    def __post_init__(self) -> None:
        if self.fmt.kind != "gguf":
            raise AutompError(f"GGUFWeight holds GGUF formats only, not {self.fmt.name}")
        if self.blocks.dtype != torch.uint8 or self.blocks.dim() != 2 or self.blocks.shape[1] % self.fmt.type_size:
            raise AutompError(
                f"{self.fmt.ggml_type} blocks must be a 2-D uint8 tensor whose rows are whole blocks of "
                f"{self.fmt.type_size} bytes; got {self.blocks.dtype} {tuple(self.blocks.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        rows, nbytes = self.blocks.shape
        return rows, nbytes // self.fmt.type_size * self.fmt.block_size

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32, computed as ggml's dequantize_row_* computes it (on the blocks' device)."""
        rows, cols = self.shape
        fields = gguf_pack.unpack(self.fmt.ggml_type, self.blocks.reshape(-1, self.fmt.type_size))
        return gguf_pack.dequantize_fields(self.fmt.ggml_type, fields).reshape(rows, cols)

    def to(self, device: torch.device | str) -> GGUFWeight:
        return GGUFWeight(self.fmt, self.blocks.to(device))

    # ---- storage --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks.contiguous()}

    @classmethod
    def from_state_dict(cls, fmt_name: str, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> GGUFWeight:
        fmt = get_format(fmt_name)
        qweight = cls(fmt, tensors["blocks"])
        if qweight.shape != tuple(shape):
            raise AutompError(f"{fmt.ggml_type} blocks hold a {qweight.shape} weight, expected {tuple(shape)}")
        return qweight

    def stored_bytes(self) -> int:
        """Bytes of the blocks: exactly ``fmt.storage_bits(*shape) / 8``."""
        return self.blocks.numel()
