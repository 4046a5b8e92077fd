"""The measurement pass behind ``automp profile``: one pass over calibration data, then every layer x
format measured, saved as a :class:`SensitivityTable`.

**Pre-pass** (once per model; ``sensitivity/prepass.py``, block by block for a streamed model). Every
calibration window gets its own forward and backward pass through the full-precision model. Forward
hooks on each inventory layer accumulate

* the moments of the layer's *input* (abs-mean, std, max |x|, kurtosis), and
* its input Hessian ``H = X^T X / n`` (``HessianAccumulator``, as GPTQ uses it).

The backward pass gives ``g_i = dL_i/dW``, where ``L_i`` is window ``i``'s mean next-token NLL. The
pass keeps ``grad = mean_i g_i`` (the gradient of the calibration loss) and the diagonal empirical
Fisher ``F = mean_i g_i**2`` (one "batch" is one window).

**Per layer x format**, with ``dW = GPTQ(W; H, format) - W`` (the final quantizer is GPTQ, so
errors are GPTQ's, applied to this layer alone on its full-precision inputs):

* ``bits``: exact stored bits (``Format.storage_bits``),
* ``weight_mse``: the *sum* of squared weight errors ``sum dW**2`` (the mean times the weight count),
* ``output_err``: GPTQ's objective ``tr(dW H dW^T)``,
* ``grad_first_order``: ``sum |grad * dW|``,
* ``fisher``: ``1/2 sum F * dW**2``. Because F comes from whole-window gradients, its scale is about
  1/seqlen of a per-token Fisher; it ranks layers and formats, but it is not in loss units,
* ``output_grad`` (NVIDIA ModelOpt AutoQuantize's score, in loss units): ``1/2 sum (dL/dY)^2 (Y - Y_q)^2``
  over the layer's outputs on calibration tokens, the diagonal-Fisher estimate of the loss increase.
  The pre-pass keeps, per output channel ``o``, ``G_o = T * mean_i sum_t (dL_i/dy_to)^2`` (``T`` loss
  tokens per window turns the window-mean loss's gradients into a per-token Fisher). With
  ``Y - Y_q = X dW^T`` and the output gradient taken independent of the input (the Kronecker-factored
  approximation that keeps memory at one vector per layer), the score is
  ``1/2 sum_o G_o * (dW H dW^T)_oo``. It is exact when ``(dL/dy_o)^2`` is the same at every token.
* ``kl`` (optional): the mean per-token ``KL(full || quantized)`` on separate windows, with only
  this layer quantized.

A ``+rN`` format's ``dW`` is what is left after its low-rank correction (``quantizers/lowrank.py``,
fitted with the same ``H``), so every proxy prices bits and rank in the same units; its ``bits``
include the correction's ``A`` and ``B``. GPTQ runs once per base format and layer.

**Per window** (``per_window=True``, optional): the hessian, fisher and outgrad costs split into one
term per calibration window (``automp.sensitivity.windows``), for ``--bootstrap``. It keeps the GPTQ
codes of every layer x format (``codes/<name>.safetensors``; measured again from the pre-pass Hessian
for layers profiled without it), then makes one forward + backward pass per window and writes
``WINDOWS_FILE`` into the work directory. Neither is in the manifest: a profile with or without it
reuses the other's measurements.

**Token embedding** (``embeddings=True``; role ``embed``). Its weight ``W`` (vocab, hidden) is a linear map
of one-hot inputs: row ``v`` is what token ``v`` looks up. Its ``dW`` is RTN's (llama.cpp quantizes
``token_embd`` without an importance matrix, and ``quantize_`` uses RTN for it whatever the method). With
``X`` one-hot, ``H = X^T X / n`` is diagonal: ``d_v = c_v / n``, the share of calibration tokens that are
``v``. So ``output_err = sum_v d_v ||dW_v||^2`` (the mean squared error of the looked-up vectors).
``weight_mse``, ``grad_first_order``, ``fisher`` and ``kl`` are as for a linear (gradients w.r.t. ``W``).
``output_grad`` needs no independence assumption here: token ``t``'s output error is exactly ``dW[v_t]``,
so the pre-pass keeps the (vocab, hidden) matrix ``G_vh = T * mean_i sum_{t: v_t = v} (dL_i/dy_th)^2`` and
the score is ``1/2 sum G * dW^2``, ModelOpt's per-token sum exactly. Its "activation" statistics are those
of its output (the looked-up rows). Per-window terms are not kept for it (``per_window`` refuses it).
The output head (``lm_head=True``) is profiled as any linear layer.

Unquantized formats (fp16/bf16) cost 0 under every proxy: their rounding error is ignored.

**Memory.** The model, plus during the pre-pass, for every inventory layer, two fp32 weight-sized
accumulators (mean gradient, Fisher), one fp32 ``in x in`` Hessian and one ``out`` vector (``G``), all on
the layer's device (the token embedding: a third weight-sized ``G`` and a vocab vector instead; a streamed
pre-pass holds one block's). Activation moments are scalars. The layers are then measured one at a time,
each reading its part of the saved pre-pass. With KL, the reference log-probabilities of the KL windows are
held too (windows x seqlen x vocab fp32).

**Resuming.** With ``work_dir``, the pre-pass is saved to ``prepass/`` (``sensitivity/prepass.py``)
and each finished layer to ``layers/<name>.json``. Every write is atomic (temporary file, then
``os.replace``). A restarted run with the same settings skips whatever is already there. The final
table is always assembled from the per-layer JSON files, so a resumed run writes the same bytes as an
uninterrupted one. ``manifest.json`` records the settings. If a run finds a work directory written
under other settings, it starts that directory afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from automp.checkpoint import _dense_tensors
from automp.errors import AutompError
from automp.execution.blocks import model_device
from automp.execution.executor import Executor, SerialExecutor
from automp.execution.offload import is_streamed
from automp.formats import Format
from automp.model import EMBED_ROLE, Inventory, LayerInfo, inventory, linear_weight, set_linear_weight
from automp.quantize import GPTQConfig
from automp.quantizers.gptq import gptq_quantize
from automp.quantizers.qweight import CorrectedWeight, QWeight
from automp.quantizers.rtn import rtn_quantize
from automp.sensitivity.prepass import Moments, Prepass, collect_prepass
from automp.sensitivity.table import CalibInfo, FormatCost, LayerStats, SensitivityTable
from automp.sensitivity.windows import WINDOWS_FILE, WindowCosts, load_codes, measure_windows, save_codes

if TYPE_CHECKING:
    from automp.timing import Stopwatch

MANIFEST = "manifest.json"
PREPASS_DIR = "prepass"
PREPASS_VERSION = 3  # 2: output_fisher added; 3: a file per block. A work directory of another version starts afresh
LAYERS_DIR = "layers"
CODES_DIR = "codes"  # per layer, the GPTQ codes of every quantized format (only with per_window)


def profile_model(
    model: nn.Module,
    formats: list[Format],
    calib: torch.Tensor,
    *,
    model_name: str,
    calib_info: CalibInfo,
    kl_windows: torch.Tensor | None = None,
    work_dir: Path | None = None,
    gptq: GPTQConfig | None = None,
    batch_size: int = 8,
    progress: bool = True,
    clock: Stopwatch | None = None,
    per_window: bool = False,
    lm_head: bool = False,
    embeddings: bool = False,
    executor: Executor | None = None,
) -> SensitivityTable:
    """Measure every inventory layer of ``model`` in every format; see the module docstring.

    ``calib``: (n, seqlen) calibration token windows; ``kl_windows``: (k, seqlen) windows for the
    optional KL measurement (a forward pass per layer x quantized format). ``batch_size`` is the
    number of windows per forward pass for KL (the pre-pass goes one window at a time). Without
    ``work_dir`` a temporary one is used and removed. ``per_window`` also writes the per-window costs
    to ``work_dir / WINDOWS_FILE`` (read them with ``WindowCosts.load``); it needs a ``work_dir``.
    ``lm_head`` / ``embeddings`` add the output head / the token embedding as layers. ``executor``
    (default: serial) measures the layers; a remote one copies the model and the pre-pass to each of
    its workers and gives the same table.
    """
    inv = inventory(model, include_lm_head=lm_head, include_embeddings=embeddings)
    _check_inputs(inv, formats, calib)
    if per_window and work_dir is None:
        raise AutompError("per-window costs are written to the work directory: give profile_model a work_dir")
    if per_window and embeddings:
        raise AutompError(
            "per-window costs (--per-window, --bootstrap) are not measured for the token embedding: "
            "leave out --embeddings, or the per-window terms"
        )
    if is_streamed(model) and (embeddings or per_window):
        raise AutompError(
            "a streamed profile (--offload cpu/disk) measures the decoder's linears and the lm_head: leave out "
            "--embeddings and the per-window terms (--per-window, --bootstrap), or use --offload none"
        )
    gptq = gptq or GPTQConfig()
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="automp-profile-") as tmp:
            return profile_model(
                model, formats, calib, model_name=model_name, calib_info=calib_info, kl_windows=kl_windows,
                work_dir=Path(tmp), gptq=gptq, batch_size=batch_size, progress=progress, clock=clock,
                lm_head=lm_head, embeddings=embeddings, executor=executor,
            )  # fmt: skip

    stage = clock.stage if clock is not None else _no_stage
    work = Path(work_dir)
    _open_work_dir(work, _manifest(model_name, inv, formats, calib, calib_info, kl_windows, gptq))
    with stage("prepass"):  # read from disk either way: a resumed run sees the same values
        directory = work / PREPASS_DIR
        complete = Prepass.complete(directory)
        prepass = Prepass(directory) if complete else collect_prepass(model, inv, calib, directory, progress)

    todo = [layer for layer in inv.layers if not _layer_path(work, layer.name).is_file()]
    if todo:
        executor = executor or SerialExecutor()
        if executor.remote and is_streamed(model):
            raise AutompError("--executor ray copies the model to every worker: profile it with --offload none")
        # a remote worker's stages are not this process's wall time: the whole loop is timed as "layers"
        worker = partial(
            _LayerWorker, model, formats, prepass.held() if executor.remote else prepass, gptq, kl_windows,
            batch_size, per_window, _no_stage if executor.remote else stage,
        )  # fmt: skip
        with stage("layers") if executor.remote else contextlib.nullcontext(), executor.pool(worker) as pool:
            measured = pool.imap(_LayerWorker.measure, todo)
            bar = tqdm(measured, total=len(todo), desc="profile layers", disable=not progress, leave=False)
            for layer, (record, codes) in zip(todo, bar, strict=True):
                if codes is not None:  # before the layer's JSON: a finished layer always has its codes
                    save_codes(_codes_path(work, layer.name), codes)
                _write_atomic(_layer_path(work, layer.name), json.dumps(record, indent=1))
    if per_window and not (work / WINDOWS_FILE).is_file():
        with stage("per_window"):
            _profile_windows(model, inv, formats, calib, work, prepass, gptq, progress, model_name, calib_info)
    return _assemble(work, model, inv, formats, model_name, calib_info)


# ---- inputs and the work directory -------------------------------------------------------------


def _check_inputs(inv: Inventory, formats: list[Format], calib: torch.Tensor) -> None:
    if not formats:
        raise AutompError("no formats given to profile")
    names = [fmt.name for fmt in formats]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise AutompError(f"format {repeated[0]} is listed more than once")
    for fmt in formats:  # fail before an hour of measurement, not after
        for layer in inv.layers:
            fmt.check_shape(layer.out_features, layer.in_features)
    if calib.ndim != 2 or len(calib) == 0 or calib.shape[1] < 2:
        raise AutompError("profiling needs calibration windows of at least 2 tokens (--calib)")


def _manifest(model_name, inv, formats, calib, calib_info, kl_windows, gptq) -> dict:
    """Everything the work directory's contents depend on."""
    return {
        "model": model_name,
        "layers": [[layer.name, layer.out_features, layer.in_features] for layer in inv.layers],
        "formats": [fmt.name for fmt in formats],
        "calib": calib_info.model_dump(),
        "calib_sha256": _tokens_digest(calib),
        "kl_sha256": None if kl_windows is None else _tokens_digest(kl_windows),
        "gptq": asdict(gptq),
        "prepass_version": PREPASS_VERSION,
    }


