"""Formats: exact storage accounting, grids checked against independent constructions, error bounds."""

import math

import pytest
import torch
from scipy.stats import norm

from automp.errors import AutompError
from automp.formats import NF4_LEVELS, get_format, parse_formats
from automp.quantizers.qweight import QuantizedWeight, pack_bits, unpack_bits
from automp.quantizers.rtn import rtn_quantize


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("w4g128", 4 + 16 / 128),
        ("w4g128a", 4 + 20 / 128),
        ("w3g128", 3 + 16 / 128),
        ("w2g64", 2 + 16 / 64),
        ("w2g64a", 2 + 18 / 64),
        ("w8", 8 + 16 / 512),
        ("w3a", 3 + 19 / 512),
        ("nf4g64", 4 + 16 / 64),
        ("fp4g32", 4 + 16 / 32),
        ("fp16", 16.0),
        ("bf16", 16.0),
    ],
)
def test_storage_bits_exact(name, expected):
    fmt = get_format(name)
    assert fmt.storage_bits(256, 512) == round(expected * 256 * 512)
    assert fmt.bits_per_weight(256, 512) == expected


def test_format_names_are_validated():
    assert [f.name for f in parse_formats("w2g64, W4G128A,nf4g64")] == ["w2g64", "w4g128a", "nf4g64"]
    for bad in ["w5", "w4g100", "nf3g64", "fp4", "int4", "w4g128b", ""]:
        with pytest.raises(AutompError):
            parse_formats(bad) if bad == "" else get_format(bad)


def test_group_must_divide_input_dimension():
    with pytest.raises(AutompError, match="not divisible by the group size 128"):
        rtn_quantize(torch.randn(8, 96), get_format("w4g128"))
    rtn_quantize(torch.randn(8, 96), get_format("w4"))  # per-channel takes any shape


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(value):
    weight = torch.randn(8, 64)
    weight[3, 5] = value
    with pytest.raises(AutompError, match="NaN or Inf"):
        rtn_quantize(weight, get_format("w4g32"))


def test_nf4_levels_match_qlora_construction():
    # QLoRA: quantiles of N(0,1) at offset 0.9677, 8 positive and 7 negative levels plus 0, max-normalised
    offset = 0.9677083
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    levels = torch.tensor(sorted([*positive, 0.0, *negative]))
    levels = levels / levels.abs().max()
    assert torch.allclose(levels, torch.tensor(NF4_LEVELS), atol=1e-6)


def test_fp4_levels_are_e2m1():
    # e2m1: exponent bias 1, subnormal at exponent 0
    values = set()
    for sign in (1, -1):
        for exponent in range(4):
            for mantissa in range(2):
                mag = (mantissa / 2) if exponent == 0 else (1 + mantissa / 2) * 2 ** (exponent - 1)
                values.add(sign * mag)
    assert set(get_format("fp4g32").levels.tolist()) == values


@pytest.mark.parametrize("name", ["w8", "w4g128", "w4g128a", "w3g64", "w2g32", "w2g64a", "w3a"])
def test_integer_rtn_error_is_within_half_a_step(name):
    fmt = get_format(name)
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * torch.rand(64, 1)  # rows of different scales
    q = rtn_quantize(weight, fmt)
    g = fmt.group(256)
    step = q.scale.float().repeat_interleave(g, dim=1)
    err = (q.dequantize() - weight).abs()
    # symmetric grids stop one step short of +absmax: that one value may be off by a full step
    top = (2 ** (fmt.bits - 1) - 1) * step if fmt.symmetric else torch.full_like(step, math.inf)
    inside = weight <= top
    assert (err[inside] <= step[inside] / 2 + 1e-5 * step[inside]).all()
    assert (err <= step * (1 + 1e-4)).all()
    assert len(torch.unique(q.codes)) <= 2**fmt.bits


@pytest.mark.parametrize("name", ["nf4g64", "fp4g32"])
def test_codebook_rtn_picks_the_nearest_level(name):
    fmt = get_format(name)
    weight = torch.randn(32, 128)
    q = rtn_quantize(weight, fmt)
    g = fmt.group_size
    scale = q.scale.float().repeat_interleave(g, dim=1)
    candidates = fmt.levels.view(1, 1, -1) * scale.unsqueeze(-1)
    best = (candidates - weight.unsqueeze(-1)).abs().amin(dim=-1)
    assert torch.allclose((q.dequantize() - weight).abs(), best, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [1, 7, 64, 1001])
def test_bit_packing_round_trips_densely(bits, count):
    values = torch.randint(0, 2**bits, (count,), dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), values)


@pytest.mark.parametrize("name", ["w3g64a", "w8", "nf4g64", "fp4g32", "w2g32"])
def test_stored_weight_round_trips_and_matches_accounting(name):
    fmt = get_format(name)
    q = rtn_quantize(torch.randn(48, 128), fmt)
    back = QuantizedWeight.from_state_dict(name, q.shape, q.state_dict())
    assert torch.equal(back.dequantize(), q.dequantize())
    assert q.stored_bytes() * 8 == fmt.storage_bits(48, 128)
