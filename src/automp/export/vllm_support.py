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
"""

from __future__ import annotations

from automp.allocation import Allocation
from automp.formats import Format
from automp.model import Inventory

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
    """Fused groups (q/k/v, gate/up) whose members have different formats: vLLM cannot load them."""
    mixed = [group for group in inv.fused if len({allocation.formats[name] for name in group}) > 1]
    if not mixed:
        return []
    described = "; ".join(", ".join(f"{name} ({allocation.formats[name]})" for name in group) for group in mixed)
    return [
        "vLLM fuses q/k/v and gate/up into one module with one format, so these fused groups with mixed formats "
        "cannot load in vLLM (tie their formats in the search): " + described
    ]
