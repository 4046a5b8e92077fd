"""Loading a causal LM safely, and the inventory of its quantizable linear layers.

The inventory lists every linear layer inside the decoder blocks (GPT-2's ``Conv1D`` counts as
linear, with its weight seen transposed as (out, in)), its block and its role, and which layers
serving engines fuse (q/k/v, gate/up) so that allocations can tie their formats.

Two optional layers join it on request: the output head (role ``lm_head``, block ``len(blocks)``)
and the token embedding (role ``embed``, block -1, first). The embedding's weight is (vocab, hidden),
so its rows are tokens and ``out_features`` is the vocabulary: each quantization row is one token's
vector of ``hidden`` values, as llama.cpp stores ``token_embd`` (``ne0 = hidden``). Looked up rather
than multiplied, it is quantized with RTN whatever the method (``quantize.py``). A model that ties
its embedding to its head (one tensor) cannot have the embedding allocated: that is one error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from automp.errors import AutompError

# Role of a layer from the last one or two components of its name.
ROLES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "fc1": "fc1", "fc2": "fc2",
    "c_attn": "qkv", "attn.c_proj": "o", "c_fc": "fc1", "mlp.c_proj": "fc2",
    "query_key_value": "qkv", "dense_h_to_4h": "fc1", "dense_4h_to_h": "fc2", "attention.dense": "o",
}  # fmt: skip
FUSED_ROLES = (("q", "k", "v"), ("gate", "up"))  # fused into one GEMM by vLLM and friends
EMBED_ROLE, HEAD_ROLE = "embed", "lm_head"  # the optional layers: token embedding, output head
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LayerInfo:
    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    block: int
    role: str
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass
class Inventory:
    layers: list[LayerInfo]
    fused: list[list[str]]  # groups of layer names that engines fuse

    def to_json(self) -> dict:
        return {"layers": [asdict(layer) for layer in self.layers], "fused": self.fused}

    def by_name(self) -> dict[str, LayerInfo]:
        return {layer.name: layer for layer in self.layers}


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's block list: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise AutompError(f"{type(model).__name__}: no decoder blocks (nn.ModuleList) found")
    return max(lists, key=len)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def role_of(name: str) -> str:
    parts = name.split(".")
    return ROLES.get(".".join(parts[-2:]), ROLES.get(parts[-1], parts[-1]))


def inventory(model: nn.Module, include_lm_head: bool = False, include_embeddings: bool = False) -> Inventory:
    """Every linear layer inside the decoder blocks, plus the output head and the token embedding when asked."""
    blocks = decoder_blocks(model)
    block_prefix = {id(block): i for i, block in enumerate(blocks)}
    names = {id(m): n for n, m in model.named_modules()}
    layers: list[LayerInfo] = [_embedding_layer(model)] if include_embeddings else []
    for block in blocks:
        index, prefix = block_prefix[id(block)], names[id(block)]
        for sub, module in block.named_modules():
            if is_linear(module):
                out_f, in_f = linear_weight(module).shape
                layers.append(LayerInfo(f"{prefix}.{sub}", index, role_of(sub), out_f, in_f))
    if include_lm_head:
        head = lm_head_name(model)
        if head is None:
            raise AutompError("this model has no linear lm_head to quantize")
        out_f, in_f = linear_weight(model.get_submodule(head)).shape
        layers.append(LayerInfo(head, len(blocks), HEAD_ROLE, out_f, in_f))
    if not any(layer.block >= 0 for layer in layers):
        raise AutompError(f"{type(model).__name__}: no linear layers found inside the decoder blocks")
    fused = []
    for index in range(len(blocks)):
        for roles in FUSED_ROLES:
            group = [layer.name for layer in layers if layer.block == index and layer.role in roles]
            if len(group) > 1:
                fused.append(group)
    return Inventory(layers, fused)


def inventory_for(
    model: nn.Module, names: Iterable[str], *, lm_head: bool = False, embeddings: bool = False
) -> Inventory:
    """The inventory an allocation over layer ``names`` needs: the output head and the token embedding when it
    names them (or ``lm_head`` / ``embeddings`` asks for them)."""
    names = set(names)
    return inventory(
        model,
        include_lm_head=lm_head or lm_head_name(model) in names,
        include_embeddings=embeddings or embedding_name(model) in names,
    )


def embedding_name(model: nn.Module) -> str | None:
    """The module name of the token embedding (an ``nn.Embedding``), or None."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        return None
    return next(name for name, module in model.named_modules() if module is embedding)


