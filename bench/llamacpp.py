"""automp's GGUF allocations against llama.cpp's own recipes at equal size, measured by llama.cpp itself.

    python bench/llamacpp.py --model ../shared/models/bench-a --data ../shared/data --work /tmp/llamacpp

Needs a C++ toolchain and CMake. llama.cpp comes from PyPI: the llama-cpp-python sdist vendors it, and
``llama-quantize``, ``llama-imatrix`` and ``llama-perplexity`` are built from it (``-j2``), or taken from
``--llama DIR`` (a source tree with ``build/bin``). The model is converted with llama.cpp's own
``convert_hf_to_gguf.py`` to an F16 GGUF; a byte-level BPE tokenizer whose pre-tokenizer hash the
converter does not know (bench-a's) is declared ``gpt-2`` (its ByteLevel pre-tokenizer uses GPT-2's
split regex).

For each llama.cpp recipe (``--recipes``, default Q2_K, Q3_K_S, Q3_K_M, Q4_K_S), with and without an
importance matrix (``llama-imatrix`` on the calibration text automp uses):

* ``llama.cpp <recipe>``: ``llama-quantize`` of the F16 file;
* ``automp .gguf``: ``automp run --engine llama.cpp`` (GGUF types as formats, GPTQ, verified delivery)
  at the recipe's bits per weight over the transformer-block tensors, written by ``automp export
  --format gguf``: automp's own quantized blocks in the file (the same file in both groups: automp
  calibrates on the same text the imatrix is computed from);
* ``automp map``: the same allocation as a recipe, ``llama-quantize --tensor-type-file`` of the F16 file.

Token embeddings and the output head are F16 on every side (``--token-embedding-type F16
--output-tensor-type F16`` for llama-quantize; automp keeps them in 16-bit), so the block tensors are
what differs and file sizes are equal up to each allocation's rounding (both are printed). With
``--embeddings`` they are allocated too: ``automp run --embeddings --lm-head`` chooses ``token_embd`` and
``output`` types with the block tensors (at the recipe's bits over all of them, so the files are the same
size), and llama-quantize's recipes keep their own defaults (``token_embd`` the base type, ``output``
Q6_K); those files and runs carry an ``-embed`` suffix in ``--work``.
Every file is scored by ``llama-perplexity -c 512`` on WikiText-2 test and on an unseen Wikipedia shard
(in-domain), all chunks; each chunk's mean NLL (llama-perplexity scores the second half of every chunk)
is recovered from its cumulative output, and ΔNLL against the recipe at the same size is paired per
chunk with its SE. Finished files and scores are cached in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import IN_DOMAIN, WIKITEXT, markdown_table, report  # noqa: E402

RECIPES = "Q2_K,Q3_K_S,Q3_K_M,Q4_K_S"
GGUF_FORMATS = "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0,fp16"
CALIB = "calib/wiki.txt"
DENSE_TYPES = ["--token-embedding-type", "F16", "--output-tensor-type", "F16"]
OUTER_TENSORS = ("token_embd.weight", "output.weight")  # allocated with --embeddings
CONVERT = """
import sys
sys.path[:0] = [{src!r}, {src!r} + "/gguf-py"]
import convert_hf_to_gguf
from conversion import base

known = base.TextModel.get_vocab_base_pre


def pre(self, tokenizer):  # an unknown byte-level BPE hash: GPT-2's split regex, as its ByteLevel uses
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"


