"""``python -m epmq diagnose``: the two deviations per layer, totals, and the checks that break quantizers."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from epmq.checkpoint import load_model
from epmq.cli import main
from epmq.diagnose import short_names
from tests.decoder_models import save_calibration, save_family, tiny_decoder


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diagnose")
    base, experts = save_family(tiny_decoder("llama"), tmp, 2, scale=0.05)
    calib = save_calibration(tmp, 2)
    assert main(["merge", "--method", "task_arithmetic", "--pretrained", str(base), "--experts", *map(str, experts),
                 "--param", "scaling=0.5", "--out", str(tmp / "merged")]) == 0
    for method in ("rtn", "epmq"):
        args = ["quantize", "--model", str(tmp / "merged"), "--method", method, "--bits", "3", "--group-size", "32",
                "--calib", *map(str, calib), "--out", str(tmp / method)]
        assert main(args + (["--experts", *map(str, experts)] if method == "epmq" else [])) == 0
    return tmp, experts, calib


def inputs_of(model, name, calib_file):
    batch = load_file(str(calib_file))
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return captured[0][batch["attention_mask"].bool()].double()  # padding tokens are not counted


@pytest.mark.slow
def test_deviations_per_layer_equal_the_definition(merged, tmp_path, capsys):
    tmp, experts, calib = merged
    out = tmp_path / "report"
    assert main(["diagnose", "--model", str(tmp / "merged"), "--experts", *map(str, experts), "--calib", *map(str, calib),
                 "--quantized", str(tmp / "rtn"), str(tmp / "epmq"), "--out", str(out)]) == 0
    report = json.loads((out / "diagnose.json").read_text())
    assert (out / "diagnose.png").stat().st_size > 0
    layers = [layer["layer"] for layer in report["layers"]]
    assert layers[:4] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] and len(layers) == 14
    assert report["checks"] == []
    # eq. 5 and eq. 3 computed directly from the captured inputs, for one layer
    name = "model.layers.1.mlp.down_proj"
    model, rtn = load_model(tmp / "merged"), load_model(tmp / "rtn")
    w_m, q = (m.get_submodule(name).weight.detach().double() for m in (model, rtn))
    merge = quant = total = energy = 0.0
    for expert, calib_file in zip(experts, calib):
        x = inputs_of(model, name, calib_file)
        w_i = load_file(str(expert / "model.safetensors"))[f"{name}.weight"].double()
        merge += float(((x @ w_m.T - x @ w_i.T) ** 2).sum())
        quant += float(((x @ q.T - x @ w_m.T) ** 2).sum())
        total += float(((x @ q.T - x @ w_i.T) ** 2).sum())
        energy += float(((x @ w_i.T) ** 2).sum())
    layer = report["layers"][layers.index(name)]
    assert layer["merging_relative"] == pytest.approx(merge / energy, rel=1e-6)
    assert layer["quantization_relative"][0] == pytest.approx(quant / energy, rel=1e-6)
    assert layer["total_relative"][0] == pytest.approx(total / energy, rel=1e-6)
    assert 0 < merge / energy < 1 and 0 < quant / energy < 1
    totals = report["totals"]
    assert [entry["model"] for entry in totals["quantized"]] == [str(tmp / "rtn"), str(tmp / "epmq")]
    assert short_names(["r/quant/ta/rtn/w4g32", "r/quant/ta/gptq/w4g32"]) == ["rtn/w4g32", "gptq/w4g32"]
    printed = capsys.readouterr().out
    assert "total merging deviation (relative)" in printed and name in printed


def test_checks_name_each_tensor_and_nan_stops_the_run(merged, tmp_path, capsys):
    tmp, experts, calib = merged
    state = load_file(str(tmp / "merged" / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"][:, 5] = 0  # a dead input column
    state["model.layers.1.self_attn.o_proj.weight"].zero_()
    state["model.layers.1.post_attention_layernorm.weight"][7] = 0  # gate/up never see channel 7
    state["model.norm.weight"] = state["model.norm.weight"].half()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tmp / "merged" / "config.json").read_text())
    save_file(state, str(broken / "model.safetensors"))
    args = ["diagnose", "--model", str(broken), "--experts", *map(str, experts), "--calib", *map(str, calib)]
    assert main([*args, "--out", str(tmp_path / "r1")]) == 0
    findings = {(f["tensor"], f["problem"]) for f in json.loads((tmp_path / "r1" / "diagnose.json").read_text())["checks"]}
    assert findings == {
        ("model.layers.0.mlp.up_proj.weight", "dead_input_channels"),
        ("model.layers.1.self_attn.o_proj.weight", "all_zero"),
        ("model.norm.weight", "mixed_dtypes"),
        ("model.layers.1.mlp.gate_proj.weight", "dead_input_channels"),
        ("model.layers.1.mlp.up_proj.weight", "dead_input_channels"),
    }
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(state, str(broken / "model.safetensors"))
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "r2")]) == 2
    assert short_names(["r/quant/ta/rtn/w4g32", "r/quant/ta/gptq/w4g32"]) == ["rtn/w4g32", "gptq/w4g32"]
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight: nan_inf: 1 of" in printed
    assert "layers" not in json.loads((tmp_path / "r2" / "diagnose.json").read_text())
    assert not (tmp_path / "r2" / "diagnose.png").exists()
