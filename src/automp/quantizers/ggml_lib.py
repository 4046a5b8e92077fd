"""llama.cpp's own quantizer through ctypes, to check automp's GGUF quantizers against it byte for byte.

Needs a shared build of llama.cpp's ``libggml-base.so`` (``cmake -DBUILD_SHARED_LIBS=ON``), which
exports ``size_t ggml_quantize_chunk(enum ggml_type, const float *src, void *dst, int64_t start,
int64_t nrows, int64_t n_per_row, const float *imatrix)`` and the ``dequantize_row_<type>`` decoders.
Nothing else in automp uses it.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import numpy as np
import torch

from automp.errors import AutompError
from automp.formats import Format


@cache
def _library(path: str) -> ctypes.CDLL:
    if not Path(path).is_file():
        raise AutompError(f"no llama.cpp library at {path}: build libggml-base.so with -DBUILD_SHARED_LIBS=ON")
    lib = ctypes.CDLL(path)
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]  # fmt: skip
    return lib


def ggml_dequantize(lib_path: str, fmt: Format, blocks: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float32 from llama.cpp's ``dequantize_row_<type>`` on (rows, bytes) uint8 blocks."""
    name = "dequantize_row_" + fmt.ggml_type.lower().replace("_k", "_K")
    fn = getattr(_library(lib_path), name)
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    src = np.ascontiguousarray(blocks.cpu().numpy())
    rows = src.shape[0]
    out = np.zeros((rows, src.shape[1] // fmt.type_size * fmt.block_size), dtype=np.float32)
    fn(src.ctypes.data, out.ctypes.data, out.size)
    return torch.from_numpy(out)


def ggml_quantize(
    lib_path: str, fmt: Format, weight: torch.Tensor, imatrix: torch.Tensor | None = None
) -> torch.Tensor:
    """(rows, cols // block_size * type_size) uint8 blocks from llama.cpp's ``ggml_quantize_chunk``."""
    from gguf.constants import GGMLQuantizationType

    rows, cols = weight.shape
    fmt.check_shape(rows, cols)
    src = np.ascontiguousarray(weight.detach().float().cpu().numpy())
    dst = np.zeros((rows, cols // fmt.block_size * fmt.type_size), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix.detach().float().cpu().numpy().reshape(cols))
    size = _library(lib_path).ggml_quantize_chunk(
        int(GGMLQuantizationType[fmt.ggml_type]), src.ctypes.data, dst.ctypes.data, 0, rows, cols,
        None if qw is None else qw.ctypes.data,
    )  # fmt: skip
    if size != dst.nbytes:
        raise AutompError(f"ggml_quantize_chunk wrote {size} bytes, expected {dst.nbytes}")
    return torch.from_numpy(dst)