def _tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _open_work_dir(work: Path, manifest: dict) -> None:
    """Reuse ``work`` if it was written under the same manifest; otherwise start it afresh."""
    text = json.dumps(manifest, indent=1, sort_keys=True)
    path = work / MANIFEST
    if path.is_file() and path.read_text() == text:
        return
    shutil.rmtree(work, ignore_errors=True)
    (work / LAYERS_DIR).mkdir(parents=True)
    _write_atomic(path, text)


def _layer_path(work: Path, name: str) -> Path:
    return work / LAYERS_DIR / f"{name}.json"


def _codes_path(work: Path, name: str) -> Path:
    return work / CODES_DIR / f"{name}.safetensors"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _no_stage(_name: str):
    yield


# ---- per layer ----------------------------------------------------------------------------------


class _KLProbe:
    """Mean per-token KL(full || model) on fixed windows; the full model's log-probs are kept."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int):
        self.model = model
        self.batches = [batch.to(model_device(model)) for batch in windows.split(batch_size)]
        self.reference = [self._log_probs(batch) for batch in self.batches]

    @torch.no_grad()
    def _log_probs(self, batch: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.model(input_ids=batch, use_cache=False).logits.float(), dim=-1)

    def with_weight(self, module: nn.Module, weight: torch.Tensor) -> float:
        """The KL with ``module``'s weight replaced by ``weight`` (restored exactly afterwards)."""
        original = linear_weight(module).detach().clone()
        set_linear_weight(module, weight)
        try:
            total, tokens = 0.0, 0
            for batch, reference in zip(self.batches, self.reference, strict=True):
                per_token = F.kl_div(self._log_probs(batch), reference, log_target=True, reduction="none").sum(-1)
                total += float(per_token.double().sum())
                tokens += per_token.numel()
        finally:
            set_linear_weight(module, original)
        # KL >= 0; a nearly lossless layer can read a hair below zero from float32 rounding noise
        return max(total / tokens, 0.0)


