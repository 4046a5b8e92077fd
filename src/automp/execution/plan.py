"""The memory plan: every stage's peak device, CPU and disk bytes, predicted from a model's config alone.

:func:`memory_plan` reads ``config.json`` (``AutoConfig``, never remote code) and, for a local directory,
the safetensors index or file headers (the stored dtype and bytes). It builds the model on the ``meta``
device, so nothing is allocated and no weights are downloaded. For every stage it counts what automp holds at
the stage's peak, in two execution modes:

* ``in-memory``: the whole model on the device, as automp runs today;
* ``streaming``: one decoder block on the device at a time, with its Hessians (or training state) and one
  activation batch. The block inputs of every calibration window stay in host memory, the weights are read
  block by block from the checkpoint, and finished outputs are written to disk.

The stages are ``load``, ``profile`` (what ``automp profile`` holds today: its pre-pass gathers the hessian,
grad, fisher and outgrad terms at once), ``profile.<proxy>`` (what measuring that proxy alone would hold;
``automp profile --kl`` holds ``profile`` plus ``profile.kl``'s reference and probe), ``gptq``, ``awq``,
``repair`` (Block-AP), ``perplexity``, ``tasks``, ``evaluator`` (the search's cached-weight evaluator;
``evaluator.kl`` with ``--metric kl``) and ``export``. Every stage is predicted; the mode is chosen
for the planned ones (by default those ``automp run`` and ``automp export`` go through). ``mode`` is
``in-memory`` when every planned stage fits that way. Otherwise it is ``streaming`` when every planned stage
fits that way, and None when neither does. :func:`check_plan` refuses a stage that fits neither way, in one
line with the numbers. ``device_bytes`` is the device's peak, ``cpu_bytes`` the host memory used
besides it, ``disk_bytes`` what the stage reads from or writes to disk (the checkpoint, outputs, offloaded
state). On a CPU plan the device is the host, so a stage fits when its device and CPU bytes together fit.

The formulas use these symbols (all in bytes): ``w`` bytes per value of the working dtype; ``N`` windows of
``T`` tokens in batches of ``B``; ``d`` the hidden size, ``V`` the vocabulary, ``L`` the decoder blocks;
``M`` the model's weights, ``Mb`` the largest block's, ``Mo`` those outside the blocks (embedding, head,
final norm); ``S = N T d w``, one block's inputs for every window; ``Hb``, the fp32 ``in x in`` Hessians of
one block's linear layers. Each stage's function says which code each term comes from. The CUDA context,
allocator slack and Python's own memory are not counted: keep about 1 GiB free beyond the plan.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel
from torch import nn

from automp.budget import parse_size
from automp.checkpoint import SHARD_BYTES
from automp.errors import AutompError
from automp.formats import Format, parse_formats
from automp.model import LayerInfo, checked_seqlen, decoder_blocks, inventory, max_positions, resolve_dtype
from automp.quantizers.awq import scale_groups
from automp.quantizers.awq_clip import TOKENS as AWQ_CLIP_TOKENS

if TYPE_CHECKING:
    from automp.settings import PlanSettings

Mode = Literal["in-memory", "streaming"]
MODES: tuple[Mode, ...] = ("in-memory", "streaming")
PROXIES = ("hessian", "outgrad", "fisher", "grad", "weight", "kl")
PROFILE_STAGES = ("profile", *(f"profile.{proxy}" for proxy in PROXIES))  # profile: all four pre-pass proxies
STAGES = (
    "load",
    *PROFILE_STAGES,
    "gptq",
    "awq",
    "repair",
    "perplexity",
    "tasks",
    "evaluator",
    "evaluator.kl",
    "export",
)
DEFAULT_STAGES = "load,profile,gptq,perplexity,export"  # what `automp run` (GPTQ, no --kl, no --repair) and export run
KL_WINDOWS = 8  # ProfileSettings.kl_windows' default
REPAIR_BATCH = 4  # ReconstructConfig.batch_size: windows per Block-AP step
FP32, FP64, INT64, FP16 = 4, 8, 8, 2
GIB = 2**30
PLAN_VERSION = 1
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8"}
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
# Per proxy, what its pre-pass keeps per layer beside the Hessian (every proxy's dW is GPTQ's, which needs H):
# weight-sized fp32 accumulators (mean gradient, Fisher) and whether an (out,) output-gradient vector; "all"
# is the pre-pass `automp profile` runs today, which gathers the four together.
PROXY_ACCUMULATORS = {
    "hessian": (0, False), "weight": (0, False), "kl": (0, False), "grad": (1, False), "fisher": (1, False),
    "outgrad": (0, True), "all": (2, True),
}  # fmt: skip
BACKWARD_PROXIES = ("grad", "fisher", "outgrad", "all")  # need a backward pass per window


# ---- the model's shape, from the config and the meta model ----------------------------------------------


@dataclass(frozen=True)
class BlockShape:
    """One decoder block as the formulas see it."""

    params: int
    linears: tuple[LayerInfo, ...]
    attention_width: int  # per token: the q/k/v outputs and the attention output (o's input)
    mlp_width: int  # per token: the widest MLP activation (gate/up/fc1 output)
    awq_widths: tuple[int, ...]  # per AWQ scale group: the width of the input it captures for every window

    @property
    def linear_params(self) -> int:
        return sum(layer.numel for layer in self.linears)

    @property
    def widest_input(self) -> int:
        return max(layer.in_features for layer in self.linears)

    @property
    def hessian_bytes(self) -> int:
        return sum(layer.in_features**2 for layer in self.linears) * FP32


@dataclass(frozen=True)
class ModelShape:
    """What the formulas read from a model: its counts and sizes, and how its checkpoint is stored."""

    name: str
    params: int  # unique parameters: a tied embedding and head once
    blocks: tuple[BlockShape, ...]
    hidden: int
    vocab: int
    heads: int
    eager: bool  # eager attention materialises (B, heads, T, T) scores; sdpa and flash kernels do not
    max_positions: int | None
    stored_bytes: int  # the checkpoint's tensor bytes (safetensors headers, else params x the config's dtype)
    stored_dtype: str

    @property
    def block(self) -> BlockShape:
        return max(self.blocks, key=lambda block: block.params)

    @property
    def outside_params(self) -> int:
        return self.params - sum(block.params for block in self.blocks)

    @property
    def linears(self) -> list[LayerInfo]:
        return [layer for block in self.blocks for layer in block.linears]


def model_shape(model: str) -> ModelShape:
    """The shape of ``model`` (a local directory, possibly holding config.json alone, or a hub id)."""
    config = _config(model)
    skeleton = _meta_model(config, model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab, hidden = skeleton.get_input_embeddings().weight.shape
    params = sum(param.numel() for param in skeleton.parameters())
    layers = inventory(skeleton).layers
    stored = stored_checkpoint(Path(model)) if Path(model).is_dir() else None
    dtype = _config_dtype(text)
    if stored is None:
        stored = (params * DTYPE_BYTES.get(dtype, FP32), dtype)
    elif stored[1] is None:  # an index without its shards: its total size, the config's dtype
        stored = (stored[0], dtype)
    return ModelShape(
        name=model,
        params=params,
        blocks=tuple(
            _block_shape(block, tuple(layer for layer in layers if layer.block == index))
            for index, block in enumerate(decoder_blocks(skeleton))
        ),
        hidden=hidden,
        vocab=vocab,
        heads=text.num_attention_heads,
        eager=getattr(skeleton.config, "_attn_implementation", None) == "eager",
        max_positions=max_positions(skeleton),
        stored_bytes=stored[0],
        stored_dtype=stored[1],
    )


def _config(model: str):
    from transformers import AutoConfig

    path = Path(model)
    if path.exists() and not (path / "config.json").is_file():
        raise AutompError(f"{path} is not a model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=False, local_files_only=path.exists())
    except Exception as err:  # offline hub id, broken JSON, unknown model type
        raise AutompError(f"could not read the config of {model}: {err}") from err


def _meta_model(config, model: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as err:  # architectures transformers does not know raise many types
        raise AutompError(f"could not build the model described by {model} on the meta device: {err}") from err


def _block_shape(block: nn.Module, linears: tuple[LayerInfo, ...]) -> BlockShape:
    """``block``'s shape; ``linears``: its layers in the inventory."""
    if not linears:
        raise AutompError(f"{type(block).__name__}: no linear layers in the decoder block")
    attention = sum(layer.out_features for layer in linears if layer.role in ("q", "k", "v", "qkv"))
    attention += sum(layer.in_features for layer in linears if layer.role == "o")
    mlp = [layer.out_features for layer in linears if layer.role in ("gate", "up", "fc1")]
    return BlockShape(
        params=sum(param.numel() for param in block.parameters()),
        linears=linears,
        attention_width=attention,
        mlp_width=max(mlp or [layer.out_features for layer in linears]),
        awq_widths=tuple(group.linears[0].in_features for group in scale_groups(block)),
    )


