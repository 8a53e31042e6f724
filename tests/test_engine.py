import copy

import pytest
import torch

from baselines.gptq import GPTQ
from epmq.adapters import adapter_for, block_linears
from epmq.config import method_params
from epmq.engine import CalibrationTask, quantize_model
from epmq.io import LazyCheckpoint
from epmq.catalog import get_method
from epmq.testing.models import (
    image_batches,
    input_gram,
    save_experts,
    text_batches,
    tiny_clip_vision,
    tiny_llama,
)


def quantized_linear_names(model):
    adapter = adapter_for(model)
    return {
        f"{stack.prefix}.{index}.{name}"
        for stack in adapter.stacks(model)
        for index, block in enumerate(stack.blocks)
        for name in block_linears(block)
    }


def tasks_for(model, tmp_path, k=2):
    batches = text_batches if model.config.model_type == "llama" else image_batches
    experts = save_experts(model, tmp_path, k)
    return [CalibrationTask(f"t{i}", batches(2, seed=i), LazyCheckpoint(path)) for i, path in enumerate(experts)]


@pytest.mark.parametrize("build", [tiny_llama, tiny_clip_vision], ids=["llama", "clip"])
@pytest.mark.parametrize("method", ["rtn", "gptq", "epmq"])
def test_every_block_linear_is_replaced_and_nothing_else(build, method, tmp_path):
    model = build()
    original = copy.deepcopy(model.state_dict())
    result = quantize_model(model, get_method(method, method_params("quantize", bits=4, group_size=32)), tasks_for(model, tmp_path))
    names = quantized_linear_names(model)
    assert set(result.replacements) == names
    assert len(names) == 2 * (7 if build is tiny_llama else 6)
    state = model.state_dict()
    for key, value in state.items():
        module = key.rsplit(".", 1)[0]
        if module in names and key.endswith(".weight"):
            assert not torch.equal(value, original[key]), key
            for row in value[:, :32]:  # first group of each row lies on a 4-bit grid
                assert row.unique().numel() <= 16
        else:  # embeddings, norms, biases, heads stay fp and untouched
            assert torch.equal(value, original[key]), key


@pytest.mark.parametrize("build", [tiny_llama, tiny_clip_vision], ids=["llama", "clip"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_outputs_stay_close_at_8_bits(build, method, tmp_path):
    model = build()
    reference = copy.deepcopy(model)
    tasks = tasks_for(model, tmp_path)
    quantize_model(model, get_method(method, method_params("quantize", bits=8, group_size=32)), tasks)
    batch = tasks[0].batches[0]
    with torch.no_grad():
        out = model(**batch).last_hidden_state if build is tiny_clip_vision else model(**batch).logits
        ref = reference(**batch).last_hidden_state if build is tiny_clip_vision else reference(**batch).logits
    assert (out - ref).norm() / ref.norm() < 0.02


class RecordingGPTQ(GPTQ):
    name = "recording_gptq"

    def __init__(self, params):
        super().__init__(params)
        self.hessians = {}

    def quantize(self, name, weight, stats):
        self.hessians[name] = stats.hessian_sum.clone()
        return super().quantize(name, weight, stats)


def test_statistics_come_from_the_partially_quantized_model(tmp_path):
    model = tiny_llama()
    fp_model = copy.deepcopy(model)
    tasks = tasks_for(model, tmp_path)
    method = RecordingGPTQ(method_params("quantize", bits=3, group_size=32, hessian_dtype="float64"))
    quantize_model(model, method, tasks)

    # Block 1's inputs and block 0's MLP inputs depend only on already-quantized layers.
    for name in ["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"]:
        expected = input_gram(model, name, tasks)
        assert torch.allclose(method.hessians[name], expected, rtol=1e-6, atol=1e-6 * expected.abs().max())
        assert not torch.allclose(method.hessians[name], input_gram(fp_model, name, tasks), rtol=1e-3)


def test_one_pass_per_block_collects_every_group_from_the_block_inputs(tmp_path):
    model = tiny_llama()
    fp_model = copy.deepcopy(model)
    tasks = tasks_for(model, tmp_path)
    method = RecordingGPTQ(method_params("quantize", bits=3, group_size=32, hessian_dtype="float64", true_sequential=False))
    quantize_model(model, method, tasks)

    # down_proj of block 0 sees the fp block (nothing of block 0 was quantized during the pass),
    # while block 1 still sees the quantized block 0.
    fp_down = input_gram(fp_model, "model.layers.0.mlp.down_proj", tasks)
    assert torch.allclose(method.hessians["model.layers.0.mlp.down_proj"], fp_down, rtol=1e-6, atol=1e-6 * fp_down.abs().max())
    q_next = input_gram(model, "model.layers.1.self_attn.q_proj", tasks)
    assert torch.allclose(method.hessians["model.layers.1.self_attn.q_proj"], q_next, rtol=1e-6, atol=1e-6 * q_next.abs().max())


def test_epmq_needs_experts_and_matching_shapes(tmp_path):
    model = tiny_llama()
    method = get_method("epmq", method_params("quantize"))
    with pytest.raises(ValueError, match="expert checkpoint for every task"):
        quantize_model(model, method, [CalibrationTask("t", text_batches(1))])
    other = tiny_llama()
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 32, bias=False)
    bad = save_experts(other, tmp_path, 1)
    with pytest.raises(ValueError, match="q_proj.weight has shape"):
        quantize_model(model, method, [CalibrationTask("t", text_batches(1), LazyCheckpoint(bad[0]))])


def test_calibration_methods_refuse_to_run_without_data():
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_model(tiny_llama(), get_method("gptq", method_params("quantize")), [])


def test_epmq_with_alpha_zero_runs(tmp_path):
    model = tiny_clip_vision()
    result = quantize_model(model, get_method("epmq", method_params("quantize", alpha=0.0, group_size=32)), tasks_for(model, tmp_path))
    assert all(torch.isfinite(layer.weight).all() for layer in result.replacements.values())
