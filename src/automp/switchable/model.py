"""One model that runs at any per-layer bit map: build it, switch it, save it, deliver a bitmap from it.

``build_switchable`` quantizes the model once per allowed format (RTN, or GPTQ block by block with the
format for every layer, exactly as ``automp quantize --scheme F`` does) and replaces every allocated
linear layer by a ``SwitchableLinear`` holding all those codes. PEFT then adds one LoRA adapter per
(layer, format) (``dispatch.py``). With ``init="eora"`` each adapter starts at the activation-aware
low-rank correction of that format's error (``quantizers/lowrank.py``, fitted while quantizing): the
untrained model at a uniform bitmap *is* post-hoc ``F+rR``. With ``init="zero"`` it starts at PEFT's
default (``B = 0``): post-hoc ``F``.

A *bitmap* maps every allocated layer to a format: a uniform format name, an allocation file
(``automp search``'s), or a mapping. ``F`` and ``F+rR`` (``R`` the adapters' rank) both name format
``F`` with its adapter, since the adapter is part of the model; ``fp16`` is the full-precision weight.
``allocation(bitmap)`` is what that bitmap delivers, ``F+rR`` per layer: its bits count the adapters.

The artefact (``save``/``load_switchable``), a directory: ``switchable.json`` (the manifest), per format
``codes/<F>/quantized.safetensors`` (packed codes, as in a checkpoint) and ``adapters/<F>/`` (PEFT's
``adapter_config.json`` and ``adapter_model.safetensors``). The full-precision model is read from the
manifest's ``model``, as ``automp repair`` reads it.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from automp.allocation import Allocation
from automp.checkpoint import read_qweights, write_qweights
from automp.errors import AutompError
from automp.formats import get_format
from automp.model import Inventory, inventory, linear_weight
from automp.quantize import GPTQConfig, quantize_, round_to_storage
from automp.quantizers.lowrank import LowRankCorrection
from automp.quantizers.qweight import CorrectedWeight, QuantizedWeight
from automp.switchable.dispatch import add_adapters, lora_config, set_format
from automp.switchable.layer import FULL, SwitchableLinear

MANIFEST = "switchable.json"
CODES_DIR = "codes"
ADAPTERS_DIR = "adapters"
ADAPTER_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix for the wrapped model's parameters
INITS = ("eora", "zero")


@dataclass
class SwitchableSpec:
    """How a switchable model was built, and how its adapters were trained (the manifest)."""

    model: str
    formats: list[str]  # low to high bits
    method: str = "gptq"
    rank: int = 8
    init: str = "eora"
    calib: str | None = None
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    training: dict = field(default_factory=dict)  # the training's config and held-out losses (train.py)
    version: int = 1

    def __post_init__(self) -> None:
        if not self.formats:
            raise AutompError("a switchable model needs at least one quantized format (--formats)")
        for name in self.formats:
            fmt = get_format(name)
            if not fmt.quantized or fmt.rank or fmt.kind == "gguf":
                raise AutompError(
                    f"{name} cannot be switched to: use automp's own quantized formats without +rN "
                    "(the adapters are the low-rank part), e.g. w2g64,w3g128,w4g128"
                )
        if self.rank < 1:
            raise AutompError(f"--rank must be at least 1, not {self.rank}")
        if self.init not in INITS:
            raise AutompError(f"unknown adapter init {self.init!r}: use one of {', '.join(INITS)}")
        self.formats = sorted({get_format(f).name for f in self.formats}, key=_bits_of)


def _bits_of(name: str) -> float:
    return get_format(name).storage_bits(4096, 4096) / 4096**2  # per weight at a typical shape, for ordering


class SwitchableModel:
    """A Hugging Face causal LM whose allocated linear layers switch format (and adapter) at run time."""

    def __init__(self, model: nn.Module, spec: SwitchableSpec, inv: Inventory):
        self.model, self.spec, self.inventory = model, spec, inv
        self.layers = {layer.name: model.get_submodule(layer.name) for layer in inv.layers}  # PEFT's wrappers

    # ---- switching ---------------------------------------------------------------------------------

    def resolve(self, bitmap: str | Path | dict[str, str] | Allocation) -> dict[str, str]:
        """Every layer's format under ``bitmap`` (a format name, an allocation file, a mapping)."""
        if isinstance(bitmap, Allocation):
            mapping = dict(bitmap.formats)
        elif isinstance(bitmap, dict):
            mapping = dict(bitmap)
        elif Path(bitmap).suffix == ".json" or Path(bitmap).is_file():
            mapping = _read_bitmap_file(Path(bitmap))
        else:
            mapping = dict.fromkeys(self.layers, str(bitmap))
        unknown = sorted(set(mapping) - set(self.layers))
        missing = sorted(set(self.layers) - set(mapping))
        if unknown or missing:
            raise AutompError(f"bitmap does not match the switchable model: unknown layers {unknown[:3]}, "
                              f"missing {missing[:3]}")  # fmt: skip
        return {name: self._trained(fmt) for name, fmt in mapping.items()}

    def _trained(self, name: str) -> str:
        fmt = get_format(name)
        if not fmt.quantized:
            return FULL
        if fmt.rank and fmt.rank != self.spec.rank:
            raise AutompError(f"{name}: this switchable model's adapters have rank {self.spec.rank}")
        if fmt.base.name not in self.spec.formats:
            raise AutompError(f"format {name} was not built into this switchable model: use one of "
                              f"{', '.join(self.spec.formats)} or {FULL}")  # fmt: skip
        return fmt.base.name

    def set_config(self, bitmap, adapters: bool = True) -> dict[str, str]:
        """Run every layer in its bitmap format, with that format's adapter unless ``adapters`` is off."""
        resolved = self.resolve(bitmap)
        for name, fmt in resolved.items():
            set_format(self.layers[name], fmt, adapters)
        return resolved

    def uniform(self, fmt: str) -> dict[str, str]:
        return dict.fromkeys(self.layers, fmt)

    def allocation(self, bitmap) -> Allocation:
        """What ``bitmap`` delivers: ``F+rR`` per quantized layer, so its bits count the adapters."""
        suffix = f"+r{self.spec.rank}"
        return Allocation(formats={n: f if f == FULL else f + suffix for n, f in self.resolve(bitmap).items()})

    def avg_bits(self, bitmap) -> float:
        return self.allocation(bitmap).avg_bits(self.inventory)

    # ---- adapters ----------------------------------------------------------------------------------

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if ".lora_A." in name or ".lora_B." in name]

    def adapter_state(self, fmt: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=fmt)

    def load_adapter_state(self, fmt: str, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state, adapter_name=fmt)
        if getattr(result, "unexpected_keys", None):
            raise AutompError(f"adapter {fmt} does not match the model: {result.unexpected_keys[:3]}")

    # ---- delivery ----------------------------------------------------------------------------------

    def delivered_weights(self, bitmap) -> dict[str, CorrectedWeight]:
        """Each quantized layer's stored codes plus its adapter as a ``+rR`` correction (fp16 ``A``, ``B``)."""
        allocation = self.allocation(bitmap)
        out = {}
        for name, fmt in self.resolve(bitmap).items():
            if fmt == FULL:
                continue
            layer = self.layers[name]
            A = layer.lora_A[fmt].weight.detach()  # (r, in)
            B = layer.lora_B[fmt].weight.detach() * layer.scaling[fmt]  # (out, r)
            correction = LowRankCorrection(A=A.cpu().half().contiguous(), B=B.cpu().half().contiguous())
            out[name] = CorrectedWeight(allocation.format_of(name), layer.base_layer.stored[fmt], correction)
        return out

    def delivered_bytes(self, bitmap) -> int:
        """Bytes of the checkpoint ``bitmap`` delivers: packed codes and fp16 adapters of its quantized layers,
        every other tensor (biases, norms, embeddings, 16-bit layers) once in 16-bit."""
        qweights = self.delivered_weights(bitmap)
        seen: set[int] = set()
        dense = 0
        for name, tensor in self.model.state_dict().items():
            owner = next((layer for layer in self.layers if name.startswith(layer + ".")), None)
            # of a switchable layer only its bias, and the weight of a 16-bit one, are stored dense; its codes and
            # adapters are counted with the delivered weights
            if owner is not None:
                kept = [f"{owner}.base_layer.bias"] + ([f"{owner}.base_layer.weight"] if owner not in qweights else [])
                if name not in kept:
                    continue
            if tensor.untyped_storage().data_ptr() in seen:
                continue
            seen.add(tensor.untyped_storage().data_ptr())
            dense += tensor.numel() * (2 if tensor.dtype == torch.float32 else tensor.element_size())
        return dense + sum(q.stored_bytes() for q in qweights.values())

    # ---- the artefact ------------------------------------------------------------------------------

    def save(self, out: Path) -> None:
        from peft import LoraConfig

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for fmt in self.spec.formats:
            stored = {name: layer.base_layer.stored[fmt] for name, layer in self.layers.items()}
            write_qweights(out / CODES_DIR / fmt, stored)
            folder = out / ADAPTERS_DIR / fmt
            folder.mkdir(parents=True, exist_ok=True)
            state = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.adapter_state(fmt).items()}
            save_file(state, folder / ADAPTER_FILE)
            config = lora_config(list(self.layers), self.spec.rank)
            LoraConfig.save_pretrained(config, folder)  # PEFT's own serialisation (the custom mapping is not saved)
        (out / MANIFEST).write_text(json.dumps(asdict(self.spec), indent=1))


