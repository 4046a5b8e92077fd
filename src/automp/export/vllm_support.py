"""Which layers of an allocation vLLM can serve from a compressed-tensors ``pack-quantized`` checkpoint.

vLLM runs these checkpoints through its W{4,8}A16 scheme (``CompressedTensorsWNA16``) with the
Marlin kernel (Machete on Hopper for the shapes it covers). Marlin implements

* symmetric 4-bit (``uint4b8``) and 8-bit (``uint8b128``) weights,
* asymmetric weights only at 4 bits (``uint4`` with zero-points),
* per-channel scales or groups of 32, 64 or 128 inputs,
* shapes whose output dimension is a multiple of 64 and input dimension a multiple of 128 (per
  tensor-parallel shard); other shapes need a slower fallback kernel, if one applies.

Other widths (2 and 3 bits, asymmetric 8-bit) load in transformers only. vLLM also fuses q/k/v and
gate/up into one GEMM with one scheme, so a fused group whose members have different formats (a
16-bit member counts as a format) cannot be served; the search's tie constraints prevent this.
A ``+rN`` layer counts as its base format there: its correction is a LoRA adapter beside the checkpoint.

The adapter (``peft_adapter.py``) is served with ``--enable-lora --max-lora-rank R``, where ``R`` must be at
least the largest rank and one of ``VLLM_MAX_LORA_RANKS`` (``MaxLoRARanks`` in vllm/config/lora.py,
https://docs.vllm.ai/en/v0.14.0/api/vllm/config/lora/). LoRA layers wrap any linear quantization method
(https://github.com/vllm-project/vllm/pull/4012) and pack q/k/v and gate/up adapters into the fused modules.
An adapter on ``lm_head`` is served only for models whose vLLM class declares ``lm_head`` among its LoRA
``embedding_modules`` (Llama's does), through its logits processor; other models reject the adapter.
"""

from __future__ import annotations

from automp.allocation import Allocation
from automp.formats import Format
from automp.model import Inventory

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts

MARLIN_GROUPS = (None, 32, 64, 128)  # None: one scale per output channel
MARLIN_TILE_OUT, MARLIN_TILE_IN = 64, 128


def servable_format(fmt: Format) -> bool:
    """Whether vLLM's W{4,8}A16 kernels implement this format (16-bit layers are served unquantized)."""
    if not fmt.quantized:
        return True
    bits_ok = fmt.bits in (4, 8) if fmt.symmetric else fmt.bits == 4
    return fmt.kind == "int" and bits_ok and fmt.group_size in MARLIN_GROUPS


def vllm_warnings(inv: Inventory, allocation: Allocation) -> list[str]:
    """One line per problem, each naming the layers concerned; empty when vLLM can serve everything."""
    warnings = []
    unservable = [f"{lay.name} ({allocation.formats[lay.name]})" for lay in inv.layers
                  if not servable_format(allocation.format_of(lay.name))]  # fmt: skip
    if unservable:
        warnings.append(
            "vLLM's W4A16/W8A16 kernels (Marlin/Machete) serve symmetric 4- and 8-bit and asymmetric 4-bit weights "
            "with per-channel scales or groups of 32/64/128; these layers load in transformers only: "
            + ", ".join(unservable)
        )
    return warnings + tiling_warnings(inv, allocation) + fused_warnings(inv, allocation)


def tiling_warnings(inv: Inventory, allocation: Allocation) -> list[str]:
    """Quantized layers whose shape Marlin does not tile (a slower fallback kernel, if any, serves them)."""
    untileable = [lay.name for lay in inv.layers if allocation.format_of(lay.name).quantized
                  and (lay.out_features % MARLIN_TILE_OUT or lay.in_features % MARLIN_TILE_IN)]  # fmt: skip
    if not untileable:
        return []
    return [
        f"Marlin needs out_features % {MARLIN_TILE_OUT} == 0 and in_features % {MARLIN_TILE_IN} == 0; vLLM "
        "needs a slower fallback kernel (if any applies) for: " + ", ".join(untileable)
    ]


def fused_warnings(inv: Inventory, allocation: Allocation) -> list[str]:
    """Fused groups (q/k/v, gate/up) whose members have different (base) formats: vLLM cannot load them."""
    mixed = [group for group in inv.fused if len({allocation.format_of(name).base for name in group}) > 1]
    if not mixed:
        return []
    described = "; ".join(", ".join(f"{name} ({allocation.formats[name]})" for name in group) for group in mixed)
    return [
        "vLLM fuses q/k/v and gate/up into one module with one format, so these fused groups with mixed formats "
        "cannot load in vLLM (tie their formats in the search): " + described
    ]


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that serves ``rank``; None beyond its largest."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), None)


def lora_warnings(inv: Inventory, allocation: Allocation) -> list[str]:
    """Where vLLM cannot serve the LoRA adapter of the ``+rN`` layers as written (empty without any)."""
    ranks = {lay.name: allocation.format_of(lay.name).rank for lay in inv.layers}
    warnings = []
    too_high = [f"{name} (rank {rank})" for name, rank in ranks.items() if vllm_max_lora_rank(rank) is None]
    if too_high:
        warnings.append(
            f"vLLM serves LoRA ranks up to --max-lora-rank {max(VLLM_MAX_LORA_RANKS)}, so it cannot load the adapter "
            "with these corrections (transformers with PEFT can): " + ", ".join(too_high)
        )
    heads = [lay.name for lay in inv.layers if lay.role == "lm_head" and ranks[lay.name]]
    if heads:
        warnings.append(
            "vLLM applies a LoRA adapter to lm_head only for models whose vLLM class lists lm_head among its LoRA "
            "embedding_modules (Llama's does) and rejects the adapter otherwise; corrected head: " + ", ".join(heads)
        )
    return warnings