def _embedding_layer(model: nn.Module) -> LayerInfo:
    """The token embedding as a layer: (vocab, hidden), rows are tokens; refused when tied to the head."""
    name = embedding_name(model)
    if name is None:
        raise AutompError(f"{type(model).__name__} has no nn.Embedding token embedding to quantize")
    weight = model.get_submodule(name).weight
    head = model.get_output_embeddings()
    if head is not None and head.weight is weight:
        raise AutompError(
            f"{type(model).__name__} ties its token embedding to its output head (tie_word_embeddings: one "
            "tensor serves both), which automp cannot allocate as a layer yet: leave out --embeddings"
        )
    vocab, hidden = weight.shape
    return LayerInfo(name, -1, EMBED_ROLE, vocab, hidden)


def lm_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings()
    if head is None or not is_linear(head):
        return None
    return next(name for name, module in model.named_modules() if module is head)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); GPT-2's Conv1D stores it transposed."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    set_parameter(module, "weight", weight.T if isinstance(module, Conv1D) else weight)


def set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a parameter's (or buffer's) data in its own dtype; for a streamed block (``execution/offload.py``)
    the value is written through to where the weight lives, not only to its onloaded copy."""
    value = value.to(getattr(module, name).dtype)
    if isinstance(module._parameters, dict):  # in memory (an offloaded module's tensors are an OffloadCache)
        getattr(module, name).data.copy_(value)
        return
    from automp.execution.offload import write_through  # streamed: the offload knows where the tensor lives

    write_through(module, name, value)


def max_positions(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


DEFAULT_SEQLEN = 2048


def checked_seqlen(requested: int | None, limit: int | None) -> int:
    """The window length: ``requested``, else 2048 capped at the model's maximum positions ``limit``."""
    seqlen = requested or min(DEFAULT_SEQLEN, limit or DEFAULT_SEQLEN)
    if seqlen < 2:
        raise AutompError("--seqlen must be at least 2")
    if limit and seqlen > limit:
        raise AutompError(f"--seqlen {seqlen} exceeds the model's maximum positions ({limit})")
    return seqlen


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AutompError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # CPUs are slow and imprecise in half precision
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise AutompError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    spec: str | Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    offload: str = "none",
    offload_dir: Path | None = None,
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from a local directory or a hub id; automp checkpoints are recognised.

    Weights load through safetensors (or ``torch.load(weights_only=True)`` inside transformers);
    remote code runs only when asked for. ``offload`` ``cpu`` or ``disk`` streams the decoder blocks
    (``execution/offload.py``): they stay there and come onto the device one at a time.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automp.checkpoint import QUANT_FILE, load_quantized

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = Path(spec)
    if path.exists():
        if not (path / "config.json").is_file():
            raise AutompError(f"{path} is not a model directory (no config.json)")
        source, local_only = str(path), True
    elif str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise AutompError(f"model path {spec} does not exist")
    else:
        source, local_only = str(spec), False
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=local_only, trust_remote_code=trust_remote_code
        )
        if (path / QUANT_FILE).is_file():
            if offload != "none":
                raise AutompError(f"{path} is an automp output: it loads in memory only (--offload none)")
            model = load_quantized(path, torch_dtype)
        elif offload != "none":
            from automp.execution.offload import load_streamed

            model = load_streamed(
                source, offload, dev, torch_dtype, offload_dir=offload_dir, local_only=local_only,
                trust_remote_code=trust_remote_code,
            )  # fmt: skip
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, local_files_only=local_only, trust_remote_code=trust_remote_code
            )
    except AutompError:
        raise
    except OSError as err:
        if local_only:
            raise AutompError(f"could not load the model in {path}: {err}") from err
        raise AutompError(
            f"could not fetch {spec!r} from the Hugging Face hub (offline or unknown id?); "
            f"pass a local model directory instead ({err.__class__.__name__})"
        ) from err
    except Exception as err:  # corrupt files surface as many different exception types
        raise AutompError(f"could not load model {spec}: {err}") from err
    check_finite(model)
    model.eval()
    return (model if offload != "none" else model.to(dev)), tokenizer


def check_finite(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise AutompError(f"the model's weights contain NaN or Inf (first in {name})")
