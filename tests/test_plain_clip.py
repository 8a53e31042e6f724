"""epmq.models' plain-torch CLIPVisionModel: transformers' module tree, outputs and quantized checkpoints, bit for bit."""

import copy
import json
import struct

import pytest
import torch

from epmq.catalog import get_method
from epmq.checkpoint import load_model, save_quantized
from epmq.config import method_params
from epmq.engine import CalibrationTask, quantize_model
from epmq.io import LazyCheckpoint
from epmq.models import plain_model_class
from epmq.models.clip_vision import ClipVisionModel
from epmq.testing.models import image_batches, save_experts, tiny_clip_vision


def safetensors_parts(directory):
    """(header, tensor bytes) of ``model.safetensors``: the header parsed, since safetensors writes its
    ``__metadata__`` entries in an arbitrary order."""
    data = (directory / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]), data[8 + size :]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny CLIP tower whose every parameter (norms and biases too) is far from its init."""
    model = tiny_clip_vision()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    directory = tmp_path_factory.mktemp("clip") / "model"
    model.save_pretrained(directory)
    return directory


def test_plain_torch_is_chosen_only_for_what_it_reproduces(checkpoint):
    config = {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"], "hidden_act": "quick_gelu"}
    assert plain_model_class(config) is ClipVisionModel
    assert plain_model_class({**config, "architectures": ["CLIPVisionModelWithProjection"]}) is None
    assert plain_model_class({**config, "hidden_act": "silu"}) is None
    assert plain_model_class({**config, "_attn_implementation": "eager"}) is None
    assert plain_model_class({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) is None
    assert isinstance(load_model(checkpoint, plain_torch=True), ClipVisionModel)
    assert not isinstance(load_model(checkpoint), ClipVisionModel)


def test_same_state_dict_and_bit_identical_outputs(checkpoint):
    reference = load_model(checkpoint)
    plain = load_model(checkpoint, plain_torch=True)
    expected = reference.state_dict()
    assert list(plain.state_dict()) == list(expected)
    assert all(torch.equal(value, expected[key]) for key, value in plain.state_dict().items())
    batch = image_batches(1, batch=8)[0]
    with torch.no_grad():
        assert torch.equal(plain(**batch), reference(**batch).pooler_output)
        hidden = reference.pre_layrnorm(reference.embeddings(batch["pixel_values"]))
        assert torch.equal(plain.pre_layrnorm(plain.embeddings(batch["pixel_values"])), hidden)
        for ours, theirs in zip(plain.encoder.layers, reference.encoder.layers):
            out = theirs(hidden, None)
            out = out[0] if isinstance(out, tuple) else out
            assert torch.equal(ours(hidden), out)
            hidden = out


@pytest.mark.parametrize("method, params", [
    ("rtn", {}),
    ("gptq", {}),
    ("awq", {}),
    ("awq", {"awq": {"scale_activation": True}}),
    ("epmq", {"alpha": 0.1}),
])
def test_quantized_checkpoints_are_byte_identical(checkpoint, tmp_path, method, params):
    reference = load_model(checkpoint)
    experts = save_experts(reference, tmp_path, k=2, scale=0.05)
    tasks = [CalibrationTask(f"t{i}", image_batches(2, seed=i), LazyCheckpoint(expert)) for i, expert in enumerate(experts)]
    written = {}
    for name, model in (("transformers", reference), ("plain", load_model(checkpoint, plain_torch=True))):
        quantizer = get_method(method, method_params("quantize", bits=4, group_size=32, **params))
        result = quantize_model(model, quantizer, copy.deepcopy(tasks))
        replacements = {layer: r.replacement for layer, r in result.replacements.items()}
        written[name] = save_quantized(tmp_path / name, model, replacements, {})
    assert (written["plain"] / "config.json").read_bytes() == (written["transformers"] / "config.json").read_bytes()
    assert safetensors_parts(written["plain"]) == safetensors_parts(written["transformers"])
    reloaded = load_model(written["plain"], plain_torch=True)
    batch = image_batches(1, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(reloaded(**batch), load_model(written["transformers"])(**batch).pooler_output)


def test_fine_tuning_and_saving_are_bit_identical(checkpoint, tmp_path):
    """mini-clip8's experts are fine-tuned on the plain tower: the same steps give the same weights and files."""
    from evals import clip_zeroshot as zs

    models = {"transformers": load_model(checkpoint), "plain": load_model(checkpoint, plain_torch=True)}
    for name, model in models.items():
        model.train()
        encode = zs.hf_pooled_encoder(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        for batch in image_batches(3, batch=8, seed=5):
            loss = encode(batch["pixel_values"]).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.5)
            optimizer.step()
        model.save_pretrained(tmp_path / name)
    assert (tmp_path / "plain" / "config.json").read_bytes() == (tmp_path / "transformers" / "config.json").read_bytes()
    assert safetensors_parts(tmp_path / "plain") == safetensors_parts(tmp_path / "transformers")
    assert not torch.equal(models["plain"].encoder.layers[0].mlp.fc1.weight, load_model(checkpoint).encoder.layers[0].mlp.fc1.weight)
