"""Low-rank error correction of a quantized layer: ``W ≈ Q + B A`` with ``B`` (out x r), ``A`` (r x in).

With the quantization error ``E = W - Q`` and the layer's input second moment ``H = X^T X / n`` (the
matrix GPTQ accumulates), the correction minimises the layer-output error

    tr((E - B A) H (E - B A)^T) = || (E - B A) S ||_F^2   for any S with H = S S^T.

Three estimators (``fit_correction(..., method=)``):

* ``svd``: truncated SVD of ``E`` itself (ZeroQuant-V2's LoRC). Data-free: it is optimal only when
  ``H`` is a multiple of the identity.
* ``diag``: truncated SVD of ``E diag(s)`` with ``s_j = sqrt(H_jj)``, the RMS of input ``j``
  (L2QER, QERA-approx), then ``A = A' diag(1/s)``. Exact when the inputs are uncorrelated.
* ``exact`` (EoRA, QERA-exact): with ``H = U Λ U^T`` and ``S = U Λ^½``, the truncated SVD
  ``E S ≈ U_r Σ_r V_r^T`` is the best rank-r approximation of ``E S`` (Eckart-Young), and
  ``B = U_r Σ_r^½``, ``A = Σ_r^½ V_r^T S^+`` map it back. Directions of ``H`` with (numerically) zero
  eigenvalue carry no input, so ``S^+`` gives them no weight; that is the guard against dead inputs
  and a rank-deficient ``H`` from few samples.

The factors are split ``Σ^½`` / ``Σ^½`` so both stay in fp16's range, and are rounded to fp16 (what is
stored) before anything uses them. This file is the math; ``qweight.CorrectedWeight`` stores the result
beside the quantized weight, and the quantizers build it for ``+rN`` formats. It sits with the
quantizers, not in a later stage, because the sensitivity profile measures corrected formats too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from automp.errors import AutompError

METHODS = ("exact", "diag", "svd")
EIG_CUTOFF = 1e-10  # eigenvalues of H below this fraction of the largest count as zero (no input there)


@dataclass
class LowRankCorrection:
    A: torch.Tensor  # (r, in) fp16
    B: torch.Tensor  # (out, r) fp16

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """``B A`` in float32: what the correction adds to the dequantized weight."""
        return self.B.float() @ self.A.float()


def fit_correction(
    weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor | None, rank: int, method: str = "exact"
) -> LowRankCorrection:
    """The rank-``rank`` correction of ``quantized`` towards ``weight`` (both (out, in)) under ``method``.

    ``hessian`` (in, in) is needed by ``exact`` and ``diag``; ``svd`` ignores it."""
    if method not in METHODS:
        raise AutompError(f"unknown correction method {method!r}: use one of {', '.join(METHODS)}")
    if method != "svd" and hessian is None:
        raise AutompError(f"the {method!r} correction needs the layer's input statistics; use 'svd' without data")
    out_features, in_features = weight.shape
    if not 0 < rank <= min(out_features, in_features):
        raise AutompError(f"correction rank {rank} must be between 1 and {min(out_features, in_features)}")
    E = (weight.double() - quantized.double()).cpu()  # (out, in)
    if method == "svd":
        S, S_pinv = None, None
    elif method == "diag":
        s = hessian.double().cpu().diagonal().clamp(min=0).sqrt()  # (in,)
        S, S_pinv = torch.diag(s), torch.diag(torch.where(s > 0, 1 / s, torch.zeros_like(s)))
    else:
        S, S_pinv = _sqrt_and_pinv(hessian.double().cpu())
    U, sigma, Vh = torch.linalg.svd(E if S is None else E @ S, full_matrices=False)
    root = sigma[:rank].sqrt()
    B = U[:, :rank] * root  # (out, r)
    A = root[:, None] * Vh[:rank]  # (r, in), in the S-transformed input space
    if S_pinv is not None:
        A = A @ S_pinv
    device = weight.device
    return LowRankCorrection(A=A.to(device, torch.float16), B=B.to(device, torch.float16))


def _sqrt_and_pinv(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S = U Λ^½`` and its pseudo-inverse ``Λ^+½ U^T`` for a symmetric PSD ``H = U Λ U^T``."""
    eigenvalues, U = torch.linalg.eigh((H + H.T) / 2)
    live = eigenvalues > EIG_CUTOFF * eigenvalues.max().clamp(min=torch.finfo(H.dtype).tiny)
    root = torch.where(live, eigenvalues.clamp(min=0).sqrt(), torch.zeros_like(eigenvalues))
    inverse_root = torch.where(live, 1 / root.clamp(min=torch.finfo(H.dtype).tiny), torch.zeros_like(root))
    return U * root, (U * inverse_root).T


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)``: the layer-output error every estimator is judged by."""
    E = weight.double() - approx.double()
    return float(((E @ hessian.double()) * E).sum())
