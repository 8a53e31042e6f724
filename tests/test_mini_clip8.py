"""The mini-clip8 suite on its smoke config: splits, calibration, heads, CLI outputs, evaluator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from epmq.suites.mini_clip8 import MiniClip8, heads
from epmq.suites.mini_clip8 import data as clip_data
from epmq.suites.base import packaged_config
from evals import clip_zeroshot as zs

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="Debian package dataset-fashion-mnist not installed"
)
SMOKE = packaged_config("mini-clip8-smoke")


@pytest.fixture(scope="module")
def cfg():
    return MiniClip8.load_config(SMOKE)


@pytest.fixture(scope="module")
def built(tmp_path_factory, cfg):
    """Run every CLI subcommand once on the smoke config (in-process: imports are shared)."""
    from epmq.cli import main

    root = tmp_path_factory.mktemp("mini-clip8-smoke")
    common = ["--suite-config", str(SMOKE), "--threads", "1"]
    assert main(["suite", "data", *common, "--out", str(root / "data")]) == 0
    data = ["--data", str(root / "data")]
    assert main(["suite", "pretrain", *common, *data, "--out", str(root / "pretrained")]) == 0
    assert main(["suite", "finetune", *common, *data, "--pretrained", str(root / "pretrained"),
                 "--task", "digits-parity", "--out", str(root / "expert")]) == 0
    assert main(["suite", "calib", *common, *data, "--tasks", "fashion-negative", "--samples", "16", "--seed", "3",
                 "--out", str(root / "calib")]) == 0
    tasks = list(cfg["tasks"])
    assert main(["evaluate", *common, *data, "--model", str(root / "expert"), "--suite-dir", str(root),
                 "--tasks", *tasks, "--out-dir", str(root / "eval")]) == 0
    return root


@pytest.fixture(scope="module")
def sources(built, cfg):
    return clip_data.Sources(cfg, built / "data")


def test_default_config_is_complete():
    full = MiniClip8.load_config(packaged_config("mini-clip8"))
    assert len(full["tasks"]) == 8
    model = full["model"]
    assert model["hidden_size"] % 128 == 0 and model["intermediate_size"] % 128 == 0  # group size 128 divides d_in
    for task in full["tasks"].values():
        assert task["classnames"] and all("{}" in t for t in task["templates"])


def test_source_splits_are_disjoint(cfg, sources):
    for source in cfg["data"]["splits"]:
        splits = clip_data.source_splits(cfg, source, sources)
        by_pool: dict[str, list[set]] = {}
        for split, idx in splits.items():
            assert len(np.unique(idx)) == len(idx)
            by_pool.setdefault(clip_data.pool_name(source, split), []).append(set(idx.tolist()))
        for sets in by_pool.values():
            assert sum(map(len, sets)) == len(set().union(*sets)), f"{source}: overlapping splits"
    # the same seed gives the same splits
    again = clip_data.source_splits(cfg, "digits", sources)
    assert all(np.array_equal(a, b) for a, b in zip(again.values(), clip_data.source_splits(cfg, "digits", sources).values()))


def test_task_splits_disjoint_and_labels_in_range(cfg, sources):
    for task, spec in cfg["tasks"].items():
        parts = {s: clip_data.task_split(cfg, task, s, sources) for s in ("finetune", "calib", "test")}
        pretrain = set(clip_data.source_splits(cfg, spec["source"], sources)["pretrain"].tolist())
        for name, part in parts.items():
            assert part.labels.min() >= 0 and part.labels.max() < len(spec["classnames"])
            assert part.images.shape[1:] == (1, cfg["data"]["image_size"], cfg["data"]["image_size"])
            assert 0.0 <= part.images.min() and part.images.max() <= 1.0
            if part.pool == clip_data.pool_name(spec["source"], "pretrain"):
                assert not pretrain & set(part.pool_indices.tolist()), f"{task}/{name} overlaps pretraining"
        train_side = [p for p in ("finetune", "calib") if parts[p].pool == parts["test"].pool]
        for name in train_side:
            assert not set(parts[name].pool_indices.tolist()) & set(parts["test"].pool_indices.tolist())
        assert not set(parts["finetune"].pool_indices.tolist()) & set(parts["calib"].pool_indices.tolist())
        if spec["n_test"] is not None:
            assert len(parts["test"]) == spec["n_test"]


def test_calibration_uses_training_images_and_is_reproducible(cfg, built):
    from safetensors.torch import load_file

    data = built / "data"
    saved = load_file(str(built / "calib" / "fashion-negative.safetensors"))
    assert saved["pixel_values"].dtype == torch.float32 and saved["pixel_values"].shape == (16, 1, 28, 28)
    assert saved["sample_indices"].dtype == torch.int64 and saved["sample_indices"].shape == (16,)
    pixels, idx = clip_data.calibration_set(cfg, "fashion-negative", 16, 3, data)
    assert torch.equal(idx, saved["sample_indices"]) and torch.equal(pixels, saved["pixel_values"])
    other, other_idx = clip_data.calibration_set(cfg, "fashion-negative", 16, 4, data)
    assert not torch.equal(idx, other_idx)
    sources = clip_data.Sources(cfg, data)
    calib = clip_data.task_split(cfg, "fashion-negative", "calib", sources)
    assert calib.pool == "fashion_train"  # Fashion-MNIST's training set, never its test set
    finetune = clip_data.task_split(cfg, "fashion-negative", "finetune", sources)
    assert not set(calib.pool_indices[idx.numpy()].tolist()) & set(finetune.pool_indices.tolist())
    assert torch.allclose(pixels, clip_data.to_pixel_values(calib.images[idx], cfg))
    with pytest.raises(ValueError):
        clip_data.calibration_set(cfg, "fashion-negative", len(calib) + 1, 0, data)


def test_zeroshot_head_follows_template_protocol():
    generator = torch.Generator().manual_seed(0)
    table: dict[str, torch.Tensor] = {}

    def encode(texts):  # any text encoder: fixed random vectors of varying norm
        return torch.stack([table.setdefault(t, torch.randn(8, generator=generator) * (1 + len(t))) for t in texts])

    classes, templates = ["cat", "dog", "owl"], ["a photo of a {}.", "a drawing of a {}.", "{}"]
    head = zs.build_zeroshot_head(encode, classes, templates)
    assert head.shape == (3, 8)
    assert torch.allclose(head.norm(dim=-1), torch.ones(3), atol=1e-6)
    for c, name in enumerate(classes):
        per_template = torch.stack([torch.nn.functional.normalize(table[t.format(name)], dim=0) for t in templates])
        expected = torch.nn.functional.normalize(per_template.mean(0), dim=0)
        assert torch.allclose(head[c], expected, atol=1e-6)
        # not the normalised mean of the raw embeddings: each template is normalised first
        raw = torch.nn.functional.normalize(torch.stack([table[t.format(name)] for t in templates]).mean(0), dim=0)
        assert not torch.allclose(head[c], raw, atol=1e-4)


def test_pretrain_writes_documented_files(built, cfg):
    from safetensors.torch import load_file

    pre = built / "pretrained"
    for name in ("config.json", "model.safetensors", "head.safetensors", "build.json"):
        assert (pre / name).exists(), name
    head = load_file(str(pre / "head.safetensors"))
    assert head["visual_projection.weight"].shape == (cfg["projection_dim"], cfg["model"]["hidden_size"])
    assert head["logit_scale"].shape == ()
    for task, spec in cfg["tasks"].items():
        h = head[f"heads.{task}"]
        assert h.shape == (len(spec["classnames"]), cfg["projection_dim"])
        assert torch.allclose(h.norm(dim=-1), torch.ones(len(h)), atol=1e-5)
    build = json.loads((pre / "build.json").read_text())
    assert set(build["zero_shot"]) == set(cfg["tasks"]) and "provenance" in build


def test_expert_has_same_keys_as_pretrained(built):
    from safetensors.torch import load_file

    pre = load_file(str(built / "pretrained" / "model.safetensors"))
    exp = load_file(str(built / "expert" / "model.safetensors"))
    assert pre.keys() == exp.keys()
    assert all(pre[k].shape == exp[k].shape and pre[k].dtype == exp[k].dtype for k in pre)
    assert any(not torch.equal(pre[k], exp[k]) for k in pre)
    build = json.loads((built / "expert" / "build.json").read_text())
    assert build["task"] == "digits-parity" and math.isfinite(build["accuracy"]["accuracy"])


def test_plain_torch_tower_matches_transformers(built):
    from transformers import CLIPVisionModel

    from epmq.suites.mini_clip8.evaluation import clip_tower

    model = CLIPVisionModel.from_pretrained(built / "expert").eval()
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(pixel_values=x).pooler_output
        assert torch.equal(clip_tower(built / "expert")(x), expected)
        assert torch.equal(zs.hf_pooled_encoder(model)(x), expected)


def test_evaluator_writes_per_task_metrics(built, cfg):
    for task in cfg["tasks"]:
        record = json.loads((built / "eval" / f"{task}.json").read_text())
        assert record["task"] == task and record["n"] == cfg["tasks"][task]["n_test"]
        assert 0.0 <= record["accuracy"] <= 100.0 and math.isfinite(record["stderr"])
        p = record["accuracy"] / 100
        assert record["stderr"] == pytest.approx(100 * math.sqrt(p * (1 - p) / record["n"]))
        assert record["model"].endswith("expert") and "provenance" in record


def test_tower_sensitivity_bench(built, cfg):
    """bench/tower_sensitivity.py: fp accuracy = the evaluator's average; each bit width rounds the
    original weights (8 bits after 2 is still nearly exact)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tower_sensitivity", Path(__file__).parents[1] / "bench" / "tower_sensitivity.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    head = heads.load_head(built / "pretrained" / heads.HEAD_FILE)
    report = bench.measure(built / "expert", cfg, head, clip_data.Sources(cfg, built / "data"), [2, 8], 128)
    evaluated = [json.loads((built / "eval" / f"{task}.json").read_text())["accuracy"] for task in cfg["tasks"]]
    assert report["fp"]["accuracy"] == pytest.approx(np.mean(evaluated), abs=0.01)
    assert 0 < report["rtn8"]["weight_rel_error"] < 0.02 < report["rtn2"]["weight_rel_error"] < 1
    assert abs(report["rtn8"]["change"]) <= abs(report["rtn2"]["change"]) + 1.0
    assert report["outlier_ratio"]["max"] >= report["outlier_ratio"]["median"] >= 1


def test_digits_are_read_as_sklearn_loads_them():
    from sklearn.datasets import load_digits

    images, labels = clip_data.sklearn_digits()
    reference = load_digits()
    assert images.dtype == reference.images.dtype and np.array_equal(images, reference.images)
    assert labels.dtype == reference.target.dtype and np.array_equal(labels, reference.target)
