"""automp's GGUF quantizers against llama.cpp's own (``ggml_quantize_chunk`` through ctypes), per type.

    python bench/gguf_reference.py --lib /path/to/libggml-base.so --model ../shared/models/bench-a \\
        --data ../shared/data

Every 2-D tensor of the model's ``model.safetensors`` (embeddings and ``lm_head`` included, as
llama-quantize quantizes them) and a few random tensors (Gaussian and heavy-tailed) are quantized by
automp and by llama.cpp, without and with an importance matrix. The importance of a linear layer's
columns is the mean square of its real inputs on calibration text (``--data``; ``diag(X^T X / n)``,
which is what llama.cpp's imatrix stores); for the embeddings and the random tensors it is that of
random correlated activations. Per type it reports

* ``identical``: the fraction of blocks whose bytes are identical,
* ``max |Δ|``: the largest difference between the two dequantized tensors,
* ``decoder ≠``: values where automp's decoder differs (bitwise) from llama.cpp's ``dequantize_row_*``
  on llama.cpp's blocks,
* ``GPTQ / imatrix RTN``: automp-GPTQ's Hessian-weighted error ``tr((W-Q) H (W-Q)^T)`` over that of
  llama.cpp's RTN with the importance matrix (also over plain RTN, and imatrix RTN over plain RTN),
  the mean ratio over the tensors with a Hessian (worst: the largest), separately for the linear
  layers' real Hessians (``--data``) and the random tensors' random ones (the embeddings have none).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from automp.formats import get_format  # noqa: E402
from automp.quantizers.ggml_lib import ggml_dequantize, ggml_quantize  # noqa: E402
from automp.quantizers.gguf_weight import GGUFWeight  # noqa: E402
from automp.quantizers.gptq import HessianAccumulator, gptq_quantize  # noqa: E402
from automp.quantizers.rtn import rtn_quantize  # noqa: E402
from common import markdown_table, report  # noqa: E402

TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "iq4_nl")


def random_hessian(cols: int, gen: torch.Generator, tokens: int = 2048) -> torch.Tensor:
    """X^T X / n of correlated activations with uneven column scales."""
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=gen) @ mix * torch.rand(cols, generator=gen).mul(3).exp()
    return x.T @ x / tokens


def real_hessians(model_dir: str, data_dir: str, nsamples: int, seqlen: int) -> dict[str, torch.Tensor]:
    """Per linear layer (by its weight's name): X^T X / n of its inputs on calibration text."""
    from automp.data import load_windows
    from automp.model import load_model

    model, tokenizer = load_model(model_dir, device="cpu", dtype="float32")
    windows = load_windows(str(Path(data_dir) / "calib" / "wiki.txt"), tokenizer, seqlen, nsamples, seed=0)
    accumulators, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            acc = accumulators[name + ".weight"] = HessianAccumulator(module.in_features)
            handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0].detach())))
    with torch.no_grad():
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: acc.hessian for name, acc in accumulators.items()}


