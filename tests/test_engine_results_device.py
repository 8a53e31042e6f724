"""Issue 13, item 3: each layer's quantized result leaves the compute device as soon as the layer is done."""

import pytest
import torch

from epmq.config import method_params
from epmq.engine import CalibrationTask, quantize_model
from epmq.grid import QuantizedWeight
from epmq.catalog import get_method
from epmq.testing.models import text_batches, tiny_llama


def _tensors(replacement):
    if isinstance(replacement, QuantizedWeight):
        return [replacement.codes, replacement.scales, replacement.zeros, replacement.g_idx]
    return [replacement]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_results_are_kept_on_the_results_device_not_the_model_s(method):
    # The model computes on the CPU; "meta" stands in for the host while the model sits on a GPU:
    # a result left where it was computed would still be on the CPU here.
    model = tiny_llama()
    result = quantize_model(model, get_method(method, method_params("quantize")), [CalibrationTask("t", text_batches(1))],
                            results_device="meta")
    assert result.replacements
    for name, layer in result.replacements.items():
        assert all(tensor.device.type == "meta" for tensor in _tensors(layer.replacement)), name
    assert all(parameter.device.type == "cpu" and torch.isfinite(parameter).all() for parameter in model.parameters())


def test_moving_a_quantized_weight_keeps_its_values():
    weight = torch.randn(6, 16)
    quantized = get_method("rtn", method_params("quantize", group_size=8)).quantize("w", weight, None).replacement
    moved = quantized.to("cpu")
    assert torch.equal(moved.weight, quantized.weight)
    assert (moved.bits, moved.group_size, moved.sym) == (quantized.bits, quantized.group_size, quantized.sym)
