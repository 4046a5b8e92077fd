"""llama.cpp's own K-quant recipes (``llama-quantize model.gguf out.gguf Q3_K_M``) as automp allocations.

A recipe is a base type plus llama.cpp's per-tensor bumps (``llama_tensor_get_type_impl`` in
``src/llama-quant.cpp``), here for dense decoder blocks (no experts, not Falcon, not a 70B-type model):
attn_v, attn_output, ffn_down and a fused qkv get more bits by role and by layer position. When the
token embedding and the output head are allocated layers (``--embeddings``, ``--lm-head``) they get
llama-quantize's defaults: ``token_embd`` the recipe's base type, ``output`` Q6_K (Q8_0 for a row that
is not a multiple of 256). With ``--engine llama.cpp``
verification measures the largest recipe within the budget next to uniform, so what automp delivers
never measured worse than llama.cpp's own choice at the same bytes.
"""

from __future__ import annotations

from automp.model import EMBED_ROLE, HEAD_ROLE
from automp.sensitivity.table import LayerStats

BASE = {
    "Q2_K": "q2_k", "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q3_K_L": "q3_k", "Q4_K_S": "q4_k",
    "Q4_K_M": "q4_k", "Q5_K_S": "q5_k", "Q5_K_M": "q5_k", "Q6_K": "q6_k",
}  # fmt: skip


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get one more step: the first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def recipe(name: str, layers: list[LayerStats]) -> dict[str, str]:
    """Layer name -> automp GGUF format under llama.cpp's recipe ``name`` (e.g. ``Q3_K_M``)."""
    by_role = {role: [layer for layer in layers if layer.role == role] for role in ("q", "k", "v", "o", "down")}
    n_gqa = by_role["q"][0].out_features // by_role["k"][0].out_features if by_role["q"] and by_role["k"] else 1
    n_layer = max((layer.block for layer in layers if layer.role not in (EMBED_ROLE, HEAD_ROLE)), default=0) + 1
    out = {}
    for layer in layers:
        fmt = BASE[name]
        if layer.role == HEAD_ROLE:
            fmt = "q6_k" if layer.in_features % 256 == 0 else "q8_0"
        elif layer.role == "v":
            fmt = _attn_v(name, by_role["v"].index(layer), len(by_role["v"]), n_gqa, fmt)
        elif layer.role in ("down", "fc2"):
            fmt = _ffn_down(name, layer.block, n_layer, fmt)
        elif layer.role == "o":
            fmt = {"Q2_K": "q3_k", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k"}.get(name, fmt)
        elif layer.role == "qkv":
            fmt = {"Q3_K_M": "q4_k", "Q3_K_L": "q4_k", "Q4_K_M": "q5_k", "Q5_K_M": "q6_k"}.get(name, fmt)
        out[layer.name] = fmt
    return out


def _attn_v(name: str, i: int, n: int, n_gqa: int, fmt: str) -> str:
    if name == "Q2_K":
        return "q4_k" if n_gqa >= 4 else "q3_k"
    if name == "Q3_K_M":
        return "q5_k" if i < 2 else "q4_k"
    if name == "Q3_K_L":
        return "q5_k"
    if name in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        return "q6_k"
    if name == "Q4_K_S" and i < 4:
        return "q5_k"
    return fmt


def _ffn_down(name: str, i: int, n: int, fmt: str) -> str:
    if name == "Q2_K":
        return "q3_k"
    if name == "Q3_K_M":
        return "q5_k" if i < n // 16 else "q4_k"
    if name == "Q3_K_L":
        return "q5_k"
    if name in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        return "q6_k"
    if name == "Q4_K_S" and i < n // 8:
        return "q5_k"
    return fmt
