"""mergekit YAML configs in: experts, base model and (where it is ours) the merge, for `merge` and `quantize`."""

import json

import pytest
import torch
import yaml

from epmq.cli import main
from epmq.io import LazyCheckpoint
from tests.decoder_models import save_calibration, save_family, tiny_decoder


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mergekit")
    base, experts = save_family(tiny_decoder("qwen2"), tmp, 2)
    return tmp, base, experts


def write_config(path, method, models, base=None, parameters=None, dtype="float32"):
    config = {"merge_method": method, "models": models, "dtype": dtype}
    if base is not None:
        config["base_model"] = str(base)
    if parameters:
        config["parameters"] = parameters
    path.write_text(yaml.safe_dump(config))
    return path


def weighted(experts, weight=None, density=None):
    return [{"model": str(e), "parameters": {k: v for k, v in (("weight", weight), ("density", density)) if v is not None}}
            for e in experts]


def tensors(folder):
    checkpoint = LazyCheckpoint(folder)
    return {key: checkpoint.get(key) for key in checkpoint.keys()}


def test_task_arithmetic_is_mergekits_formula(family, tmp_path):
    tmp, base, experts = family
    models = [{"model": str(base)}, *weighted(experts, 0.3)]  # mergekit lists the base among the models too
    config = write_config(tmp_path / "ta.yml", "task_arithmetic", models, base)
    assert main(["merge", "--mergekit-config", str(config), "--out", str(tmp_path / "m")]) == 0
    merged, pretrained = tensors(tmp_path / "m"), tensors(base)
    finetuned = [tensors(e) for e in experts]
    for key, value in merged.items():
        expected = pretrained[key] + sum(0.3 * (f[key] - pretrained[key]) for f in finetuned)
        assert torch.allclose(value, expected, atol=1e-6), key
    record = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert record["method"] == "task_arithmetic" and record["params"]["scaling"] == 0.3
    assert record["source"]["mergekit_config"]["merge_method"] == "task_arithmetic"


def test_normalized_task_arithmetic_and_equal_weight_linear(family, tmp_path):
    tmp, base, experts = family
    config = write_config(tmp_path / "n.yml", "task_arithmetic", weighted(experts, 2.0), base, {"normalize": True})
    assert main(["merge", "--mergekit-config", str(config), "--out", str(tmp_path / "n")]) == 0
    assert json.loads((tmp_path / "n" / "merge.json").read_text())["params"]["scaling"] == 0.5
    config = write_config(tmp_path / "l.yml", "linear", weighted(experts, 1.0))
    assert main(["merge", "--mergekit-config", str(config), "--out", str(tmp_path / "l")]) == 0
    finetuned = [tensors(e) for e in experts]
    for key, value in tensors(tmp_path / "l").items():
        assert torch.allclose(value, (finetuned[0][key] + finetuned[1][key]) / 2, atol=1e-6), key


@pytest.mark.parametrize("method, models, base, parameters, reason", [
    ("ties", "weighted", True, {}, "merge_method 'ties' is refused: mergekit trims each tensor"),
    ("slerp", "weighted", True, {"t": 0.5}, "merge_method 'slerp' is not implemented here"),
    ("dare_ties", "weighted", True, {}, "merge_method 'dare_ties' is not implemented here"),
    ("linear", "unequal", False, {}, "is a weighted average"),
    ("linear", "weighted", True, {}, "with a base_model: mergekit averages the base in"),
    ("task_arithmetic", "sparse", True, {}, "sparsifies"),
    ("task_arithmetic", "gradient", True, {}, "only scalars are supported"),
    ("task_arithmetic", "hub", True, {}, "is not a local model folder"),
    ("task_arithmetic", "weighted", True, {"lambda": 2.0}, "parameter 'lambda' has no counterpart"),
])
def test_unsupported_configs_are_refused_by_name(family, tmp_path, capsys, method, models, base, parameters, reason):
    tmp, base_dir, experts = family
    entries = {
        "weighted": weighted(experts, 0.5),
        "unequal": [*weighted(experts[:1], 0.7), *weighted(experts[1:], 0.3)],
        "sparse": weighted(experts, 0.5, density=0.5),
        "gradient": [{"model": str(e), "parameters": {"weight": [0.1, 0.9]}} for e in experts],
        "hub": [{"model": "Qwen/Qwen2.5-0.5B", "parameters": {"weight": 0.5}}],
    }[models]
    config = write_config(tmp_path / "bad.yml", method, entries, base_dir if base else None, parameters)
    for stage in (["merge"], ["quantize", "--method", "rtn"]):
        capsys.readouterr()
        assert main([*stage, "--mergekit-config", str(config), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert reason in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


def test_output_dtype_other_than_the_base_is_refused(family, tmp_path, capsys):
    tmp, base, experts = family
    config = write_config(tmp_path / "d.yml", "task_arithmetic", weighted(experts, 0.3), base, dtype="bfloat16")
    assert main(["merge", "--mergekit-config", str(config), "--out", str(tmp_path / "m")]) == 2
    assert "dtype bfloat16 differs from the base model's float32" in capsys.readouterr().err


def test_quantize_merges_from_the_config_and_uses_its_experts(family, tmp_path):
    tmp, base, experts = family
    calib = save_calibration(tmp_path, 2)
    config = write_config(tmp_path / "ta.yml", "task_arithmetic", weighted(experts, 0.4), base)
    common = ["--method", "epmq", "--bits", "4", "--group-size", "32", "--calib", *map(str, calib)]
    assert main(["quantize", "--mergekit-config", str(config), *common, "--out", str(tmp_path / "q-yaml")]) == 0
    # the same by hand: merge with our operator, quantize with the experts named on the command line
    assert main(["merge", "--method", "task_arithmetic", "--pretrained", str(base), "--experts", *map(str, experts),
                 "--param", "scaling=0.4", "--out", str(tmp_path / "m")]) == 0
    assert main(["quantize", "--model", str(tmp_path / "m"), "--experts", *map(str, experts), *common,
                 "--out", str(tmp_path / "q-hand")]) == 0
    by_yaml, by_hand = tensors(tmp_path / "q-yaml"), tensors(tmp_path / "q-hand")
    assert by_yaml.keys() == by_hand.keys()
    assert all(torch.equal(by_yaml[key], by_hand[key]) for key in by_hand)
    info = json.loads((tmp_path / "q-yaml" / "quantization.json").read_text())
    assert info["mergekit_config"]["merged_here"] and [t["expert"] for t in info["tasks"]] == list(map(str, experts))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q-yaml")]  # the scratch merge is gone
    # with --model (e.g. mergekit's own output) the config only supplies the experts, any method
    ties = write_config(tmp_path / "ties.yml", "ties", weighted(experts, 0.5, density=0.5), base)
    assert main(["quantize", "--mergekit-config", str(ties), "--model", str(tmp_path / "m"), *common,
                 "--out", str(tmp_path / "q-model")]) == 0
    assert all(torch.equal(value, by_hand[key]) for key, value in tensors(tmp_path / "q-model").items())
