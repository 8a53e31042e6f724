"""compressed-tensors export of CLIP vision towers, T5 and BERT: transformers loads each with
``from_pretrained`` and its outputs equal our dequantized model's; what the format cannot hold is refused."""

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from epmq.checkpoint import load_model, save_quantized  # noqa: E402
from epmq.cli import main  # noqa: E402
from epmq.config import method_params  # noqa: E402
from epmq.engine import CalibrationTask, quantize_model  # noqa: E402
from epmq.catalog import get_method  # noqa: E402
from epmq.testing.models import image_batches, padded_text_batches, tiny_bert, tiny_clip_vision, tiny_t5  # noqa: E402

FAMILIES = {
    "clip": (tiny_clip_vision, lambda: image_batches(2), "CLIPVisionModel", "last_hidden_state"),
    "t5": (tiny_t5, lambda: padded_text_batches(2, targets=True), "T5ForConditionalGeneration", "logits"),
    "bert": (tiny_bert, lambda: padded_text_batches(2), "BertModel", "last_hidden_state"),
}


def quantized_checkpoint(family, directory, method="gptq", **grid):
    build, batches, _, _ = FAMILIES[family]
    model = build()
    params = method_params("quantize", **{"bits": 4, "group_size": 32, **grid})
    result = quantize_model(model, get_method(method, params), [CalibrationTask("t", batches())])
    replacements = {name: layer.replacement for name, layer in result.replacements.items()}
    return save_quantized(directory, model, replacements, {"method": method})


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("grid", [{"sym": False}, {"sym": True, "bits": 3}, {"bits": 8, "group_size": -1}])
def test_transformers_loads_the_export_with_our_outputs(family, grid, tmp_path):
    import transformers

    _, batches, class_name, output = FAMILIES[family]
    quantized = quantized_checkpoint(family, tmp_path / "q", **grid)
    assert main(["export", "--model", str(quantized), "--out", str(tmp_path / "ct")]) == 0
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == grid.get("bits", 4)
    theirs = getattr(transformers, class_name).from_pretrained(tmp_path / "ct").eval()
    ours = load_model(quantized)
    batch = batches()[1]
    with torch.no_grad():
        expected, got = getattr(ours(**batch), output), getattr(theirs(**batch), output)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    # the file holds integer codes, not a dense copy of our weights
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as stored:
        scales = [key for key in stored.keys() if key.endswith(".weight_scale")]
        assert scales
        codes = scales[0].removesuffix("_scale") + ("" if family == "t5" else "_packed")
        assert stored.get_tensor(codes).dtype == (torch.int8 if family == "t5" else torch.int32)


def test_codes_wider_than_8_bits_are_refused(tmp_path, capsys):
    quantized = quantized_checkpoint("bert", tmp_path / "q")
    info_file = quantized / "quantization.json"
    info = json.loads(info_file.read_text())
    for spec in info["layers"].values():
        spec["bits"] = 12
    info_file.write_text(json.dumps(info))
    assert main(["export", "--model", str(quantized), "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    # the loader's checkpoint validation refuses it first (quantize never writes more than 8 bits)
    assert "'bits' must be an integer in 1..8" in err and "found 12" in err
    assert not (tmp_path / "ct").exists()


def test_unrounded_layers_are_refused(tmp_path, capsys):
    from epmq.testing.models import save_experts

    model = tiny_clip_vision()
    experts = save_experts(model, tmp_path, 2)
    from epmq.io import LazyCheckpoint

    tasks = [CalibrationTask(f"t{i}", image_batches(1, seed=i), LazyCheckpoint(e)) for i, e in enumerate(experts)]
    result = quantize_model(model, get_method("epmq_fp", method_params("quantize", bits=4, group_size=32)), tasks)
    out = save_quantized(tmp_path / "q", model, {n: layer.replacement for n, layer in result.replacements.items()}, {})
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "ct")]) == 2
    assert "unrounded" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()