def tensors(args) -> list[tuple[str, torch.Tensor, torch.Tensor, str]]:
    """(name, weight, hessian, its source) for every model tensor and the random ones. The source is
    "real" (inputs on calibration text), "random" (a random tensor's own activations) or "none" (the
    embeddings, which have no Hessian: their random one only provides an importance matrix)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    if args.model:
        state = load_file(str(Path(args.model) / "model.safetensors"))
        hessians = real_hessians(args.model, args.data, args.nsamples, args.seqlen) if args.data else {}
        for name, w in state.items():
            if w.dim() == 2 and w.shape[1] % 256 == 0:
                H = hessians[name] if name in hessians else random_hessian(w.shape[1], gen)
                out.append((name, w.float(), H, "real" if name in hessians else "none"))
    for i in range(args.random):
        w = torch.randn(256, 1024, generator=gen) * 0.02
        out.append((f"random.gauss.{i}", w, random_hessian(1024, gen), "random"))
        outliers = 1 + 30 * (torch.rand(256, 1024, generator=gen) < 0.002)
        heavy = w * torch.randn(256, 1024, generator=gen).exp() * outliers
        out.append((f"random.heavy.{i}", heavy, random_hessian(1024, gen), "random"))
    return out


def hessian_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    d = (w - q).double()
    return torch.einsum("ri,ij,rj->", d, H.double(), d).item()


def compare(args, name: str, items) -> dict:
    fmt = get_format(name)
    row = {"type": fmt.ggml_type, "tensors": len(items)}
    seconds = {"automp": 0.0, "llama.cpp": 0.0, "gptq": 0.0}
    errors = {"real": [], "random": []}  # per tensor with a Hessian: (llama plain, llama imatrix, automp GPTQ)
    llama_plain = []
    for variant in ("plain", "imatrix"):
        same = blocks = decoder_mismatches = 0
        max_diff = 0.0
        for index, (_tensor, w, H, source) in enumerate(items):
            imatrix = torch.diag(H) if variant == "imatrix" else None
            start = time.perf_counter()
            ours = rtn_quantize(w, fmt, imatrix)
            seconds["automp"] += time.perf_counter() - start
            start = time.perf_counter()
            theirs = GGUFWeight(fmt, ggml_quantize(args.lib, fmt, w, imatrix))
            seconds["llama.cpp"] += time.perf_counter() - start
            a, b = ours.blocks.reshape(-1, fmt.type_size), theirs.blocks.reshape(-1, fmt.type_size)
            same += int((a == b).all(dim=1).sum())
            blocks += len(a)
            max_diff = max(max_diff, (ours.dequantize() - theirs.dequantize()).abs().max().item())
            # automp's decoder against llama.cpp's dequantize_row_* on the same (llama.cpp's) bytes
            reference = ggml_dequantize(args.lib, fmt, theirs.blocks)
            decoder_mismatches += int((theirs.dequantize().view(torch.int32) != reference.view(torch.int32)).sum())
            if variant == "plain":
                llama_plain.append(hessian_error(w, theirs.dequantize(), H))
            elif source != "none" and not args.no_gptq:
                start = time.perf_counter()
                gptq = hessian_error(w, gptq_quantize(w, H, fmt).dequantize(), H)
                seconds["gptq"] += time.perf_counter() - start
                errors[source].append((llama_plain[index], hessian_error(w, theirs.dequantize(), H), gptq))
        row[f"identical_{variant}"] = same / blocks
        row[f"blocks_{variant}"] = blocks
        row[f"max_diff_{variant}"] = max_diff
        row[f"decoder_mismatches_{variant}"] = decoder_mismatches
    for source, triples in errors.items():
        if triples:
            ratios = {
                "gptq_over_imatrix": [g / i for _, i, g in triples],
                "gptq_over_plain": [g / p for p, _, g in triples],
                "imatrix_over_plain": [i / p for p, i, _ in triples],
            }
            for key, values in ratios.items():
                row[f"{key}_{source}"] = sum(values) / len(values)
            row[f"gptq_over_imatrix_{source}_worst"] = max(ratios["gptq_over_imatrix"])
    row["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True, help="llama.cpp's libggml-base.so (a shared build)")
    parser.add_argument("--model", help="a model directory with model.safetensors")
    parser.add_argument("--data", help="shared/data: real inputs for the importance matrix and GPTQ's Hessian")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--random", type=int, default=2, help="random tensors of each kind")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--no-gptq", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    items = tensors(args)
    rows = [compare(args, name, items) for name in args.types.split(",")]
    payload = {
        "lib": args.lib, "model": args.model, "data": args.data,
        "tensors": [{"name": n, "shape": list(w.shape), "hessian": source} for n, w, _, source in items],
        "rows": rows,
    }  # fmt: skip
    columns = [
        ("type", "type", ""), ("blocks_plain", "blocks", "d"),
        ("identical_plain", "identical (no imatrix)", ".6f"), ("max_diff_plain", "max abs Δ (no imatrix)", ".3g"),
        ("identical_imatrix", "identical (imatrix)", ".6f"), ("max_diff_imatrix", "max abs Δ (imatrix)", ".3g"),
        ("decoder_mismatches_plain", "decoder ≠ (no imatrix)", "d"),
        ("decoder_mismatches_imatrix", "decoder ≠ (imatrix)", "d"),
        ("gptq_over_imatrix_real", "GPTQ / imatrix RTN (real H)", ".3f"),
        ("gptq_over_imatrix_real_worst", "worst", ".3f"),
        ("gptq_over_plain_real", "GPTQ / plain RTN (real H)", ".3f"),
        ("imatrix_over_plain_real", "imatrix / plain RTN (real H)", ".3f"),
        ("gptq_over_imatrix_random", "GPTQ / imatrix RTN (random H)", ".3f"),
        ("gptq_over_imatrix_random_worst", "worst", ".3f"),
    ]  # fmt: skip
    report("automp vs llama.cpp ggml_quantize_chunk", payload, markdown_table(rows, columns), args.out)


if __name__ == "__main__":
    main()
