"""AWQ's ``scale_activation``: CLIP's fc2 scaled through llm-awq's ScaledActivation, stored and reloaded."""

import copy

import torch

from epmq.activations import ScaledActivation
from epmq.checkpoint import load_model, save_quantized
from epmq.config import method_params
from epmq.engine import CalibrationTask, quantize_model
from epmq.catalog import get_method
from epmq.testing.models import image_batches, tiny_clip_vision


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_scaled_activation_lets_awq_scale_clip_fc2_and_survives_a_round_trip(tmp_path):
    model = tiny_clip_vision()
    batches = image_batches(2)
    plain = get_method("awq", method_params("quantize", bits=4, group_size=32))
    quantize_model(copy.deepcopy(model), plain, [CalibrationTask("t", batches)])
    assert not any(name.endswith("mlp.fc2") for name in plain.input_scales)

    scaled = get_method("awq", method_params("quantize", bits=4, group_size=32, awq={"scale_activation": True}))
    result = quantize_model(model, scaled, [CalibrationTask("t", batches)])
    fc2 = [name for name in scaled.input_scales if name.endswith("mlp.fc2")]
    assert len(fc2) == 2
    activations = [layer.mlp.activation_fn for layer in getattr(model, "vision_model", model).encoder.layers]
    assert all(isinstance(act, ScaledActivation) for act in activations)
    for name, act in zip(fc2, activations):
        assert torch.equal(act.scales.detach(), scaled.input_scales[name])
    assert any(not torch.allclose(act.scales, torch.ones_like(act.scales)) for act in activations)

    out = save_quantized(tmp_path / "q", model, {n: layer.replacement for n, layer in result.replacements.items()}, {})
    loaded = load_model(out)
    assert isinstance(getattr(loaded, "vision_model", loaded).encoder.layers[0].mlp.activation_fn, ScaledActivation)
    assert torch.equal(hidden(loaded, batches[0]), hidden(model, batches[0]))


def test_folding_into_a_scaled_activation_preserves_the_function():
    from baselines.awq import fold_scales

    model = tiny_clip_vision()
    batch = image_batches(1)[0]
    reference = hidden(model, batch)
    block = getattr(model, "vision_model", model).encoder.layers[0]
    scales = torch.rand(block.mlp.fc2.in_features, generator=torch.Generator().manual_seed(0)) * 4 + 0.25
    with torch.no_grad():
        fold_scales(block, "mlp.activation_fn", [block.mlp.fc2], scales)
    torch.testing.assert_close(hidden(model, batch), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
