"""What evaluating a model costs: peak memory and forward throughput.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU (tensors only, since the last reset)
and the process's peak resident set size on a CPU (everything the process ever held: Python,
libraries, the model, activations). Both are in MB (10^6 bytes).
"""

from __future__ import annotations

import resource
import sys

import torch


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> dict:
    """``{"peak_memory_mb": ..., "memory_kind": "cuda_allocated" | "cpu_peak_rss"}``."""
    if torch.device(device).type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 1e6, "memory_kind": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports kilobytes, macOS bytes
    return {"peak_memory_mb": rss_bytes / 1e6, "memory_kind": "cpu_peak_rss"}


def throughput(tokens: int, seconds: float) -> float | None:
    """Forward tokens per second (None when nothing was timed)."""
    return tokens / seconds if seconds > 0 else None
