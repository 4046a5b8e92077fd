"""The sensitivity table: per layer, input-activation and weight statistics; per layer x format,
exact stored bits and several predictions of the damage that format does.

It is the one artefact between measurement (``automp profile``) and search (``automp search``):
solvers read nothing else, so one measurement serves any number of budgets and solvers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from automp.errors import AutompError
from automp.formats import get_format
from automp.io import artefact_path, read_json_artefact

TABLE_FILE = "sensitivity.json"

# Proxy name -> FormatCost field. Each predicts the loss increase from quantizing one layer alone.
PROXIES = {
    "weight": "weight_mse",  # mean squared weight error, times the weight count
    "hessian": "output_err",  # GPTQ objective tr(dW H dW^T) on calibration inputs
    "grad": "grad_first_order",  # sum |dL/dW * dW|
    "fisher": "fisher",  # 1/2 sum F * dW^2 with the diagonal empirical Fisher F
    "outgrad": "output_grad",  # 1/2 sum (dL/dY)^2 (dY)^2, ModelOpt AutoQuantize's score, in loss units
    "kl": "kl",  # measured KL(full || only this layer quantized); optional
}


class LayerStats(BaseModel):
    name: str
    block: int
    role: str
    out_features: int
    in_features: int
    # statistics of the layer's input activations on the calibration data
    act_absmean: float
    act_std: float
    act_max: float
    act_kurtosis: float
    # statistics of the full-precision weight
    weight_absmean: float
    weight_std: float
    weight_max: float
    weight_kurtosis: float

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


class FormatCost(BaseModel):
    bits: int  # exact stored bits of this layer in this format
    weight_mse: float
    output_err: float
    grad_first_order: float
    fisher: float
    output_grad: float | None = None  # None in tables profiled before this proxy existed
    kl: float | None = None


class CalibInfo(BaseModel):
    spec: str
    nsamples: int
    seqlen: int
    seed: int


class SensitivityTable(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    formats: list[str]
    layers: list[LayerStats]
    costs: dict[str, dict[str, FormatCost]]  # layer name -> format name -> cost
    fused: list[list[str]]  # layer groups serving engines fuse (q/k/v, gate/up)
    calib: CalibInfo
    dense_bytes: int  # bytes of everything that is not an allocated layer (embeddings, norms, ...), 16-bit

    def bits_matrix(self) -> np.ndarray:
        """(layers, formats) exact stored bits."""
        return np.array([[self.costs[lay.name][f].bits for f in self.formats] for lay in self.layers], dtype=np.int64)

    def proxy_matrix(self, proxy: str) -> np.ndarray:
        """(layers, formats) predicted loss increase under ``proxy``; unquantized formats cost 0."""
        if proxy not in PROXIES:
            raise AutompError(f"unknown proxy {proxy!r}: use one of {', '.join(PROXIES)}")
        field = PROXIES[proxy]
        values = [[getattr(self.costs[lay.name][f], field) for f in self.formats] for lay in self.layers]
        if any(v is None for row in values for v in row):
            raise AutompError(f"proxy {proxy!r} was not measured: rerun `automp profile` with it enabled")
        return np.array(values, dtype=np.float64)

    def weight_count(self) -> int:
        return sum(layer.numel for layer in self.layers)

    def without(self, names: set[str]) -> SensitivityTable:
        """The table with layers ``names`` left out of the allocation: kept 16-bit, their bytes fixed cost."""
        dropped = [layer for layer in self.layers if layer.name in names]
        return self.model_copy(
            update={
                "layers": [layer for layer in self.layers if layer.name not in names],
                "costs": {name: cost for name, cost in self.costs.items() if name not in names},
                "fused": [group for group in self.fused if not set(group) & names],
                "dense_bytes": self.dense_bytes + sum(2 * layer.numel for layer in dropped),
            }
        )

    def format_index(self, name: str) -> int:
        key = get_format(name).name
        if key not in self.formats:
            raise AutompError(f"format {name} was not profiled (profiled: {', '.join(self.formats)})")
        return self.formats.index(key)

    def save(self, out_dir: Path) -> Path:
        path = Path(out_dir) / TABLE_FILE
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> SensitivityTable:
        return read_json_artefact(cls, artefact_path(path, TABLE_FILE), "sensitivity table")
