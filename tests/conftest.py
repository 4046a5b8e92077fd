"""Models the tests build themselves: tiny configs of each supported architecture, and one tiny
Llama trained for a few seconds on standard-library documentation (for quality assertions)."""

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from automp import Allocation, quantize_
from automp.checkpoint import save_quantized
from automp.demo_model import stdlib_corpus, train_model, train_tokenizer

torch.set_num_threads(2)
VOCAB = 384


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny-model forwards gain nothing from a second, and two contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _configs(vocab: int) -> dict:
    common = dict(vocab_size=vocab, num_hidden_layers=2, num_attention_heads=4)
    llama_like = dict(common, hidden_size=64, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "llama": LlamaConfig(**llama_like),
        "qwen2": Qwen2Config(**llama_like),
        "mistral": MistralConfig(**llama_like, sliding_window=None),
        "opt": OPTConfig(**common, hidden_size=64, ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64),
        "gpt2": GPT2Config(
            vocab_size=vocab,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        ),
    }


ARCHS = tuple(_configs(VOCAB))


@pytest.fixture(scope="session")
def corpus() -> tuple[str, str]:
    return stdlib_corpus()


@pytest.fixture(scope="session")
def tokenizer(corpus):
    return train_tokenizer(corpus[0][:200_000], VOCAB)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """An untrained tiny model of each architecture saved as a model directory."""
    dirs = {}
    for arch, config in _configs(VOCAB).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, corpus) -> Path:
    """A 2-block Llama trained for a few seconds: far better than chance, so quality can be asserted."""
    out = tmp_path_factory.mktemp("trained") / "model"
    train_model(out, corpus[0][:400_000], layers=2, intermediate=256, vocab=1024, seqlen=128, steps=150, seed=0)
    (out.parent / "eval.txt").write_text(corpus[1][:60_000])
    (out.parent / "calib.txt").write_text(corpus[0][400_000:600_000])
    return out


def save_tiny_run(path: Path, tokenizer, config: dict, formats: dict[str, str], method="rtn", calib=None):
    """A random tiny Llama (``LlamaConfig(**config)``, seed 0) quantized under ``formats`` and saved as an
    automp run directory; returns the quantized model and its stored weights."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config)).eval()
    allocation = Allocation(formats=formats)
    qweights = quantize_(model, allocation, method, calib, progress=False)
    save_quantized(path, model, tokenizer, allocation, qweights)
    return model, qweights