base.TextModel.get_vocab_base_pre = pre
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outfile", {out!r}, "--outtype", "f16"]
convert_hf_to_gguf.main()
"""


def sh(*args, **kwargs) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def build_llama(work: Path) -> Path:
    """llama.cpp's source tree with the three tools built in ``build/bin``, from the llama-cpp-python sdist."""
    src = work / "llama.cpp"
    if not (src / "build/bin/llama-perplexity").is_file():
        sh(sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python",
           "-d", work / "sdist")  # fmt: skip
        archive = next((work / "sdist").glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(work / "sdist", filter="data")
        vendored = next((work / "sdist").glob("llama_cpp_python-*/vendor/llama.cpp"))
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(vendored, src)
        sh("cmake", "-B", src / "build", "-S", src, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
           "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF")  # fmt: skip
        sh("cmake", "--build", src / "build", "-j2", "--target", "llama-quantize", "llama-imatrix", "llama-perplexity")
    return src


class Llama:
    def __init__(self, src: Path, threads: int):
        self.src, self.bin, self.threads = src, src / "build/bin", threads

    def convert(self, model: Path, out: Path) -> Path:
        if not out.is_file():
            script = CONVERT.format(src=str(self.src), model=str(model), out=str(out))
            sh(sys.executable, "-c", script, cwd=self.src)
        return out

    def imatrix(self, f16: Path, text: Path, out: Path, chunks: int) -> Path:
        if not out.is_file():
            sh(self.bin / "llama-imatrix", "-m", f16, "-f", text, "-o", out, "-c", 512, "--chunks", chunks,
               "-t", self.threads)  # fmt: skip
        return out

    def quantize(
        self, f16: Path, out: Path, kind: str, imatrix: Path | None = None, types: Path | None = None, dense=True
    ):
        """``llama-quantize`` of the F16 file; ``dense``: token_embd and output stay F16 (else its defaults)."""
        if not out.is_file():
            extra = ["--imatrix", imatrix] if imatrix else []
            extra += ["--tensor-type-file", types] if types else []
            extra += DENSE_TYPES if dense else []
            sh(self.bin / "llama-quantize", *extra, f16, out, kind, self.threads)
        return out

    def chunk_nll(self, model: Path, text: Path, cache: Path) -> np.ndarray:
        """Each chunk's mean NLL: llama-perplexity's cumulative mean NLL (``--ppl-output-type 1``) differenced."""
        if not cache.is_file():
            out = sh(self.bin / "llama-perplexity", "-m", model, "-f", text, "-c", 512, "-b", 2048,
                     "--ppl-output-type", 1, "-t", self.threads)  # fmt: skip
            cumulative = [float(m[1]) for m in re.finditer(r"^\s*\d+\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s*$", out, re.M)]
            if not cumulative:
                raise RuntimeError(f"no perplexity output from {model}:\n{out[-2000:]}")
            cache.write_text(json.dumps(cumulative))
        cumulative = np.array(json.loads(cache.read_text()))
        i = np.arange(1, len(cumulative) + 1)
        return i * cumulative - np.concatenate([[0.0], (i * cumulative)[:-1]])


def block_bits(path: Path, embeddings: bool = False) -> tuple[float, dict[str, int]]:
    """Bits per weight over the transformer-block tensors (``blk.*``) of a GGUF file, ``token_embd`` and
    ``output`` too with ``embeddings``, and their type counts."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    stored = numel = 0
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        allocated = tensor.name.startswith("blk.") or (embeddings and tensor.name in OUTER_TENSORS)
        if allocated and len(tensor.shape) == 2:
            stored, numel = stored + int(tensor.n_bytes), numel + int(np.prod(tensor.shape))
            types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return 8 * stored / numel, types


def outer_types(path: Path) -> dict[str, str]:
    """The GGML types of ``token_embd`` and ``output`` in a GGUF file."""
    from gguf import GGUFReader

    found = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors if t.name in OUTER_TENSORS}
    return {"token_embd": found.get("token_embd.weight", "-"), "output": found.get("output.weight", "-")}


def automp(*args) -> None:
    sh("automp", *args)


def paired(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    diff = other - reference
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", required=True, help="cache: llama.cpp, GGUF files, runs and scores")
    parser.add_argument("--llama", help="a llama.cpp source tree with build/bin (default: build one in --work)")
    parser.add_argument("--recipes", default=RECIPES)
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows (automp) / chunks (imatrix)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--embeddings", action="store_true",
        help="allocate token_embd and output too (automp --embeddings --lm-head; llama.cpp's default types)",
    )  # fmt: skip
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    work, data, model = Path(args.work), Path(args.data), Path(args.model).resolve()
    work.mkdir(parents=True, exist_ok=True)
    llama = Llama(Path(args.llama) if args.llama else build_llama(work), args.threads)
    f16 = llama.convert(model, work / "model-f16.gguf")
    calib = data / CALIB
    imatrix = llama.imatrix(f16, calib, work / "imatrix.gguf", args.nsamples)
    texts = {"wikitext": data / WIKITEXT, "in-domain": data / IN_DOMAIN}

    def score(path: Path) -> dict[str, np.ndarray]:
        return {name: llama.chunk_nll(path, text, path.with_suffix(f".{name}.json")) for name, text in texts.items()}

    fp = score(f16)
    rows = []
    embed, dense = "-embed" if args.embeddings else "", not args.embeddings
    for recipe in args.recipes.split(","):
        for with_imatrix in (False, True):
            tag = f"{recipe}{'-imatrix' if with_imatrix else ''}{embed}"
            reference = llama.quantize(
                f16, work / f"llama-{tag}.gguf", recipe, imatrix if with_imatrix else None, dense=dense
            )
            bits, _ = block_bits(reference, args.embeddings)
            run = work / f"run-{recipe}{embed}"
            if not (run / "automp_quant.json").is_file():
                target = math.ceil(bits * 1e9) / 1e9  # rounded up: the recipe itself must fit
                automp("run", "--model", model, "--engine", "llama.cpp", "--formats", GGUF_FORMATS,
                       "--target-bits", f"{target:.9f}", "--calib", calib, "--nsamples", args.nsamples,
                       "--out", run, *(["--embeddings", "--lm-head"] if args.embeddings else []))  # fmt: skip
            own = work / f"automp-{recipe}{embed}"
            if not (own / "model.gguf").is_file():
                automp("export", "--run", run, "--format", "gguf", "--out", own)
            mapped_dir = work / f"map-{recipe}{embed}"
            if not (mapped_dir / "gguf_map.json").is_file():
                automp("export", "--run", run, "--format", "gguf-map", "--out", mapped_dir)
            base_type = json.loads((mapped_dir / "gguf_map.json").read_text())["base_type"]
            mapped = llama.quantize(
                f16, work / f"automp-map-{tag}.gguf", base_type, imatrix if with_imatrix else None,
                types=mapped_dir / "tensor_types.txt", dense=dense,
            )  # fmt: skip
            candidates = {f"llama.cpp {recipe}": reference, "automp map": mapped, "automp .gguf": own / "model.gguf"}
            base = score(reference)
            for label, path in candidates.items():
                scores = score(path)
                row = {"recipe": recipe, "imatrix": with_imatrix, "label": label, "bytes": path.stat().st_size,
                       "block_bits": block_bits(path, args.embeddings)[0], **outer_types(path)}  # fmt: skip
                for name in texts:
                    nll = scores[name]
                    row[f"{name}_ppl"] = float(np.exp(nll.mean()))
                    row[f"{name}_fp_delta"] = float(nll.mean() - fp[name].mean())
                    row[f"{name}_delta"], row[f"{name}_se"] = paired(base[name], nll)
                rows.append(row)
                print(json.dumps(row), flush=True)

    columns = [
        ("recipe", "size of", ""), ("imatrix", "imatrix", ""), ("label", "file", ""), ("bytes", "bytes", "d"),
        ("block_bits", "allocated bpw" if args.embeddings else "block bpw", ".4f"),
    ]  # fmt: skip
    columns += [("token_embd", "token_embd", ""), ("output", "output", "")] if args.embeddings else []
    for name, title in (("wikitext", "WikiText-2"), ("in-domain", "in-domain")):
        columns += [(f"{name}_ppl", f"{title} PPL", ".3f"), (f"{name}_delta", "ΔNLL vs recipe", "+.5f"),
                    (f"{name}_se", "±", ".5f")]  # fmt: skip
    payload = {
        "model": str(model),
        "fp16": {name: float(np.exp(nll.mean())) for name, nll in fp.items()},
        "chunks": {name: len(nll) for name, nll in fp.items()},
        "rows": rows,
    }
    table = markdown_table(rows, columns)
    table += "\n\nF16: " + ", ".join(f"{name} PPL {ppl:.3f}" for name, ppl in payload["fp16"].items())
    report("automp against llama.cpp's recipes, in llama.cpp", payload, table, args.out)


if __name__ == "__main__":
    main()
