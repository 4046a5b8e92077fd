"""The memory plan (``automp plan``): parameters counted on the meta device, stage figures against hand
computations, the mode chosen for a device, refusals with their numbers, and sizes checked as the CLI takes them.
Only config.json files are read: nothing is downloaded and no weight memory is allocated."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

from automp import Allocation, quantize_
from automp.checkpoint import model_bytes, payload_bytes
from automp.cli import app
from automp.errors import AutompError
from automp.execution.plan import (
    KL_WINDOWS,
    REPAIR_BATCH,
    STAGES,
    MemoryPlan,
    Workload,
    check_plan,
    held_bytes,
    memory_plan,
    model_shape,
    plan_refusal,
    shortfall,
    stage_memory,
)
from automp.formats import get_format, parse_formats
from automp.model import LayerInfo, inventory
from automp.quantizers.gguf_weight import GGUFWeight
from automp.quantizers.qweight import CorrectedWeight
from automp.quantizers.rtn import rtn_quantize
from automp.repair.reconstruct import ReconstructConfig
from automp.settings import ProfileSettings

CONFIGS = Path(__file__).parent / "configs"
LLAMA_8B, LLAMA_70B = CONFIGS / "llama-3-8b", CONFIGS / "llama-3-70b"
GIB = 2**30
runner = CliRunner()


def _work(**changes) -> Workload:
    """Llama-3's calibration as automp runs it on a GPU in bfloat16: 128 windows of 2048 tokens, batches of 8."""
    values = dict(
        nsamples=128, seqlen=2048, batch_size=8, formats=tuple(parse_formats("w2g64,w3g128,w4g128")),
        dtype_bytes=2, on_cpu=False,
    )  # fmt: skip
    return Workload(**{**values, **changes})


@pytest.fixture(scope="module")
def shape_8b():
    return model_shape(str(LLAMA_8B))


@pytest.fixture(scope="module")
def shape_70b():
    return model_shape(str(LLAMA_70B))


