"""Per-window proxy terms: the sensitivity table's data-dependent proxies split over calibration
windows, so that ``--bootstrap`` can re-weight the windows without profiling again.

With each layer's GPTQ error ``dW`` held fixed (the codes the table was measured with), one forward
and one backward pass per calibration window ``i`` (window-mean NLL ``L_i``, as in the pre-pass)
record, per layer x quantized format, with ``X_i`` (T, in) the layer's inputs, ``T`` the window's
tokens and ``T' = T - 1`` its loss tokens:

* ``hessian``: ``h_i = ||X_i dW^T||^2 / T``. The pre-pass Hessian is ``H = mean_i X_i^T X_i / T``
  (equal-length windows), so ``mean_i h_i = tr(dW H dW^T)``, the table's ``output_err``;
* ``fisher``: ``f_i = 1/2 sum (g_i * dW)^2`` with ``g_i = dL_i/dW``: ``mean_i f_i`` is ``fisher``;
* ``outgrad``: ``output_grad = 1/2 sum_o G_o Q_o`` is a product of two means over windows,
  ``G_o = mean_i A_io`` with ``A_io = T' sum_t (dL_i/dy_to)^2`` and ``Q_o = mean_j Q_jo`` with
  ``Q_jo = sum_t (x_t . dW_o)^2 / T``. It is kept as the pair matrix ``P_ij = 1/2 sum_o A_io Q_jo``
  (windows x windows, smaller than the two (windows, out) factors whenever windows < out): windows
  weighted by ``w`` (summing to 1) score ``w^T P w``, and uniform weights give ``output_grad``.

``grad`` (``sum |mean_i g_i * dW|``: the absolute value of a mean does not split over windows),
``weight`` (data-free) and ``kl`` (measured on other windows) have no per-window terms.

**Artefact** (``WINDOWS_FILE``, beside ``sensitivity.json``): safetensors with ``hessian`` and
``fisher`` (layers, formats, windows) and ``outgrad`` (layers, formats, windows, windows), float64 in
the table's layer and format order (unquantized formats are 0), and the model, layers, formats and
calibration in the metadata, so :meth:`WindowCosts.check` can refuse the costs of another table.

**Memory.** Beside the model: every layer x quantized format's error ``dW``, decoded once (fp32, four
bytes per weight per format: decoding it again for every window made the pass ten times slower), and
per layer the (windows, out) fp32 vectors ``A`` and, per quantized format, ``Q``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers.pytorch_utils import Conv1D

from automp.errors import AutompError
from automp.formats import Format
from automp.io import artefact_path
from automp.model import LayerInfo, linear_weight
from automp.quantizers.qweight import QWeight, load_qweight
from automp.sensitivity.table import CalibInfo, SensitivityTable

WINDOWS_FILE = "sensitivity.windows.safetensors"
WINDOW_PROXIES = ("hessian", "fisher", "outgrad")  # the proxies with per-window terms
KINDS = ("hessian", "fisher", "outgrad")  # the tensors of the artefact


@dataclass
class WindowCosts:
    """Per layer x format x calibration window, the terms whose mean over windows is the table's proxy."""

    model: str
    layers: list[str]
    formats: list[str]
    calib: CalibInfo
    hessian: np.ndarray  # (layers, formats, windows) ||X_i dW^T||^2 / T
    fisher: np.ndarray  # (layers, formats, windows) 1/2 sum (g_i * dW)^2
    outgrad: np.ndarray  # (layers, formats, windows, windows) P_ij = 1/2 sum_o A_io Q_jo

    @property
    def windows(self) -> int:
        return self.hessian.shape[-1]

    def proxy_matrix(self, proxy: str, weights: np.ndarray | None = None) -> np.ndarray:
        """(layers, formats) ``proxy`` with the windows weighted by ``weights`` (windows,), which sum to 1;
        None weighs them equally, which reproduces the table's proxy."""
        if proxy not in WINDOW_PROXIES:
            raise AutompError(f"proxy {proxy!r} has no per-window terms: use one of {', '.join(WINDOW_PROXIES)}")
        w = np.full(self.windows, 1 / self.windows) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (self.windows,):
            raise AutompError(f"expected {self.windows} window weights, got shape {w.shape}")
        if proxy == "outgrad":
            return (self.outgrad @ w) @ w
        return getattr(self, proxy) @ w

    def check(self, table: SensitivityTable) -> None:
        """Refuse costs measured for another table (model, layers, formats or calibration)."""
        if (
            self.model != table.model
            or self.layers != [layer.name for layer in table.layers]
            or self.formats != table.formats
            or self.calib != table.calib
        ):
            raise AutompError(
                "the per-window costs were measured for another sensitivity table: "
                "profile again with --per-window to measure both together"
            )

    def save(self, path: Path) -> Path:
        """Write the artefact to ``path`` (a directory gets ``WINDOWS_FILE``) atomically."""
        path = artefact_path(path, WINDOWS_FILE)
        meta = {"model": self.model, "layers": self.layers, "formats": self.formats, "calib": self.calib.model_dump()}
        tensors = {kind: np.ascontiguousarray(getattr(self, kind), dtype=np.float64) for kind in KINDS}
        tmp = path.with_name(f".{path.name}.tmp")
        save_numpy(tensors, tmp, metadata={"automp": json.dumps(meta)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> WindowCosts:
        """Read the artefact from ``path`` (the file, or the directory holding ``WINDOWS_FILE``)."""
        path = artefact_path(path, WINDOWS_FILE)
        try:
            with safe_open(path, framework="np") as f:
                meta = json.loads(f.metadata()["automp"])
                tensors = {kind: f.get_tensor(kind) for kind in KINDS}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise AutompError(
                f"could not read per-window costs {path}: {err} (write them with `automp profile --per-window`)"
            ) from err
        calib = CalibInfo.model_validate(meta.pop("calib"))
        return cls(**meta, calib=calib, **tensors)


# ---- the pass -----------------------------------------------------------------------------------


def measure_windows(
    model: nn.Module,
    layers: list[LayerInfo],
    formats: list[Format],
    calib: torch.Tensor,
    codes: dict[str, dict[str, QWeight]],
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """The artefact's tensors (``KINDS``): one forward + backward per window of ``calib`` (n, seqlen).

    ``codes``: layer -> quantized format name -> the GPTQ result the table was measured with. Each
    inventory layer must run once per forward pass (as every decoder layer does).
    """
    device = next(model.parameters()).device
    modules = [model.get_submodule(layer.name) for layer in layers]
    weights = [module.weight for module in modules]
    quantized = [j for j, fmt in enumerate(formats) if fmt.quantized]
    n, loss_tokens = len(calib), calib.shape[1] - 1
    shape = (len(layers), len(formats), n)
    hessian = torch.zeros(shape, dtype=torch.float64, device=device)
    fisher = torch.zeros(shape, dtype=torch.float64, device=device)
    out_fisher = [torch.zeros(n, layer.out_features, device=device) for layer in layers]  # A: (windows, out)
    rows = [torch.zeros(len(formats), n, layer.out_features, device=device) for layer in layers]  # Q per format
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    errors = [  # dW per layer x quantized format, decoded once: (formats, out, in) fp32
        torch.stack([
            codes[layer.name][formats[j].name].dequantize().to(device).float() - linear_weight(module).detach().float()
            for j in quantized
        ]) if quantized else None
        for layer, module in zip(layers, modules, strict=True)
    ]  # fmt: skip

    def capture(index: int):
        def hook(_module, args, output):
            inputs[index], outputs[index] = args[0].detach(), output

        return hook

    hooks = [module.register_forward_hook(capture(k)) for k, module in enumerate(modules)]
    flags = {param: param.requires_grad for param in model.parameters()}
    for param in model.parameters():  # gradients for the layer weights (and the graph through them) only
        param.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    try:
        for i, window in enumerate(tqdm(calib, desc="profile per-window", disable=not progress, leave=False)):
            ids = window.unsqueeze(0).to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
                targets = [outputs[k] for k in range(len(layers))] + weights
                grads = torch.autograd.grad(loss, targets, allow_unused=True)
            for k, layer in enumerate(layers):
                dy, dw = grads[k], grads[len(layers) + k]
                x = inputs[k].reshape(-1, layer.in_features).float()  # (T, in)
                if dy is not None:
                    out_fisher[k][i] = loss_tokens * dy.reshape(-1, layer.out_features).double().pow(2).sum(0)
                if errors[k] is None:
                    continue
                g = torch.zeros_like(errors[k][0]) if dw is None else _out_in(modules[k], dw.float())  # dL_i/dW
                row = (x @ errors[k].transpose(1, 2)).double().pow(2).sum(1) / len(x)  # (formats, out)
                rows[k][quantized, i] = row.to(rows[k].dtype)  # sum_t (x_t . dW_o)^2 / T
                hessian[k, quantized, i] = row.sum(1)
                fisher[k, quantized, i] = 0.5 * (g * errors[k]).double().pow(2).sum((1, 2))
            inputs.clear()
            outputs.clear()
    finally:
        for hook in hooks:
            hook.remove()
        for param, flag in flags.items():
            param.requires_grad_(flag)
    # P_ij = 1/2 sum_o A_io Q_jo, per layer x format: (formats, windows, windows)
    pairs = [0.5 * torch.einsum("io,fjo->fij", a.double(), q.double()) for a, q in zip(out_fisher, rows, strict=True)]
    return {
        "hessian": hessian.cpu().numpy(),
        "fisher": fisher.cpu().numpy(),
        "outgrad": torch.stack(pairs).cpu().numpy(),
    }


def _out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (out, in), like ``linear_weight`` (GPT-2's Conv1D stores (in, out))."""
    return tensor.T if isinstance(module, Conv1D) else tensor


# ---- the codes the pass holds dW with (resumable, one file per layer) ---------------------------


def save_codes(path: Path, codes: dict[str, QWeight]) -> None:
    """Write one layer's quantized weights (format name -> QuantizedWeight or GGUFWeight), packed, atomically."""
    tensors, shapes = {}, {}
    for name, qweight in codes.items():
        tensors.update({f"{name}:{key}": t.cpu().contiguous() for key, t in qweight.state_dict().items()})
        shapes[name] = list(qweight.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={"shapes": json.dumps(shapes)})
    os.replace(tmp, path)


def load_codes(path: Path, device: torch.device | str = "cpu") -> dict[str, QWeight]:
    """One layer's quantized weights as :func:`save_codes` wrote them, unpacked on ``device``."""
    with safe_open(path, framework="pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    tensors = load_file(path)
    codes = {}
    for name, shape in shapes.items():
        parts = {key.split(":", 1)[1]: t for key, t in tensors.items() if key.split(":", 1)[0] == name}
        codes[name] = load_qweight(name, tuple(shape), parts).to(device)
    return codes