@torch.no_grad()
def build_switchable(
    model: nn.Module,
    spec: SwitchableSpec,
    calib: torch.Tensor | None = None,
    *,
    gptq: GPTQConfig | None = None,
    stored: dict[str, dict[str, QuantizedWeight]] | None = None,
    progress: bool = True,
) -> SwitchableModel:
    """Make ``model`` (full precision) switchable between ``spec.formats``, in place.

    ``stored``: each format's codes by layer when already made (a saved artefact, a resumed build);
    the others are quantized here with ``spec.method``."""
    inv = inventory(model)
    stored = dict(stored or {})
    corrections: dict[str, dict[str, LowRankCorrection]] = {}
    for fmt in spec.formats:
        if fmt in stored:
            continue
        scheme = f"{fmt}+r{spec.rank}" if spec.init == "eora" else fmt
        working = copy.deepcopy(model)
        qweights = quantize_(working, Allocation.uniform(inv, scheme), spec.method, calib, gptq=gptq,
                             progress=progress)  # fmt: skip
        stored[fmt] = {n: q.base if isinstance(q, CorrectedWeight) else q for n, q in qweights.items()}
        corrections[fmt] = {n: q.correction for n, q in qweights.items() if isinstance(q, CorrectedWeight)}
        del working
    for layer in inv.layers:
        module = model.get_submodule(layer.name)
        bias = getattr(module, "bias", None)
        switchable = SwitchableLinear(linear_weight(module), bias, {f: stored[f][layer.name] for f in spec.formats})
        parent, _, child = layer.name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, switchable)
    round_to_storage(model)  # every tensor as a delivered checkpoint stores it (the codes were made before)
    for param in model.parameters():
        param.requires_grad_(False)
    with warnings.catch_warnings():  # PEFT warns that a second adapter is being added: that is the design
        warnings.simplefilter("ignore")
        add_adapters(model, [layer.name for layer in inv.layers], spec.formats, spec.rank)
    switchable = SwitchableModel(model, spec, inv)
    for fmt, by_layer in corrections.items():
        for name, correction in by_layer.items():
            layer = switchable.layers[name]
            layer.lora_A[fmt].weight.copy_(correction.A.float())
            layer.lora_B[fmt].weight.copy_(correction.B.float())
    switchable.set_config(FULL)
    return switchable