def _config_dtype(config) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"  # transformers' default


def stored_checkpoint(path: Path) -> tuple[int, str | None] | None:
    """Tensor bytes and the dtype holding most of them, of the safetensors weights in ``path``, from the
    headers alone; an index whose shards are absent gives its ``total_size`` and no dtype; None without either."""
    index = path / "model.safetensors.index.json"
    try:
        listed = json.loads(index.read_text()) if index.is_file() else None
    except (OSError, ValueError) as err:
        raise AutompError(f"could not read {index}: {err}") from err
    if listed:
        files = sorted({path / name for name in listed["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    present = [file for file in files if file.is_file()]
    if listed and len(present) < len(files):
        total = listed.get("metadata", {}).get("total_size")
        return (int(total), None) if total else None
    by_dtype: Counter[str] = Counter()
    for file in present:
        for entry in _safetensors_header(file).values():
            start, end = entry["data_offsets"]
            by_dtype[SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower())] += end - start
    if not by_dtype:
        return None
    return sum(by_dtype.values()), by_dtype.most_common(1)[0][0]


def _safetensors_header(file: Path) -> dict:
    """A safetensors file's header: its first 8 bytes give the length of the JSON that follows."""
    try:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > file.stat().st_size:
                raise ValueError("the header length runs past the end of the file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as err:
        raise AutompError(f"could not read the safetensors header of {file}: {err}") from err
    header.pop("__metadata__", None)
    return header


# ---- the terms every formula is made of -------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What the run processes, and how."""

    nsamples: int  # N calibration windows
    seqlen: int  # T tokens each
    batch_size: int  # B windows per forward
    formats: tuple[Format, ...]  # each layer is counted at the one that takes the most bytes
    dtype_bytes: int  # w
    on_cpu: bool  # the device is the host
    kl_windows: int = KL_WINDOWS
    repair_batch: int = REPAIR_BATCH


@dataclass(frozen=True)
class Terms:
    """The sizes the stage formulas are made of, for one model and workload."""

    shape: ModelShape
    work: Workload

    @property
    def w(self) -> int:
        return self.work.dtype_bytes

    @property
    def model(self) -> int:  # M
        return self.shape.params * self.w

    @property
    def block(self) -> int:  # Mb
        return self.shape.block.params * self.w

    @property
    def outside(self) -> int:  # Mo: embedding, head, final norm
        return self.shape.outside_params * self.w

    @property
    def head(self) -> int:
        """The output head's weight, V x d (on the device for the logits even when tied to the embedding)."""
        return self.shape.vocab * self.shape.hidden * self.w

    def cache(self, windows: int | None = None) -> int:
        """S: one block's inputs for every window, kept by ``capture_block_inputs`` and ``propagate``."""
        return (self.work.nsamples if windows is None else windows) * self.work.seqlen * self.shape.hidden * self.w

    def tokens(self) -> int:
        """The calibration windows' token ids (int64)."""
        return self.work.nsamples * self.work.seqlen * INT64

    def hidden_states(self, batch: int) -> int:
        """A batch's residual stream, B x T x d."""
        return batch * self.work.seqlen * self.shape.hidden * self.w

    def batch_io(self, batch: int) -> int:
        """A batch's block input moved to the device and its output (streaming)."""
        return 2 * self.hidden_states(batch)

    def forward(self, batch: int) -> int:
        """One block's forward without gradients: the residual stream and the block's output (2d per token),
        plus the larger of attention's q/k/v and output (``attention_width``) and the MLP's gate, up and their
        activated product (3 x ``mlp_width``); eager attention also holds its scores and their softmax."""
        block, seqlen = self.shape.block, self.work.seqlen
        per_token = 2 * self.shape.hidden + max(block.attention_width, 3 * block.mlp_width)
        per_token += 2 * self.shape.heads * seqlen if self.shape.eager else 0
        return batch * seqlen * per_token * self.w

    def train_activations(self, batch: int) -> int:
        """What autograd keeps through one block: the two norms' inputs and outputs (4d per token), attention's
        q, k, v and output (``attention_width``), and the MLP's gate and up outputs, their activation and product
        (4 x ``mlp_width``; 2 without a gate); eager attention's scores and probabilities too."""
        block, seqlen = self.shape.block, self.work.seqlen
        mlp_tensors = 4 if any(layer.role == "gate" for layer in block.linears) else 2
        per_token = 4 * self.shape.hidden + block.attention_width + mlp_tensors * block.mlp_width
        per_token += 2 * self.shape.heads * seqlen if self.shape.eager else 0
        return batch * seqlen * per_token * self.w

    def hessian_update(self, batch: int) -> int:
        """``HessianAccumulator.add`` on the widest input: ``x.float()`` (B T in x 4), ``x^T x`` and its quotient."""
        widest = self.shape.block.widest_input
        return batch * self.work.seqlen * widest * FP32 + 2 * widest**2 * FP32

    def logits(self, batch: int, backward: bool = False) -> int:
        """Logits (B T V w), their fp32 copy when w is not 4, then cross_entropy's flattened shifted copy and
        its log_softmax (2 x 4 bytes a value); with a backward, the logits' gradient too."""
        values = batch * self.work.seqlen * self.shape.vocab
        return values * (self.w + (FP32 if self.w != FP32 else 0) + 2 * FP32 + (FP32 if backward else 0))

    def gptq_work(self, layer: LayerInfo) -> int:
        """``gptq_quantize`` beyond its inputs: W in fp32, its act-order copy and Q (3 x out in x 4), encode's int64
        codes, and the Hessian's copy, its Cholesky factor and the inverse factor Hinv (3 x in^2 x 4)."""
        return 3 * layer.numel * FP32 + layer.numel * INT64 + 3 * layer.in_features**2 * FP32

    def held(self, layer: LayerInfo) -> int:
        """The largest of the formats' weights as ``quantize_`` holds them until saving (``held_bytes``)."""
        return max(held_bytes(fmt, layer) for fmt in self.work.formats)

    def stored(self, layer: LayerInfo) -> int:
        """The largest of the formats' packed bytes (``Format.storage_bits``), as the checkpoint stores it."""
        return max(math.ceil(fmt.storage_bits(layer.out_features, layer.in_features) / 8) for fmt in self.work.formats)

    def stored_output(self) -> int:
        """The quantized checkpoint: every block linear packed, every other tensor in 16-bit (``checkpoint.py``)."""
        dense = self.shape.params - sum(layer.numel for layer in self.shape.linears)
        return sum(self.stored(layer) for layer in self.shape.linears) + dense * FP16

    def stored_block(self) -> int:
        return sum(self.stored(layer) for layer in self.shape.block.linears)

    def shard(self) -> int:
        """One shard of a streamed run's checkpoint as it is written (``checkpoint.SHARD_BYTES``), and the layer
        that closes it."""
        return min(SHARD_BYTES + max(self.stored(layer) for layer in self.shape.linears), self.stored_output())

    def held_all(self) -> int:
        return sum(self.held(layer) for layer in self.shape.linears)

    def held_block(self) -> int:
        return sum(self.held(layer) for layer in self.shape.block.linears)

    def largest_gptq(self) -> int:
        return max(self.gptq_work(layer) for layer in self.shape.block.linears)


def held_bytes(fmt: Format, layer: LayerInfo) -> int:
    """A stored weight in memory: uint8 codes, fp16 scales and uint8 zero-points per group (``QuantizedWeight``),
    GGUF blocks as packed, a ``+rN`` correction's fp16 A and B; 16-bit formats stay in the model itself."""
    if not fmt.quantized:
        return 0
    correction = fmt.rank * (layer.in_features + layer.out_features) * FP16
    base = fmt.base
    if base.kind == "gguf":
        return math.ceil(base.storage_bits(layer.out_features, layer.in_features) / 8) + correction
    base.check_shape(layer.out_features, layer.in_features)
    groups = layer.out_features * (layer.in_features // base.group(layer.in_features))
    return layer.numel + groups * (FP16 + (0 if base.symmetric else 1)) + correction


# ---- the stages -----------------------------------------------------------------------------------------


class StageMemory(BaseModel):
    device_bytes: int
    cpu_bytes: int
    disk_bytes: int


def _memory(device: int, cpu: int, disk: int) -> StageMemory:
    return StageMemory(device_bytes=device, cpu_bytes=cpu, disk_bytes=disk)


def _load(t: Terms) -> dict[str, StageMemory]:
    # in-memory: from_pretrained materialises M in host memory, then .to(device) copies it (a no-op on a CPU plan)
    # streaming: the tensors outside the blocks stay in host memory; blocks are read from the checkpoint when used
    stored = t.shape.stored_bytes
    return {
        "in-memory": _memory(t.model, 0 if t.work.on_cpu else t.model, stored),
        "streaming": _memory(0, t.outside, stored),
    }


def _gptq(t: Terms) -> dict[str, StageMemory]:
    # quantize_: block inputs S for every window stay on the device; each block hooks all its linears (Hb),
    # runs a batch (forward + Hessian update), quantizes layer by layer (gptq_work), then propagate() builds
    # the next inputs (another S) while the old ones live. QuantizedWeights pile up until saving, whose
    # _dense_tensors and packed codes pass through host memory. (With --repair, quantize_model's full-precision
    # reference copy adds M on the device: see repair.)
    calibrate = t.shape.block.hessian_bytes + t.forward(t.work.batch_size) + t.hessian_update(t.work.batch_size)
    quantize = t.shape.block.hessian_bytes + t.largest_gptq()
    propagate = t.cache() + t.forward(t.work.batch_size)
    in_memory = t.model + t.held_all() + t.cache() + max(calibrate, quantize, propagate)
    # streaming: the block and its Hessians on the device, one batch at a time; S in and S out in host memory. Each
    # finished layer's QuantizedWeight waits on disk (SpilledWeights); saving writes them one shard at a time
    calibrate_one = t.batch_io(t.work.batch_size) + t.forward(t.work.batch_size) + t.hessian_update(t.work.batch_size)
    streaming = t.block + t.shape.block.hessian_bytes + max(calibrate_one, t.largest_gptq() + t.held_block())
    host = t.outside + 2 * t.cache() + t.block + t.held_block() + t.shard() + t.tokens()
    return {
        "in-memory": _memory(in_memory, t.tokens() + t.stored_output(), t.stored_output()),
        "streaming": _memory(streaming, host, t.stored_output()),
    }


def _awq(t: Terms) -> dict[str, StageMemory]:
    # awq_scale_block captures, for every window at once, the input of each scale group's module (attention,
    # o_proj, MLP, down_proj: N T sum(widths) w) and keeps them through the block. search_scales holds the
    # searched module's fp32 outputs for every window (N T d x 4). The clipping pass samples AWQ_CLIP_TOKENS
    # fp32 rows per layer; in fp32 those rows are views (x[::stride].float() copies nothing), so each layer's
    # whole input stays alive: the captures once more. A +rN format also hooks the block's Hessians.
    block, batch = t.shape.block, t.work.batch_size
    captured = t.work.nsamples * t.work.seqlen * sum(block.awq_widths) * t.w
    clip = AWQ_CLIP_TOKENS * sum(layer.in_features for layer in block.linears) * FP32
    clip = captured if t.w == FP32 else clip
    hessians = block.hessian_bytes if any(fmt.rank for fmt in t.work.formats) else 0
    search = max(t.work.nsamples * t.work.seqlen * t.shape.hidden * FP32, clip) + hessians
    in_memory = t.model + t.held_all() + t.cache() + max(captured + search, t.cache()) + t.forward(batch)
    # streaming: the captures stay in host memory, one group's batch at a time goes to the device
    group_batch = batch * t.work.seqlen * max(block.awq_widths, default=t.shape.hidden) * t.w
    reference = batch * t.work.seqlen * t.shape.hidden * FP32
    streaming = t.block + t.held_block() + hessians + t.batch_io(batch) + t.forward(batch) + group_batch + reference
    host = t.outside + 2 * t.cache() + captured + search + t.block + t.held_block() + t.shard() + t.tokens()
    return {
        "in-memory": _memory(in_memory, t.tokens() + t.stored_output(), t.stored_output()),
        "streaming": _memory(streaming, host, t.stored_output()),
    }


def _repair(t: Terms) -> dict[str, StageMemory]:
    # reconstruct_ (Block-AP, the larger of the two methods): the full-precision reference is a second model;
    # inputs, fp_inputs, targets and the next inputs are four caches S. Per quantized weight the training holds
    # 32 bytes: the fp32 latent, its gradient, AdamW's two moments, the best state's copy, and three weight-sized
    # fp32 tensors in the graph (the dequantized weight and its rounding). One step of REPAIR_BATCH windows keeps
    # its activations for the backward, and the MSE's fp32 output and target. Finished blocks go to the state dir.
    # Streamed, the block trains as an onloaded copy beside the full-precision block's weights; the caches wait on
    # the host, the QuantizedWeights on disk.
    batch, block = t.work.repair_batch, t.shape.block
    training = 32 * block.linear_params + t.train_activations(batch) + 2 * batch * t.work.seqlen * t.shape.hidden * FP32
    stored_layers = sum(t.stored(layer) for layer in t.shape.linears)
    in_memory = 2 * t.model + t.held_all() + 4 * t.cache() + training
    streaming = 2 * t.block + training + t.batch_io(batch)
    host = 2 * t.outside + 4 * t.cache() + 2 * t.block + t.held_block() + t.tokens()
    return {
        "in-memory": _memory(in_memory, t.tokens() + t.stored_block(), stored_layers),
        "streaming": _memory(streaming, host, stored_layers),
    }


def _evaluation(t: Terms, logits: int) -> dict[str, StageMemory]:
    # `automp eval`: a batch's residual stream through the model, one block's activations at a time, then the
    # logits (after `automp quantize --eval`, the quantized weights still held add held_all). Streaming runs each
    # batch through the blocks in turn (the blocks are read again per batch: slow, but nothing is cached)
    batch = t.work.batch_size
    in_memory = t.model + t.hidden_states(batch) + max(t.forward(batch), logits)
    streaming = max(t.block + t.batch_io(batch) + t.forward(batch), t.head + t.hidden_states(batch) + logits)
    return {"in-memory": _memory(in_memory, 0, 0), "streaming": _memory(streaming, t.outside + t.block, 0)}


def _perplexity(t: Terms) -> dict[str, StageMemory]:
    return _evaluation(t, t.logits(t.work.batch_size))  # perplexity(): logits.float() and cross_entropy


def _tasks(t: Terms) -> dict[str, StageMemory]:
    # tasks.score: the logits stay in the model's dtype; only each continuation's rows are taken to fp32.
    # Requests are truncated to the model's maximum positions; --seqlen is taken as their length.
    return _evaluation(t, t.work.batch_size * t.work.seqlen * t.shape.vocab * t.w)


def _evaluator(t: Terms, kl: bool) -> dict[str, StageMemory]:
    # search.evaluator.AllocationEvaluator (search --verify/--refine, anneal, reinforce, ppo): the model, a copy of
    # every inventory layer's original weight and its dequantized weight in every quantized format (in w), cached
    # up front; with GPTQ from full-precision block inputs (S in and S out, a block's Hessians, GPTQ's work). Then
    # each evaluation runs a batch of the held-out windows to its logits; with kl, the full-precision log-probs of
    # KL_WINDOWS windows (search's --eval-windows default) stay cached. In memory only: both modes hold the same.
    batch = t.work.batch_size
    weights = (1 + sum(fmt.quantized for fmt in t.work.formats)) * sum(layer.numel for layer in t.shape.linears) * t.w
    build = 2 * t.cache() + t.shape.block.hessian_bytes + t.largest_gptq()
    evaluate = t.hidden_states(batch) + max(t.forward(batch), t.logits(batch))
    reference = t.work.kl_windows * t.work.seqlen * t.shape.vocab * FP32 if kl else 0
    figures = _memory(t.model + weights + reference + max(build, evaluate), t.tokens(), 0)
    return {"in-memory": figures, "streaming": figures}


def _export(t: Terms) -> dict[str, StageMemory]:
    # exports read the whole checkpoint (RunDir: packed weights and dense tensors) and write a converted copy, in
    # either mode: they do not convert tensor by tensor yet
    out = t.stored_output()
    return {"in-memory": _memory(0, 2 * out, out), "streaming": _memory(0, 2 * out, out)}


def _profile(t: Terms, proxy: str) -> dict[str, StageMemory]:
    # profile_model: a pre-pass over the windows one at a time keeps every layer's accumulators (the Hessian,
    # plus the proxy's own), saves them to the work directory and loads them back; then each layer is measured
    # in every format (_measure_layer). Proxies with gradients run a backward per window; grad and fisher also
    # get every weight's gradient at once (torch.autograd.grad). kl keeps the reference log-probs of its windows.
    return {"in-memory": _profile_in_memory(t, proxy), "streaming": _profile_streaming(t, proxy)}


def _profile_in_memory(t: Terms, proxy: str) -> StageMemory:
    everything = _accumulators(t.shape.linears, proxy)
    if proxy in BACKWARD_PROXIES:  # the whole model's graph for one window, the logits' and the weights' gradients
        window = len(t.shape.blocks) * t.train_activations(1) + t.logits(1, backward=True) + t.hessian_update(1)
        window += _weight_gradients(t, t.shape.linears, proxy)
    else:
        window = t.hidden_states(1) + t.forward(1) + t.hessian_update(1)
    measure = _measure(t, proxy)
    if proxy == "kl":  # the probe runs while the layer's quantized weight is in place
        kl = _kl_terms(t)
        return _memory(t.model + everything + kl.reference + max(window, measure + kl.probe), t.tokens(), everything)
    return _memory(t.model + everything + max(window, measure), t.tokens(), everything)


def _profile_streaming(t: Terms, proxy: str) -> StageMemory:
    # one block's accumulators on the device. Without a backward, as GPTQ. With one, a forward sweep writes every
    # block's inputs for every window to disk (L x S); a reverse sweep then runs each block window by window on
    # its inputs and on the output gradients at its boundary (N T d fp32, one set read and one written)
    block, everything = t.shape.block, _accumulators(t.shape.linears, proxy)
    on_device = t.block + _accumulators(block.linears, proxy)
    if proxy in BACKWARD_PROXIES:
        window = t.train_activations(1) + t.batch_io(1) + _weight_gradients(t, block.linears, proxy)
        head = t.head + t.logits(1, backward=True) + 2 * t.hidden_states(1)
        device = on_device + max(window + t.hessian_update(1), head, _measure(t, proxy))
        gradients = 2 * t.work.nsamples * t.work.seqlen * t.shape.hidden * FP32
        host = t.outside + gradients + t.block + t.tokens()
        return _memory(device, host, everything + len(t.shape.blocks) * t.cache())
    batch = t.work.batch_size
    calibrate = t.batch_io(batch) + t.forward(batch) + t.hessian_update(batch)
    kl = _kl_terms(t) if proxy == "kl" else None
    device = on_device + max(calibrate, _measure(t, proxy) + (kl.streamed if kl else 0))
    host = t.outside + 2 * t.cache() + t.block + t.tokens() + (kl.host if kl else 0)
    return _memory(device, host, everything)


def _accumulators(layers: list[LayerInfo] | tuple[LayerInfo, ...], proxy: str) -> int:
    """The pre-pass's fp32 accumulators of ``layers``: H (in x in), the proxy's weight-sized ones, its (out,) vector."""
    grads, outputs = PROXY_ACCUMULATORS[proxy]
    return sum(
        layer.in_features**2 * FP32 + grads * layer.numel * FP32 + (layer.out_features * FP32 if outputs else 0)
        for layer in layers
    )


def _weight_gradients(t: Terms, layers: list[LayerInfo] | tuple[LayerInfo, ...], proxy: str) -> int:
    """One window's gradients of every weight in ``layers`` (in w), and the largest one's fp32 copy; for the proxies
    that keep weight-sized accumulators only."""
    if not PROXY_ACCUMULATORS[proxy][0]:
        return 0
    return sum(layer.numel for layer in layers) * t.w + max(layer.numel for layer in layers) * FP32


def _measure(t: Terms, proxy: str) -> int:
    return max(_measure_bytes(t, layer, PROXY_ACCUMULATORS[proxy][0]) for layer in t.shape.block.linears)


def _measure_bytes(t: Terms, layer: LayerInfo, grads: int) -> int:
    """``_measure_layer`` on one layer: the weight in fp32, the proxy's accumulators in float64 and every format's
    result (kept per layer), then the larger of GPTQ's work and the error terms (the dequantized weight; the
    error, its square, ``error @ H`` and its product with the error in float64; H in float64)."""
    kept = layer.numel * (FP32 + grads * FP64) + sum(held_bytes(fmt, layer) for fmt in t.work.formats)
    errors = layer.numel * (FP32 + 4 * FP64) + layer.in_features**2 * FP64
    return kept + max(t.gptq_work(layer), errors)


@dataclass(frozen=True)
class _KLTerms:
    reference: int  # _KLProbe's reference log-probs: kl_windows x T x V fp32, on the model's device
    probe: int  # one probe batch: its forward, then its log-probs and kl_div's elementwise terms
    streamed: int  # streaming: the larger of a block step and the head step with the batch's reference
    host: int  # streaming: the reference and the KL windows' block inputs and outputs in host memory


def _kl_terms(t: Terms) -> _KLTerms:
    batch, windows = t.work.batch_size, t.work.kl_windows
    values = batch * t.work.seqlen * t.shape.vocab
    reference = windows * t.work.seqlen * t.shape.vocab * FP32
    # the logits, their fp32 copy and log_softmax; then log_softmax's output and kl_div's exp(target), difference
    # and elementwise product, all fp32
    logits = values * max(t.w + (FP32 if t.w != FP32 else 0) + FP32, 4 * FP32)
    probe = t.hidden_states(batch) + max(t.forward(batch), logits)
    head_step = t.head + t.hidden_states(batch) + logits + values * FP32
    streamed = max(t.batch_io(batch) + t.forward(batch), head_step)
    return _KLTerms(reference, probe, streamed, reference + 2 * t.cache(windows))


STAGE_FORMULAS = {
    "load": _load,
    "gptq": _gptq,
    "awq": _awq,
    "repair": _repair,
    "perplexity": _perplexity,
    "tasks": _tasks,
    "evaluator": lambda t: _evaluator(t, kl=False),
    "evaluator.kl": lambda t: _evaluator(t, kl=True),
    "export": _export,
    "profile": lambda t: _profile(t, "all"),
    **{f"profile.{proxy}": (lambda t, proxy=proxy: _profile(t, proxy)) for proxy in PROXIES},
}


def stage_memory(shape: ModelShape, work: Workload) -> dict[Mode, dict[str, StageMemory]]:
    """Each mode's figures for every stage: ``{mode: {stage: StageMemory}}``."""
    terms = Terms(shape, work)
    figures = {stage: STAGE_FORMULAS[stage](terms) for stage in STAGES}
    return {mode: {stage: figures[stage][mode] for stage in STAGES} for mode in MODES}


# ---- the plan -----------------------------------------------------------------------------------------------


class MemoryPlan(BaseModel):
    """The memory plan of one model and workload: the chosen mode and each stage's figures (see the module)."""

    version: int = PLAN_VERSION
    mode: Mode | None  # None: neither mode fits every planned stage
    model: str
    params: int
    device: Literal["cpu", "cuda"]
    dtype: str  # the working dtype
    stored_dtype: str
    stored_bytes: int
    nsamples: int
    seqlen: int
    batch_size: int
    formats: list[str]
    device_memory: int
    cpu_memory: int
    planned: list[str]  # the stages the mode was chosen to fit (every stage is predicted)
    stages: dict[str, StageMemory]  # the chosen mode's figures (streaming's when none fits)
    modes: dict[Mode, dict[str, StageMemory]]

    def fits(self, mode: Mode, stage: str) -> bool:
        return not any(self.over(self.modes[mode][stage]))

    def over(self, figures: StageMemory) -> tuple[bool, bool]:
        """Whether the device and the CPU figures exceed the memory given. On a CPU plan the device is the host:
        both figures count against the one memory, so both are over or neither is."""
        if self.device == "cpu":
            over = figures.device_bytes + figures.cpu_bytes > min(self.device_memory, self.cpu_memory)
            return over, over
        return figures.device_bytes > self.device_memory, figures.cpu_bytes > self.cpu_memory

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: Path) -> MemoryPlan:
        return cls.model_validate_json(Path(path).read_text())


def memory_plan(
    model: str,
    *,
    formats: str = "w2g64,w3g128,w4g128",
    nsamples: int = 128,
    seqlen: int | None = None,
    batch_size: int = 8,
    device_memory: str | int | None = None,
    cpu_memory: str | int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    stages: str = DEFAULT_STAGES,
) -> MemoryPlan:
    """The memory plan of ``model`` (see the module docstring). Sizes are written as ``--target-size`` is
    (``24GiB``, ``3.2GB``, ``512MiB``, bytes); ``device`` is the device planned for (auto: CUDA when this
    machine has it); ``dtype`` auto is float16 on CUDA and float32 on the CPU, as automp loads models. The
    mode is chosen to fit ``stages`` (comma-separated names from ``STAGES``)."""
    if nsamples < 1 or batch_size < 1:
        raise AutompError("--nsamples and --batch-size must be at least 1")
    planned = _stages(stages)
    target = _device(device)
    memory = _memory_limits(device_memory, cpu_memory, target)
    working = resolve_dtype(dtype, torch.device(target))
    parsed = tuple(parse_formats(formats))
    shape = model_shape(model)
    seqlen = checked_seqlen(seqlen, shape.max_positions)
    work = Workload(nsamples, seqlen, batch_size, parsed, working.itemsize, target == "cpu")
    modes = stage_memory(shape, work)
    plan = MemoryPlan(
        mode=None, model=model, params=shape.params, device=target, dtype=str(working).removeprefix("torch."),
        stored_dtype=shape.stored_dtype, stored_bytes=shape.stored_bytes, nsamples=nsamples, seqlen=seqlen,
        batch_size=batch_size, formats=[fmt.name for fmt in parsed], device_memory=memory[0], cpu_memory=memory[1],
        planned=list(planned), stages=modes["streaming"], modes=modes,
    )  # fmt: skip
    mode = next((mode for mode in MODES if all(plan.fits(mode, stage) for stage in planned)), None)
    return plan.model_copy(update={"mode": mode, "stages": modes[mode or "streaming"]})


def plan_command(settings: PlanSettings) -> MemoryPlan:
    """``automp plan``: the plan its settings describe."""
    return memory_plan(
        settings.model, formats=settings.formats, nsamples=settings.nsamples, seqlen=settings.seqlen,
        batch_size=settings.batch_size, device_memory=settings.device_memory, cpu_memory=settings.cpu_memory,
        dtype=settings.dtype, device=settings.device, stages=settings.stages,
    )  # fmt: skip


def _stages(stages: str) -> tuple[str, ...]:
    named = tuple(dict.fromkeys(name.strip() for name in stages.split(",") if name.strip()))
    unknown = [name for name in named if name not in STAGES]
    if unknown or not named:
        raise AutompError(f"unknown stage {(unknown or [stages])[0]!r} in --stages: use some of {', '.join(STAGES)}")
    return named


def _device(device: str) -> Literal["cpu", "cuda"]:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise AutompError(f"unknown device {device!r}: plan for auto, cpu or cuda")
    return device


def _memory_limits(device_memory: str | int | None, cpu_memory: str | int | None, device: str) -> tuple[int, int]:
    """Bytes of device and host memory: as given, else the CUDA device's total and the host's physical memory."""
    host = parse_size(cpu_memory, "--cpu-memory") if cpu_memory is not None else None
    if device_memory is not None:
        return parse_size(device_memory, "--device-memory"), host or host_memory()
    if device == "cuda":
        if not torch.cuda.is_available():
            raise AutompError("this machine has no CUDA device to read the memory of: give --device-memory, e.g. 24GiB")
        return torch.cuda.get_device_properties(0).total_memory, host or host_memory()
    host = host or host_memory()
    return host, host


def host_memory() -> int:
    """The host's physical memory in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError) as err:
        raise AutompError("could not read this machine's memory: give --cpu-memory, e.g. 64GiB") from err


# ---- refusing, and reading the plan ---------------------------------------------------------------------------


def check_plan(plan: MemoryPlan, stage: str) -> None:
    """Raise when ``stage`` fits neither mode of ``plan``; the message names the stage and the numbers."""
    if stage not in plan.modes["streaming"]:
        raise AutompError(f"the plan has no stage {stage!r}: it planned {', '.join(plan.modes['streaming'])}")
    if any(plan.fits(mode, stage) for mode in MODES):
        return
    in_memory = plan.modes["in-memory"][stage]
    if plan.device == "cpu":
        needed = in_memory.device_bytes + in_memory.cpu_bytes
    else:  # the in-memory figure of the memory streaming is short of
        over_device, over_cpu = plan.over(plan.modes["streaming"][stage])
        needed = in_memory.cpu_bytes if over_cpu and not over_device else in_memory.device_bytes
    raise AutompError(
        f"{shortfall(plan, stage, 'streaming')} (in-memory: {_gib(needed)}): no execution mode fits; "
        "lower --batch-size, --nsamples or --seqlen, or use a machine with more memory"
    )


def check_mode(plan: MemoryPlan, mode: Mode, advice: str) -> None:
    """Refuse, in one line, when a planned stage does not fit in ``mode``; ``advice`` follows the numbers."""
    blocked = next((stage for stage in plan.planned if not plan.fits(mode, stage)), None)
    if blocked is not None:
        raise AutompError(f"{shortfall(plan, blocked, mode)}: {advice}")


def plan_if_known(model: str, **workload) -> MemoryPlan | None:
    """``memory_plan(model, **workload)``, or None for a model the plan cannot describe (an architecture it does
    not know): the command then runs as asked. With a memory limit given the failure stands: it must be checked."""
    try:
        return memory_plan(model, **workload)
    except AutompError:
        if workload.get("device_memory") or workload.get("cpu_memory"):
            raise
        return None


def plan_refusal(plan: MemoryPlan) -> str | None:
    """Why no mode fits every planned stage (None when one does): the first stage streaming cannot run."""
    if plan.mode is not None:
        return None
    stage = next(stage for stage in plan.planned if not plan.fits("streaming", stage))
    try:
        check_plan(plan, stage)
    except AutompError as err:
        return str(err)
    blocked = next(stage for stage in plan.planned if not plan.fits("in-memory", stage))
    return (
        f"{shortfall(plan, stage, 'streaming')}, and {shortfall(plan, blocked, 'in-memory')}: no one execution mode "
        "fits every stage; plan fewer --stages, or lower --batch-size, --nsamples or --seqlen"
    )


def shortfall(plan: MemoryPlan, stage: str, mode: Mode) -> str:
    """What ``stage`` needs in ``mode`` against the memory given, in words."""
    figures = plan.modes[mode][stage]
    if plan.device == "cpu":
        total = figures.device_bytes + figures.cpu_bytes
        return (
            f"{stage} needs {_gib(total)} of memory in {mode} mode ({_gib(figures.device_bytes)} working set, "
            f"{_gib(figures.cpu_bytes)} offloaded); the CPU is the device and --device-memory is "
            f"{_gib(min(plan.device_memory, plan.cpu_memory))}"
        )
    over_device, over_cpu = plan.over(figures)
    needs = []
    if over_device or not over_cpu:
        needs.append(
            f"{stage} needs {_gib(figures.device_bytes)} of device memory in {mode} mode; "
            f"--device-memory is {_gib(plan.device_memory)}"
        )
    if over_cpu:
        needs.append(
            f"{stage} needs {_gib(figures.cpu_bytes)} of CPU memory in {mode} mode; "
            f"--cpu-memory is {_gib(plan.cpu_memory)}"
        )
    return "; ".join(needs)


def _gib(size: int) -> str:
    """A size in GiB, or MiB / KiB when smaller (a tiny model's figures still read as numbers)."""
    for unit, name in ((GIB, "GiB"), (2**20, "MiB")):
        if size >= unit:
            return f"{size / unit:.1f} {name}"
    return f"{size / 2**10:.1f} KiB"


def plan_table(plan: MemoryPlan) -> str:
    """The plan as a short readable table, in GiB."""
    chosen = plan.mode or "no mode fits"
    lines = [
        f"{plan.model}: {plan.params / 1e9:.2f} B parameters, {plan.dtype} on {plan.device} "
        f"(stored {plan.stored_dtype}, {plan.stored_bytes / GIB:.2f} GiB); {plan.nsamples} x {plan.seqlen} "
        f"calibration tokens, batches of {plan.batch_size}, formats {','.join(plan.formats)}",
        f"device memory {plan.device_memory / GIB:.2f} GiB, CPU memory {plan.cpu_memory / GIB:.2f} GiB: {chosen}",
        "",
        "| stage | planned | in-memory device | CPU | disk | streaming device | CPU | disk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in plan.stages:
        cells = ["yes" if stage in plan.planned else ""]
        for mode in MODES:
            figures = plan.modes[mode][stage]
            device, cpu = plan.over(figures)
            cells += [f"{figures.device_bytes / GIB:.2f}{' *' if device else ''}"]
            cells += [f"{figures.cpu_bytes / GIB:.2f}{' *' if cpu else ''}", f"{figures.disk_bytes / GIB:.2f}"]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append(
        "GiB; * over the memory given"
        + (" (on the CPU, device and CPU bytes share it)" if plan.device == "cpu" else "")
    )
    return "\n".join(lines)