class _LayerWorker:
    """What measures layers, in this process or on a remote worker: the model, the pre-pass and the KL
    probe (its reference log-probabilities computed where the worker runs)."""

    def __init__(
        self,
        model: nn.Module,
        formats: list[Format],
        prepass: Prepass,
        gptq: GPTQConfig,
        kl_windows: torch.Tensor | None,
        batch_size: int,
        per_window: bool,
        stage,
    ) -> None:
        self.model, self.formats, self.prepass, self.gptq = model, formats, prepass, gptq
        self.per_window, self.stage = per_window, stage
        self.probe = None
        if kl_windows is not None:
            with stage("kl"):
                self.probe = _KLProbe(model, kl_windows, batch_size)

    def measure(self, layer: LayerInfo) -> tuple[dict, dict[str, QWeight] | None]:
        """``_measure_layer``'s record of ``layer``, and its GPTQ codes when ``per_window`` keeps them."""
        codes = {} if self.per_window else None
        record = _measure_layer(self.model, layer, self.formats, self.prepass, self.gptq, self.probe, self.stage, codes)
        return record, codes


def _measure_layer(
    model: nn.Module,
    layer: LayerInfo,
    formats: list[Format],
    prepass: Prepass,
    gptq: GPTQConfig,
    probe: _KLProbe | None,
    stage,
    codes: dict[str, QWeight] | None = None,
) -> dict:
    """Statistics of one layer and its cost in every format, as JSON-ready dicts. ``codes``, when
    given, receives the GPTQ result of every quantized format."""
    module = model.get_submodule(layer.name)
    weight = linear_weight(module).detach().float().clone()  # the KL probe swaps the live weight
    gathered = prepass.layer(layer.name, weight.device)
    hessian = gathered.hessian
    grad, fisher, output_fisher = gathered.grad.double(), gathered.fisher.double(), gathered.output_fisher.double()
    embedding = layer.role == EMBED_ROLE
    costs, plain = {}, {}

    def quantize(fmt: Format) -> QWeight:
        """GPTQ in ``fmt``; a +rN format corrects its base format's result (GPTQ once per base). The
        embedding gets RTN (its +rN the data-free svd correction), as ``quantize_`` quantizes it."""
        if embedding:
            return rtn_quantize(weight, fmt)
        if fmt.rank:
            return CorrectedWeight.fit(weight, quantize(fmt.base), hessian, fmt, gptq.correction)
        if fmt.name not in plain:
            plain[fmt.name] = gptq_quantize(weight, hessian, fmt, **asdict(gptq))
        return plain[fmt.name]

    for fmt in formats:
        bits = fmt.storage_bits(layer.out_features, layer.in_features)
        if not fmt.quantized:
            kl = 0.0 if probe is not None else None
            zero = FormatCost(
                bits=bits, weight_mse=0.0, output_err=0.0, grad_first_order=0.0, fisher=0.0, output_grad=0.0, kl=kl
            )
            costs[fmt.name] = zero.model_dump()
            continue
        with stage("gptq"):
            qweight = quantize(fmt)
            quantized = qweight.dequantize()
        if codes is not None:
            codes[fmt.name] = qweight
        error = (quantized - weight).double()
        squared = error * error
        kl = None
        if probe is not None:
            with stage("kl"):
                kl = probe.with_weight(module, quantized)
        if embedding:  # H = diag(d): each row's error weighted by its share of tokens; G per row and column
            row_err = squared.sum(dim=1) * hessian.double()
            output_grad = 0.5 * float((output_fisher * squared).sum())
        else:
            row_err = ((error @ hessian.double()) * error).sum(dim=1)  # (out,): each output's tr term
            output_grad = 0.5 * float((output_fisher * row_err).sum())
        cost = FormatCost(
            bits=bits,
            weight_mse=float(squared.sum()),
            output_err=float(row_err.sum()),
            grad_first_order=float((grad * error).abs().sum()),
            fisher=0.5 * float((fisher * squared).sum()),
            output_grad=output_grad,
            kl=kl,
        )
        costs[fmt.name] = cost.model_dump()
    moments = Moments()
    moments.add(weight)
    act, wts = gathered.activations, moments.summary()
    stats = LayerStats(
        name=layer.name, block=layer.block, role=layer.role,
        out_features=layer.out_features, in_features=layer.in_features,
        act_absmean=act["absmean"], act_std=act["std"], act_max=act["max"], act_kurtosis=act["kurtosis"],
        weight_absmean=wts["absmean"], weight_std=wts["std"], weight_max=wts["max"], weight_kurtosis=wts["kurtosis"],
    )  # fmt: skip
    return {"stats": stats.model_dump(), "costs": costs}


