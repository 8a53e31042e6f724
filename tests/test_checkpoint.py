import json

import pytest
import torch
from safetensors.torch import save_file

from epmq.checkpoint import load_model, save_quantized
from epmq.cli import main
from epmq.config import method_params
from epmq.engine import CalibrationTask, quantize_model
from epmq.io import LazyCheckpoint
from epmq.catalog import get_method
from epmq.testing.models import (
    image_batches,
    save_experts,
    text_batches,
    tiny_clip_vision,
    tiny_llama,
)


@pytest.mark.parametrize("build,batches", [(tiny_llama, text_batches), (tiny_clip_vision, image_batches)], ids=["llama", "clip"])
@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (3, 48, True), (2, -1, False)])
def test_save_load_round_trip_is_exact(build, batches, bits, group_size, act_order, tmp_path):
    model = build()
    params = method_params("quantize", bits=bits, group_size=group_size, act_order=act_order)
    result = quantize_model(model, get_method("gptq", params), [CalibrationTask("t", batches(2))])
    out = save_quantized(tmp_path / "q", model, {n: layer.replacement for n, layer in result.replacements.items()}, {"method": "gptq"})
    stored = LazyCheckpoint(out)
    some_layer = next(iter(result.replacements))
    assert f"{some_layer}.qweight" in stored and f"{some_layer}.weight" not in stored
    assert stored.get(f"{some_layer}.qweight").dtype == torch.int32
    loaded = load_model(out)
    assert type(loaded) is type(model)
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    info = json.loads((out / "quantization.json").read_text())
    assert info["layers"][some_layer] == {"bits": bits, "group_size": group_size, "sym": False}
    assert info["provenance"]["torch"] == torch.__version__


def test_unrounded_rows_keep_plain_weights(tmp_path):
    model = tiny_clip_vision()
    experts = [LazyCheckpoint(p) for p in save_experts(model, tmp_path, 2)]
    tasks = [CalibrationTask(f"t{i}", image_batches(1, seed=i), e) for i, e in enumerate(experts)]
    result = quantize_model(model, get_method("epmq_fp", method_params("quantize")), tasks)
    out = save_quantized(tmp_path / "q", model, {n: layer.replacement for n, layer in result.replacements.items()}, {})
    loaded = load_model(out)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])


def test_cli_quantize_writes_provenance_and_fails_cleanly(tmp_path, capsys):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "merged")
    experts = save_experts(model, tmp_path, 2)
    calib = []
    for i in range(2):
        calib.append(tmp_path / f"task{i}.safetensors")
        save_file({"input_ids": text_batches(1, batch=6, seed=i)[0]["input_ids"], "sample_indices": torch.arange(6) + 10 * i}, str(calib[-1]))
    argv = ["quantize", "--model", str(tmp_path / "merged"), "--method", "epmq", "--bits", "3", "--group-size", "32",
            "--alpha", "0.1", "--batch-size", "4", "--out", str(tmp_path / "q"), "--experts", *map(str, experts),
            "--calib", *map(str, calib)]
    assert main(argv) == 0
    info = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert info["method"] == "epmq" and info["params"]["alpha"] == 0.1 and info["params"]["bits"] == 3
    assert [t["name"] for t in info["tasks"]] == ["task0", "task1"]
    assert info["tasks"][1]["sample_indices"] == list(range(10, 16))
    assert info["tasks"][0]["samples"] == 6
    assert len(info["layer_log"]) == 14 and all("objective_after" in r for r in info["layer_log"])
    assert torch.isfinite(load_model(tmp_path / "q")(text_batches(1)[0]["input_ids"]).logits).all()

    one_file_for_two_experts = ["quantize", "--model", str(tmp_path / "merged"), "--method", "epmq", "--out",
                                str(tmp_path / "q2"), "--experts", *map(str, experts), "--calib", str(calib[0])]
    assert main(one_file_for_two_experts) == 2
    assert "one per task" in capsys.readouterr().err
    assert not (tmp_path / "q2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q2")]