def read_spec(path: Path) -> SwitchableSpec:
    """The manifest of the switchable model saved in ``path``."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise AutompError(f"{path} is not a switchable model directory (no {MANIFEST}); run automp switchable train")
    return SwitchableSpec(**json.loads(manifest.read_text()))


def load_switchable(path: Path, model: nn.Module | None = None, dtype: str = "auto", device: str = "auto"):
    """The switchable model saved in ``path``; ``model``: its full-precision model when already loaded."""
    path = Path(path)
    spec = read_spec(path)
    if model is None:
        from automp.model import load_model

        model, _ = load_model(spec.model, dtype=dtype, device=device)
    inv = inventory(model)
    stored = {}
    for fmt in spec.formats:
        qweights = read_qweights(path / CODES_DIR / fmt, Allocation.uniform(inv, fmt))
        stored[fmt] = {name: q.to(model.device) for name, q in qweights.items()}
    switchable = build_switchable(model, spec, stored=stored, progress=False)
    for fmt in spec.formats:
        file = path / ADAPTERS_DIR / fmt / ADAPTER_FILE
        try:
            state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(file).items()}
        except Exception as err:
            raise AutompError(f"corrupt switchable model in {path}: {err}") from err
        switchable.load_adapter_state(fmt, state)
    return switchable


def _read_bitmap_file(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AutompError(f"could not read bitmap {path}: {err}") from err
    mapping = data.get("formats", data) if isinstance(data, dict) else None  # an allocation or a plain mapping
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise AutompError(f"{path} is not a bitmap: expected an allocation file or a JSON object layer -> format")
    return mapping
