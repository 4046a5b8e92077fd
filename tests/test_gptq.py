"""GPTQ against independent references: brute force on a tiny layer, exact special cases, RTN."""

import itertools

import pytest
import torch

from automp.formats import GroupParams, fit_params, get_format
from automp.quantizers.gptq import HessianAccumulator, gptq_quantize
from automp.quantizers.rtn import rtn_quantize


def _objective(weight, quantized, hessian):
    delta = quantized - weight
    return torch.einsum("ri,ij,rj->", delta, hessian, delta).item()


def _correlated_inputs(n, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) / dim**0.5 + torch.eye(dim)
    return torch.randn(n, dim, generator=gen) @ mix + 0.3 * torch.randn(dim, generator=gen)


def test_hessian_accumulator_is_the_input_second_moment():
    x = _correlated_inputs(300, 16)
    acc = HessianAccumulator(16)
    for chunk in x.split(70):
        acc.add(chunk.view(-1, 5, 16) if len(chunk) % 5 == 0 else chunk)
    assert torch.allclose(acc.hessian, x.T @ x / 300, atol=1e-5)
    assert acc.count == 300


def test_diagonal_hessian_reduces_to_rtn():
    # with uncorrelated inputs there is nothing to propagate: GPTQ must equal round-to-nearest
    weight = torch.randn(16, 64)
    hessian = torch.diag(torch.rand(64) + 0.5)
    for name in ["w4", "w3g32", "w4g32a", "nf4g32"]:
        gptq = gptq_quantize(weight, hessian, get_format(name), damp=0.0, act_order=False)
        assert torch.equal(gptq.dequantize(), rtn_quantize(weight, get_format(name)).dequantize())


def test_matches_brute_force_optimum_on_a_tiny_layer():
    # one row, six inputs, 3-bit per-channel: all 8^6 code vectors under the row's scale are enumerated
    fmt = get_format("w3")
    codes = torch.tensor(list(itertools.product(range(8), repeat=6)), dtype=torch.float32)
    gptq_gap = rtn_gap = 0.0
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(1, 6, generator=gen)
        x = _correlated_inputs(200, 6, seed)
        hessian = x.T @ x / 200
        delta = (codes - 4) * fit_params(fmt, weight).scale - weight
        best = torch.einsum("ni,ij,nj->n", delta, hessian, delta).min().item()
        gptq = _objective(weight, gptq_quantize(weight, hessian, fmt, damp=0.0).dequantize(), hessian)
        rtn = _objective(weight, rtn_quantize(weight, fmt).dequantize(), hessian)
        assert best <= gptq + 1e-5 and best <= rtn + 1e-5
        gptq_gap += gptq - best
        rtn_gap += rtn - best
    assert gptq_gap < 0.3 * rtn_gap  # GPTQ closes most of RTN's distance to the optimum


@pytest.mark.parametrize("name", ["w8", "w4g32", "w4g32a", "w3g64", "w2g32", "nf4g32", "fp4g32"])
@pytest.mark.parametrize("act_order", [True, False])
def test_layer_output_error_below_rtn(name, act_order):
    fmt = get_format(name)
    torch.manual_seed(1)
    weight = torch.randn(64, 128)
    x = _correlated_inputs(2048, 128, seed=3)
    hessian = x.T @ x / len(x)
    gptq = gptq_quantize(weight, hessian, fmt, act_order=act_order)
    rtn = rtn_quantize(weight, fmt)
    err_gptq = (x @ (gptq.dequantize() - weight).T).pow(2).mean()
    err_rtn = (x @ (rtn.dequantize() - weight).T).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_act_order_keeps_contiguous_groups_on_the_grid():
    fmt = get_format("w3g32")
    weight = torch.randn(8, 128)
    x = _correlated_inputs(512, 128)
    q = gptq_quantize(weight, x.T @ x / 512, fmt, act_order=True)
    # every group's values are integer multiples of that group's own scale: no permutation index needed
    steps = q.dequantize().view(8, 4, 32) / q.scale.float().unsqueeze(-1)
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    # static groups: the scales are exactly RTN's scales fitted on the original weight
    assert torch.equal(q.scale, rtn_quantize(weight, fmt).scale)


def test_dead_inputs_are_zeroed():
    weight = torch.randn(4, 32)
    x = _correlated_inputs(256, 32)
    x[:, 5] = 0
    q = gptq_quantize(weight, x.T @ x / 256, get_format("w4"))
    assert torch.all(q.dequantize()[:, 5] == 0)


def test_static_params_give_the_same_grid_as_rtn_per_channel():
    weight = torch.randn(8, 64)
    params = fit_params(get_format("w4"), weight)
    assert isinstance(params, GroupParams)
    q = gptq_quantize(weight, torch.eye(64), get_format("w4"))
    assert torch.equal(q.scale.float().squeeze(1), params.scale)