def _llama_params(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> int:
    kv = kv_heads * hidden // heads
    block = 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate + 2 * hidden  # q, o; k, v; MLP; 2 norms
    return 2 * vocab * hidden + layers * block + hidden  # untied embedding and head, the final norm


def test_params_from_the_meta_model_equal_the_hand_count(shape_8b, shape_70b):
    assert shape_8b.params == _llama_params(4096, 32, 32, 8, 14336, 128256)
    assert shape_8b.params == pytest.approx(8.03e9, rel=0.005)
    assert shape_70b.params == _llama_params(8192, 80, 64, 8, 28672, 128256)
    assert shape_70b.params == pytest.approx(70.55e9, rel=0.005)
    assert (shape_8b.stored_dtype, shape_8b.stored_bytes) == ("bfloat16", 2 * shape_8b.params)  # config.json alone


def test_streaming_gptq_of_the_8b_shape_against_a_hand_computation(shape_8b):
    d, inner, kv, batch, seqlen, w = 4096, 14336, 1024, 8, 2048, 2
    block_params = 2 * d * d + 2 * kv * d + 3 * d * inner + 2 * d
    hessians = (6 * d * d + inner * inner) * 4  # q, k, v, o, gate, up read d inputs; down reads 14336, fp32
    io = 2 * batch * seqlen * d * w  # a batch's input moved in and its output
    forward = batch * seqlen * (2 * d + 3 * inner) * w  # residual + block output; gate, up, act(gate) * up
    hessian_update = batch * seqlen * inner * 4 + 2 * inner * inner * 4  # x.float() and x^T x of down_proj's input
    gptq_down = 3 * d * inner * 4 + d * inner * 8 + 3 * inner * inner * 4  # W, act-order copy, Q; codes; H, L, Hinv
    numels = [d * d, kv * d, kv * d, d * d, d * inner, d * inner, inner * d]
    held = sum(n + n // 64 * 2 for n in numels)  # w2g64's uint8 codes and fp16 scales: the most of the three
    expected = block_params * w + hessians + max(io + forward + hessian_update, gptq_down + held)
    assert stage_memory(shape_8b, _work())["streaming"]["gptq"].device_bytes == expected


def test_70b_streams_gptq_under_40gb_and_needs_more_than_80gib_in_memory(shape_70b):
    figures = stage_memory(shape_70b, _work())
    assert figures["streaming"]["gptq"].device_bytes < 40e9
    assert figures["in-memory"]["gptq"].device_bytes > 80 * GIB
    assert figures["in-memory"]["load"].device_bytes == 2 * shape_70b.params  # the whole model in bfloat16
    plan = memory_plan(
        str(LLAMA_70B), device="cuda", dtype="bfloat16", device_memory="40GiB", cpu_memory="256GiB"
    )  # fmt: skip
    assert plan.mode == "streaming" and plan.device_memory == 40 * GIB
    assert plan.stages == plan.modes["streaming"] and set(plan.stages) == set(STAGES)
    check_plan(plan, "gptq")  # fits: no error


def test_a_small_model_fits_in_memory_and_every_figure_grows_with_the_workload(shape_8b):
    plan = memory_plan(str(LLAMA_8B), device="cuda", dtype="bfloat16", device_memory="1000GiB", cpu_memory="1000GiB")
    assert plan.mode == "in-memory" and plan.stages == plan.modes["in-memory"]
    small, large = stage_memory(shape_8b, _work(batch_size=1)), stage_memory(shape_8b, _work(batch_size=16))
    for stage in ("gptq", "awq", "perplexity", "tasks", "profile.kl"):
        for mode in ("in-memory", "streaming"):
            assert small[mode][stage].device_bytes < large[mode][stage].device_bytes, (stage, mode)
    for stage in STAGES:  # one block at a time never needs more device memory than the whole model
        assert small["streaming"][stage].device_bytes <= small["in-memory"][stage].device_bytes, stage


def test_check_plan_refuses_with_the_stage_and_the_numbers():
    plan = memory_plan(str(LLAMA_70B), device="cuda", dtype="bfloat16", device_memory="8GiB", cpu_memory="256GiB")
    assert plan.mode is None
    needed = plan.modes["streaming"]["gptq"].device_bytes / GIB
    with pytest.raises(AutompError) as caught:
        check_plan(plan, "gptq")
    message = str(caught.value)
    assert message.startswith(f"gptq needs {needed:.1f} GiB of device memory in streaming mode")
    assert "--device-memory is 8.0 GiB" in message and "\n" not in message
    check_plan(plan, "export")  # runs on the CPU: fits
    with pytest.raises(AutompError, match="no stage 'quantise'"):
        check_plan(plan, "quantise")


def test_check_plan_names_host_memory_when_that_is_short():
    plan = memory_plan(str(LLAMA_8B), device="cuda", dtype="bfloat16", device_memory="1000GiB", cpu_memory="1GiB")
    outside = 2 * 128256 * 4096 * 2 + 4096 * 2  # streaming keeps the embedding, head and final norm in host memory
    assert plan.modes["streaming"]["load"].cpu_bytes == outside
    message = f"load needs {outside / GIB:.1f} GiB of CPU memory in streaming mode; --cpu-memory is 1.0 GiB"
    with pytest.raises(AutompError, match=f"^{message} \\(in-memory: 15\\.0 GiB\\)"):
        check_plan(plan, "load")


def test_a_plan_whose_stages_fit_different_modes_is_refused():
    plan = memory_plan(
        str(LLAMA_8B), device="cuda", dtype="bfloat16", device_memory="30GiB", cpu_memory="6GiB", stages="load,gptq"
    )  # fmt: skip
    assert plan.mode is None and plan.planned == ["load", "gptq"]
    assert plan.fits("streaming", "load") and not plan.fits("in-memory", "load")  # from_pretrained's host copy
    # on the host: the activation cache, and a shard of codes as the checkpoint is written
    assert plan.fits("in-memory", "gptq") and not plan.fits("streaming", "gptq")
    check_plan(plan, "load")
    check_plan(plan, "gptq")
    refusal = plan_refusal(plan)
    assert refusal.startswith("gptq needs 8.6 GiB of CPU memory in streaming mode; --cpu-memory is 6.0 GiB, and load")
    assert "no one execution mode fits every stage" in refusal


def test_on_a_cpu_plan_device_and_host_bytes_share_one_memory():
    plan = memory_plan(str(LLAMA_8B), device="cpu", device_memory="20GiB", cpu_memory="64GiB", batch_size=1)
    assert plan.dtype == "float32" and plan.modes["in-memory"]["load"].cpu_bytes == 0  # .to("cpu") copies nothing
    gptq = plan.modes["streaming"]["gptq"]
    assert plan.fits("streaming", "gptq") == (gptq.device_bytes + gptq.cpu_bytes <= 20 * GIB)
    assert shortfall(plan, "load", "in-memory").startswith("load needs 29.9 GiB of memory in in-memory mode")


def test_load_bytes_of_a_tiny_real_model_are_its_parameter_bytes(tmp_path):
    config = LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)  # float32
    model.save_pretrained(tmp_path)
    plan = memory_plan(
        str(tmp_path), formats="w4g32", device="cuda", dtype="float32", device_memory="1GiB", cpu_memory="1GiB"
    )  # fmt: skip
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.modes["in-memory"]["load"].cpu_bytes == parameter_bytes
    assert plan.modes["in-memory"]["load"].device_bytes == parameter_bytes
    assert plan.params == sum(p.numel() for p in model.parameters())
    # the stored bytes come from the safetensors header
    assert (plan.stored_dtype, plan.stored_bytes) == ("float32", payload_bytes(tmp_path / "model.safetensors"))
    assert plan.seqlen == 64  # 2048 capped at the model's maximum positions
    assert plan.mode == "in-memory"
    # the quantized checkpoint the gptq stage writes: every block linear packed, the rest in 16-bit
    qweights = quantize_(model, Allocation.uniform(inventory(model), "w4g32"), "rtn", progress=False)
    assert plan.modes["in-memory"]["gptq"].disk_bytes == model_bytes(model, qweights)


def test_a_tied_head_is_counted_once(tmp_path):
    config = LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    untied = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert model_shape(str(tmp_path)).params == untied == _llama_params(64, 2, 4, 2, 128, 384) - 384 * 64


def test_an_index_without_its_shards_gives_the_stored_size(tmp_path):
    (tmp_path / "config.json").write_text((LLAMA_8B / "config.json").read_text())
    index = {"metadata": {"total_size": 16_060_522_496}, "weight_map": {"lm_head.weight": "model-00004.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shape = model_shape(str(tmp_path))
    assert (shape.stored_bytes, shape.stored_dtype) == (16_060_522_496, "bfloat16")


def test_a_corrupt_safetensors_header_is_one_error(tmp_path):
    (tmp_path / "config.json").write_text((LLAMA_8B / "config.json").read_text())
    save_file({}, tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(AutompError, match="safetensors header"):
        model_shape(str(tmp_path))


def test_the_plan_saves_and_loads(tmp_path):
    plan = memory_plan(str(LLAMA_8B), device="cuda", dtype="float16", device_memory="24GB", batch_size=1)
    plan.save(tmp_path / "plan.json")
    assert MemoryPlan.load(tmp_path / "plan.json") == plan
    assert plan.device_memory == 24_000_000_000 and plan.dtype == "float16"


@pytest.mark.parametrize("name", ["w4g32", "w3g32a", "w8", "nf4g64", "q4_k", "w4g32+r4"])
def test_held_bytes_are_the_bytes_of_a_quantized_weight(name):
    fmt = get_format(name)
    qweight = rtn_quantize(torch.randn(48, 256), fmt, correction="svd")
    layer = LayerInfo("model.layers.0.mlp.down_proj", 0, "down", 48, 256)
    assert held_bytes(fmt, layer) == sum(t.numel() * t.element_size() for t in _tensors(qweight))


def _tensors(qweight) -> list[torch.Tensor]:
    if isinstance(qweight, CorrectedWeight):
        return [*_tensors(qweight.base), qweight.correction.A, qweight.correction.B]
    if isinstance(qweight, GGUFWeight):
        return [qweight.blocks]
    return [t for t in (qweight.codes, qweight.scale, qweight.zero) if t is not None]


def test_the_planned_constants_follow_the_code():
    assert REPAIR_BATCH == ReconstructConfig().batch_size
    assert KL_WINDOWS == ProfileSettings.model_fields["kl_windows"].default


def _invoke(*args):
    return runner.invoke(app, ["plan", *map(str, args)])


def test_cli_prints_the_plan_as_json():
    result = _invoke(
        "--model", LLAMA_70B, "--device", "cuda", "--dtype", "bfloat16", "--device-memory", "40GiB",
        "--cpu-memory", "256GiB", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan["mode"] == "streaming" and plan["model"] == str(LLAMA_70B) and plan["params"] > 7e10
    assert set(plan["stages"]["gptq"]) == {"device_bytes", "cpu_bytes", "disk_bytes"}
    assert (plan["device_memory"], plan["cpu_memory"]) == (40 * GIB, 256 * GIB)


def test_cli_prints_a_table_without_json():
    result = _invoke("--model", LLAMA_8B, "--device", "cuda", "--device-memory", "3.2G", "--stages", "export")
    assert result.exit_code == 0, result.output
    assert "in-memory" in result.stdout and "| gptq |" in result.stdout and "GiB" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device-memory", "abc"], "--device-memory 'abc' is not a size"),
        (["--device-memory=-24GiB"], "--device-memory '-24GiB' is not a size"),
        (["--device-memory", "0GiB"], "--device-memory must be positive"),
        (["--device-memory", "24GiB", "--cpu-memory", "lots"], "--cpu-memory 'lots' is not a size"),
        (["--device-memory", "24GiB", "--stages", "gptq,quantise"], "unknown stage 'quantise'"),
        (["--device-memory", "24GiB", "--seqlen", "16384"], "exceeds the model's maximum positions (8192)"),
        (["--device-memory", "24GiB", "--dtype", "int4"], "unknown dtype 'int4'"),
        (["--device-memory", "24GiB", "--formats", "w5g7"], "w5g7"),
        (["--device-memory", "8GiB", "--dtype", "bfloat16"], "needs"),  # nothing fits: refused with the numbers
    ],
)
def test_cli_errors_are_one_line_with_status_2(args, message):
    result = _invoke("--model", LLAMA_70B, "--device", "cuda", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
