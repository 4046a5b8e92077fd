"""Text loading, token windows, and perplexity against an independent computation."""

import json
import math

import pytest
import torch

from automp.allocation import Allocation
from automp.data import calibration_windows, eval_windows, load_windows, read_text, tokenize
from automp.errors import AutompError
from automp.evaluate import paired_delta, perplexity
from automp.model import inventory, load_model
from automp.quantize import quantize_


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_text(str(tmp_path / "a.txt")) == "hello world"
    assert read_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"  # rows joined as WikiText-2 is
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(AutompError, match="bad.jsonl:2"):
        read_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(AutompError, match="empty"):
        read_text(str(tmp_path / "empty.txt"))
    with pytest.raises(AutompError, match="does not exist"):
        read_text(str(tmp_path / "nope.txt"))


def test_windows_are_seeded_and_exact():
    tokens = torch.arange(1000)
    a = calibration_windows(tokens, 8, 50, seed=3)
    assert torch.equal(a, calibration_windows(tokens, 8, 50, seed=3))
    assert not torch.equal(a, calibration_windows(tokens, 8, 50, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 49, dtype=torch.long))  # contiguous slices
    windows = eval_windows(tokens, 300)
    assert windows.shape == (3, 300) and windows[-1, -1] == 899  # remainder of 100 dropped
    with pytest.raises(AutompError, match="fewer than one window"):
        eval_windows(tokens, 1001)
    with pytest.raises(AutompError, match="fewer than one window"):
        calibration_windows(tokens, 4, 1000)


def test_perplexity_matches_independent_loop(tiny_dirs, corpus):
    model, tokenizer = load_model(tiny_dirs["llama"], device="cpu")
    windows = eval_windows(tokenize(corpus[1][:20_000], tokenizer), 48)[:10]
    result = perplexity(model, windows, batch_size=3, progress=False)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert result.windows == 10 and result.tokens == 480
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert result.window_nll == pytest.approx(losses, rel=1e-5)


def test_paired_delta():
    from automp.evaluate import Perplexity

    a = Perplexity(1.0, 3, 30, 10, [1.0, 2.0, 3.0])
    b = Perplexity(1.0, 3, 30, 10, [1.5, 2.5, 3.2])
    mean, se = paired_delta(a, b)
    diffs = torch.tensor([0.5, 0.5, 0.2])
    assert mean == pytest.approx(diffs.mean().item())
    assert se == pytest.approx(diffs.std().item() / math.sqrt(3))


def test_trained_model_perplexity_rises_as_bits_fall(trained_dir):
    model, tokenizer = load_model(trained_dir, device="cpu")
    windows = load_windows(str(trained_dir.parent / "eval.txt"), tokenizer, 128)
    calib = load_windows(str(trained_dir.parent / "calib.txt"), tokenizer, 128, nsamples=32)
    fp = perplexity(model, windows, progress=False)
    assert fp.ppl < tokenizer.vocab_size / 8  # far below chance
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inv = inventory(model)
    ppl, logit_err = {}, {}
    with torch.no_grad():
        reference = model(calib).logits
    for method in ("rtn", "gptq"):
        for scheme in ("w8", "w4g128", "w3g128", "w2g64"):
            model.load_state_dict(state)
            quantize_(model, Allocation.uniform(inv, scheme), method, calib, progress=False)
            ppl[method, scheme] = perplexity(model, windows, progress=False).ppl
            with torch.no_grad():
                logit_err[method, scheme] = (model(calib).logits - reference).pow(2).mean().item()
    for method in ("rtn", "gptq"):
        assert abs(ppl[method, "w8"] / fp.ppl - 1) < 0.005
        assert fp.ppl < ppl[method, "w4g128"] < ppl[method, "w3g128"] < ppl[method, "w2g64"]
    for scheme in ("w4g128", "w3g128", "w2g64"):  # on the calibration data GPTQ's output error is lower
        assert logit_err["gptq", scheme] < logit_err["rtn", scheme]
    assert ppl["gptq", "w3g128"] < ppl["rtn", "w3g128"]
    assert ppl["gptq", "w2g64"] < ppl["rtn", "w2g64"]
