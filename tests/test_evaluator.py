"""AllocationEvaluator: cached weights swap exactly, metrics agree with the perplexity protocol."""

import pytest
import torch

from automp.allocation import Allocation
from automp.data import load_windows
from automp.errors import AutompError
from automp.evaluate import perplexity
from automp.model import inventory, linear_weight, load_model
from automp.quantize import quantize_
from automp.search.evaluator import AllocationEvaluator

FORMATS = ["w3g128", "w4g128", "w8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(trained_dir):
    model, tokenizer = load_model(trained_dir, device="cpu")
    windows = load_windows(str(trained_dir.parent / "eval.txt"), tokenizer, 128)[:3]
    calib = load_windows(str(trained_dir.parent / "calib.txt"), tokenizer, 128, 8, seed=0)
    return model, windows, calib


def _mixed(inv, formats):
    return Allocation(formats={layer.name: formats[i % len(formats)] for i, layer in enumerate(inv.layers)})


def test_swapping_cached_weights_is_exact_and_restorable(setup):
    model, windows, _ = setup
    inv = inventory(model)
    original = {layer.name: linear_weight(model.get_submodule(layer.name)).clone() for layer in inv.layers}
    fp_ppl = perplexity(model, windows, progress=False).ppl
    with AllocationEvaluator(model, windows, FORMATS + ["fp16"]) as evaluator:
        a, b = Allocation.uniform(inv, "w3g128"), _mixed(inv, ["w8", "w3g128", "fp16", "w4g128"])
        first, other, again = evaluator(a), evaluator(b), evaluator(a)
        assert first == again  # bit-identical: the weights of b left nothing behind
        assert other != first
        assert evaluator(Allocation.uniform(inv, "fp16")) == fp_ppl == evaluator.baseline
        assert first > fp_ppl  # 3-bit RTN costs perplexity
        assert evaluator.evaluations == 4
    for layer in inv.layers:  # leaving the with block put the original weights back
        assert torch.equal(linear_weight(model.get_submodule(layer.name)), original[layer.name])
    assert perplexity(model, windows, progress=False).ppl == fp_ppl


def test_rtn_cache_holds_exactly_the_weights_quantize_produces(setup, trained_dir):
    model, windows, _ = setup
    inv = inventory(model)
    allocation = _mixed(inv, FORMATS)
    reference, _ = load_model(trained_dir, device="cpu")
    qweights = quantize_(reference, allocation, "rtn", progress=False)
    with AllocationEvaluator(model, windows, FORMATS) as evaluator:
        evaluator.apply(allocation)
        for layer in inv.layers:
            swapped = linear_weight(model.get_submodule(layer.name))
            assert torch.equal(swapped, qweights[layer.name].dequantize())


def test_kl_and_attention_shift_order_the_formats(setup):
    model, windows, _ = setup
    inv = inventory(model)
    with AllocationEvaluator(model, windows, FORMATS + ["fp16"], metric="kl") as evaluator:
        assert evaluator.baseline == 0.0 and evaluator.supports_attention
        results = {f: evaluator.measure(Allocation.uniform(inv, f), kl=True, attention=True) for f in FORMATS}
        fp = evaluator.measure(Allocation.uniform(inv, "fp16"), kl=True, attention=True)
        assert abs(fp.kl) < 1e-6 and fp.attn_shift < 1e-6
        assert results["w3g128"].kl > results["w4g128"].kl > results["w8"].kl > 0
        assert results["w3g128"].attn_shift > results["w8"].attn_shift > 0
        # measuring attention runs eager attention instead of SDPA: the same numbers up to rounding
        assert evaluator(Allocation.uniform(inv, "w4g128")) == pytest.approx(results["w4g128"].kl, rel=1e-4)
    assert model.config._attn_implementation != "eager"  # switched back after measuring attention


def test_gptq_cache_is_closer_to_full_precision_than_rtn(setup):
    model, windows, calib = setup
    inv = inventory(model)
    w3 = Allocation.uniform(inv, "w3g128")
    with AllocationEvaluator(model, windows, ["w3g128"], metric="kl") as rtn:
        rtn_kl = rtn(w3)
    with AllocationEvaluator(model, windows, ["w3g128"], calib=calib, method="gptq", metric="kl") as gptq:
        gptq_kl = gptq(w3)
    assert 0 < gptq_kl < 0.6 * rtn_kl


def test_bad_requests_are_clear_errors(setup):
    model, windows, _ = setup
    inv = inventory(model)
    with pytest.raises(AutompError, match="metric"):
        AllocationEvaluator(model, windows, FORMATS, metric="bleu")
    with pytest.raises(AutompError, match="calibration"):
        AllocationEvaluator(model, windows, FORMATS, method="gptq")
    with AllocationEvaluator(model, windows, ["w4g128"]) as evaluator:
        with pytest.raises(AutompError, match="not pre-quantized"):
            evaluator(Allocation.uniform(inv, "w8"))
