"""Deployable exports of an automp output directory.

* ``compressed-tensors``: a ``pack-quantized`` checkpoint that transformers and vLLM load without automp,
  built from the stored codes and scales with nothing re-quantized.
* ``gguf-map``: ``llama-quantize --tensor-type`` overrides that reproduce the allocation in llama.cpp.
* ``gptq-dynamic``: a GPTQModel ``quantize_config.json`` with per-module ``dynamic`` overrides.

Each exporter writes into a directory it is given (the pipeline stages it atomically) and returns a report
dict with a ``warnings`` list.
"""

from __future__ import annotations

from pathlib import Path

from automp.errors import AutompError
from automp.export.run_dir import RunDir

EXPORT_FORMATS = ("compressed-tensors", "gguf-map", "gptq-dynamic")
ENGINES = ("vllm", "transformers")
REPORT_FILE = "automp_export.json"


def export_run(run: RunDir, fmt: str, out: Path, engine: str = "vllm") -> dict:
    """Write the ``fmt`` export of ``run`` into the existing directory ``out``; returns its report."""
    # imported here: only the compressed-tensors export needs that (slow to import) library
    from automp.export.compressed_tensors import export_compressed_tensors
    from automp.export.gguf_map import export_gguf_map
    from automp.export.gptq_dynamic import export_gptq_dynamic

    if engine not in ENGINES:
        raise AutompError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if fmt == "compressed-tensors":
        return export_compressed_tensors(run, out, engine)
    if fmt == "gguf-map":
        return export_gguf_map(run, out)
    if fmt == "gptq-dynamic":
        return export_gptq_dynamic(run, out)
    raise AutompError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")


__all__ = ["ENGINES", "EXPORT_FORMATS", "REPORT_FILE", "RunDir", "export_run"]
