"""Deployable exports of an automp output directory.

* ``compressed-tensors``: a ``pack-quantized`` checkpoint that transformers and vLLM load without automp,
  built from the stored codes and scales with nothing re-quantized; the low-rank corrections of ``+rN`` layers
  go beside it as a PEFT LoRA adapter (``adapter/``). The other exports refuse runs with ``+rN`` layers.
* ``gptq``: a GPTQ checkpoint (``qweight``/``qzeros``/``scales``/``g_idx`` with ``dynamic`` overrides) that
  GPTQModel and vLLM load, built from the stored codes and scales with nothing re-quantized.
* ``gguf``: one ``.gguf`` file that llama.cpp runs, for runs quantized in GGUF formats.
* ``gguf-map``: ``llama-quantize --tensor-type`` overrides that reproduce the allocation in llama.cpp.
* ``gptq-dynamic``: a GPTQModel ``quantize_config.json`` with per-module ``dynamic`` overrides (a recipe).

A quantized token embedding (``--embeddings``) goes only into the llama.cpp exports: the others quantize
linear layers only, and refuse such a run with one error (a 16-bit allocated embedding is a dense tensor).

Each exporter writes into a directory it is given (the pipeline stages it atomically) and returns a report
dict with a ``warnings`` list; ``export_run`` adds the ``engine`` the export is for (``--engine`` for
compressed-tensors, else the format's own engine) and every engine that ``loaders`` it.
"""

from __future__ import annotations

from pathlib import Path

from automp.errors import AutompError
from automp.export.run_dir import RunDir, refuse_quantized_embedding

EXPORT_FORMATS = ("compressed-tensors", "gptq", "gguf", "gguf-map", "gptq-dynamic")
ENGINES = ("vllm", "transformers")
LOADERS = {  # format -> the engines that load (or, for a recipe, consume) the export, its own engine first
    "gptq": ("gptqmodel", "vllm"),
    "gguf": ("llama.cpp",),
    "gguf-map": ("llama.cpp",),
    "gptq-dynamic": ("gptqmodel",),
}
REPORT_FILE = "automp_export.json"


def export_run(run: RunDir, fmt: str, out: Path, engine: str = "vllm") -> dict:
    """Write the ``fmt`` export of ``run`` into the existing directory ``out``; returns its report."""
    if engine not in ENGINES:
        raise AutompError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    if fmt not in EXPORT_FORMATS:
        raise AutompError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    loaders = LOADERS.get(fmt, (engine, *(name for name in ENGINES if name != engine)))
    if fmt not in ("gguf", "gguf-map"):  # llama.cpp alone stores a quantized token embedding
        refuse_quantized_embedding(run, fmt, " and ".join(loaders))
    return {"engine": loaders[0], "loaders": list(loaders), **_export(run, fmt, out, engine)}


def _export(run: RunDir, fmt: str, out: Path, engine: str) -> dict:
    # each imported here: compressed-tensors (a slow import) and gguf-py are needed by their own export only
    if fmt == "compressed-tensors":
        from automp.export.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(run, out, engine)
    if fmt == "gptq":
        from automp.export.gptq import export_gptq

        return export_gptq(run, out, engine)
    if fmt == "gguf":
        from automp.export.gguf_file import export_gguf

        return export_gguf(run, out)
    if fmt == "gguf-map":
        from automp.export.gguf_map import export_gguf_map

        return export_gguf_map(run, out)
    from automp.export.gptq_dynamic import export_gptq_dynamic

    return export_gptq_dynamic(run, out)


__all__ = ["ENGINES", "EXPORT_FORMATS", "LOADERS", "REPORT_FILE", "RunDir", "export_run"]
