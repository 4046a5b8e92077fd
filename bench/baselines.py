"""Other tools' quantizers on the same model, scheme and calibration windows (benchmarks only).

Needs the ``bench`` extra (llmcompressor). After ``oneshot`` llmcompressor leaves every Linear
weight fake-quantized (dequantized values on the grid), so the returned model runs as quantized.
"""

from __future__ import annotations

import os

import torch

from automp.formats import get_format

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def llmcompressor_quantize(model_dir: str, scheme: str, calib: torch.Tensor, method: str = "gptq") -> torch.nn.Module:
    """llmcompressor's GPTQ or AWQ (``llmcompressor_recipe``) on the model in ``model_dir``, in float32."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(
        model=model,
        processor=AutoTokenizer.from_pretrained(model_dir),
        recipe=llmcompressor_recipe(scheme, method),
        dataset=dataset,
        num_calibration_samples=len(calib),
        shuffle_calibration_samples=False,
        max_seq_length=calib.shape[1],
        batch_size=1,
        pipeline="sequential",
    )
    return model.eval()


def llmcompressor_recipe(scheme: str, method: str = "gptq") -> list:
    """llmcompressor's GPTQ (static act-order, 1% damping, 128-column blocks: automp's defaults) or AWQ in
    ``scheme`` (an integer format) on every Linear but ``lm_head``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier  # the scale search; quantization follows

    fmt = get_format(scheme)
    if fmt.kind != "int":
        raise ValueError(f"llmcompressor comparison covers integer formats, not {scheme}")
    strategy = "group" if fmt.group_size else "channel"
    weights = QuantizationArgs(
        num_bits=fmt.bits, type="int", symmetric=fmt.symmetric, strategy=strategy, group_size=fmt.group_size
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if method == "gptq":
        return [
            GPTQModifier(
                config_groups=groups, ignore=["lm_head"], actorder="static", dampening_frac=0.01, block_size=128
            )
        ]
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():  # llmcompressor's AWQ pins cached activations, which needs a GPU
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    return [
        AWQModifier(duo_scaling=True, n_grid=20),
        QuantizationModifier(config_groups=groups, ignore=["lm_head"]),
    ]