# ---- per window ---------------------------------------------------------------------------------


def _profile_windows(
    model: nn.Module,
    inv: Inventory,
    formats: list[Format],
    calib: torch.Tensor,
    work: Path,
    prepass: Prepass,
    gptq: GPTQConfig,
    progress: bool,
    model_name: str,
    calib_info: CalibInfo,
) -> None:
    """Write ``work / WINDOWS_FILE`` from the codes the table was measured with (GPTQ again where missing)."""
    device = model_device(model)
    codes = {}
    for layer in inv.layers:
        path = _codes_path(work, layer.name)
        if not path.is_file():  # profiled without per_window: GPTQ is deterministic given the same Hessian
            hessian = prepass.layer(layer.name, device).hessian
            weight = linear_weight(model.get_submodule(layer.name)).detach().float().clone()
            quantized = [fmt for fmt in formats if fmt.quantized]
            save_codes(path, {fmt.name: gptq_quantize(weight, hessian, fmt, **asdict(gptq)) for fmt in quantized})
        codes[layer.name] = load_codes(path, device)
    tensors = measure_windows(model, inv.layers, formats, calib, codes, progress)
    names, format_names = [layer.name for layer in inv.layers], [fmt.name for fmt in formats]
    costs = WindowCosts(model=model_name, layers=names, formats=format_names, calib=calib_info, **tensors)
    costs.save(work / WINDOWS_FILE)


# ---- the table ----------------------------------------------------------------------------------


def dense_bytes(model: nn.Module, layer_names: set[str]) -> int:
    """Bytes of every tensor except the given layers' weights, in 16-bit with tied tensors once (as
    ``checkpoint.model_bytes`` counts them)."""
    return sum(t.numel() * t.element_size() for t in _dense_tensors(model, layer_names).values())


def _assemble(
    work: Path, model: nn.Module, inv: Inventory, formats: list[Format], model_name: str, calib_info: CalibInfo
) -> SensitivityTable:
    """The table from the per-layer JSON files, in inventory order."""
    layers, costs = [], {}
    for layer in inv.layers:
        record = json.loads(_layer_path(work, layer.name).read_text())
        layers.append(LayerStats.model_validate(record["stats"]))
        costs[layer.name] = {fmt.name: FormatCost.model_validate(record["costs"][fmt.name]) for fmt in formats}
    return SensitivityTable(
        model=model_name,
        formats=[fmt.name for fmt in formats],
        layers=layers,
        costs=costs,
        fused=inv.fused,
        calib=calib_info,
        dense_bytes=dense_bytes(model, {layer.name for layer in inv.layers}),
    )
