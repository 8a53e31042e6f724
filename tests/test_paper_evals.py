"""The CLIP zero-shot path of the paper-scale suites, end to end on a small CLIPModel built from config.

fetch (local path) -> split_clip -> merge (experts in transformers 4's ``vision_model.`` convention)
-> calibration files from a local image dataset -> quantize (rtn, gptq, awq, epmq) -> zero-shot
evaluation with the real class names and templates of two tasks. The zero-shot logits of the
pretrained tower are checked against ``CLIPModel``'s own ``logits_per_image``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from epmq.cli import main as epmq_main
from epmq.hub.layout import split_clip
from epmq.hub.store import fetch
from evals import clip_eval
from evals.clip_tasks import TASKS, get_task
from epmq.suites.common import save_calibration
from evals.datasets import (
    calibration_indices,
    clip_calibration,
    clip_image_processor,
    load_clip_task,
)
from epmq.testing.paper_models import (
    clip_tokenizer,
    perturbed,
    save_with_prefix,
    tiny_clip_model,
)

TASK_NAMES = ("eurosat", "mnist")  # 10 classes x 3 templates; 10 classes x 1 template
METHODS = ("rtn", "gptq", "awq", "epmq")



def _image_dataset(task: str, n: int, seed: int):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = len(get_task(task).classnames)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": [int(i % classes) for i in range(n)]}, features=features)


@pytest.fixture(scope="module")
def clip_suite(tmp_path_factory):
    """A 'hub' CLIPModel folder, two experts saved like FusionBench's, local datasets."""
    import datasets

    root = tmp_path_factory.mktemp("clip")
    texts = [t.format(c) for task in TASK_NAMES for c in get_task(task).classnames for t in get_task(task).templates]
    tokenizer = clip_tokenizer(texts)
    model = tiny_clip_model(tokenizer)
    hub = root / "hub" / "clip"
    model.save_pretrained(hub)
    tokenizer.save_pretrained(hub)
    clip_image_processor(32).save_pretrained(hub)
    experts = []
    for index, task in enumerate(TASK_NAMES):
        expert = perturbed(model.vision_model, seed=10 + index)
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel(model.config.vision_config)  # transformers 5: the tower is the model itself
        tower.load_state_dict(expert.state_dict())
        experts.append(save_with_prefix(tower, root / "hub" / f"expert-{task}", "vision_model."))
    data = {}
    for index, task in enumerate(TASK_NAMES):
        splits = {get_task(task).train_split: _image_dataset(task, 24, seed=index),
                  get_task(task).test_split: _image_dataset(task, 20, seed=100 + index)}
        data[task] = root / "data" / task
        datasets.DatasetDict(splits).save_to_disk(str(data[task]))
    return {"root": root, "hub": hub, "experts": experts, "data": data, "model": model, "tokenizer": tokenizer}


def test_clip_tasks_data_complete():
    assert len(TASKS) == 20
    for task in TASKS.values():
        assert task.classnames and task.templates
        assert all(t.count("{}") == 1 for t in task.templates), task.name
    assert len(TASKS["sun397"].classnames) == 397 and len(TASKS["stanford-cars"].classnames) == 196
    assert TASKS["flowers102"].expert_id("b32") == "tanganke/clip-vit-base-patch32_oxford_flowers102"
    assert TASKS["food101"].split("test") == "validation"


def test_calibration_indices_seeded():
    a, b = calibration_indices(1000, 256, 0), calibration_indices(1000, 256, 0)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 256 and a.dtype == np.int64
    assert not np.array_equal(a, calibration_indices(1000, 256, 1))
    with pytest.raises(ValueError):
        calibration_indices(10, 11, 0)


@pytest.mark.slow
def test_clip_pipeline_end_to_end(clip_suite, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    root = tmp_path
    pretrained = fetch(clip_suite["hub"], "main", root / "resources" / "clip")
    experts = [fetch(path, "main", root / "resources" / path.name) for path in clip_suite["experts"]]
    vision, zeroshot = split_clip(pretrained, root / "prepared", like=experts[0])
    assert all(key.startswith("vision_model.") for key in load_file(str(vision / "model.safetensors")))

    merged = root / "merged"
    assert epmq_main(["merge", "--method", "task_arithmetic", "--pretrained", str(vision),
                      "--experts", *map(str, experts), "--out", str(merged)]) == 0

    calib = []
    for task in TASK_NAMES:
        file = root / "calib" / f"{task}.safetensors"
        save_calibration(clip_calibration(task, zeroshot, samples=8, seed=0, local_path=clip_suite["data"][task]),
                         file, {"suite": "tiny-clip"}, task, samples=8, seed=0)
        tensors = load_file(str(file))
        assert tensors["pixel_values"].shape == (8, 3, 32, 32)
        assert tensors["sample_indices"].tolist() == calibration_indices(24, 8, 0).tolist()
        with safe_open(str(file), framework="pt") as handle:
            assert handle.metadata()["seed"] == "0" and handle.metadata()["task"] == task
        calib.append(file)

    heads_file = root / "heads.safetensors"
    models = {"merged": merged}
    for method in METHODS:
        out = root / "quantized" / method
        args = ["quantize", "--model", str(merged), "--method", method, "--out", str(out), "--group-size", "32",
                "--calib", *map(str, calib), "--experts", *map(str, experts), "--batch-size", "4"]
        assert epmq_main(args) == 0, method
        models[method] = out
    for name, model_dir in models.items():
        results = clip_eval.evaluate_clip(model_dir, TASK_NAMES, root / "metrics" / name, heads_file=heads_file,
                                          zeroshot_dir=zeroshot, data=clip_suite["data"], batch_size=8)
        for task in TASK_NAMES:
            record = json.loads((root / "metrics" / name / f"{task}.json").read_text())
            assert record["n"] == 20 and 0.0 <= record["accuracy"] <= 100.0 and record["metric"] == "top1"
            assert record["task"] == task and "provenance" in record and record["model"] == str(model_dir)
            assert record["accuracy"] == results[task]["accuracy"]
    quantization = json.loads((models["epmq"] / "quantization.json").read_text())
    assert [t["name"] for t in quantization["tasks"]] == list(TASK_NAMES)


def test_zeroshot_logits_match_clipmodel(clip_suite, tmp_path):
    """Our heads + split tower reproduce CLIPModel.logits_per_image (one-template task)."""
    model, tokenizer = clip_suite["model"], clip_suite["tokenizer"]
    vision, zeroshot = split_clip(clip_suite["hub"], tmp_path / "prepared")
    heads = clip_eval.build_heads(zeroshot, ["mnist"])
    dataset = load_clip_task("mnist", "test", clip_suite["data"]["mnist"])
    processor = clip_image_processor(zeroshot)
    from evals import clip_zeroshot as zs
    from evals.datasets import pixel_values

    pixels = pixel_values(processor, dataset[:6]["image"])
    encode = clip_eval.load_vision_encoder(vision)
    ours = zs.zeroshot_logits(zs.image_features(encode(pixels), heads["visual_projection.weight"]),
                              heads["heads.mnist"], heads["logit_scale"])
    texts = [get_task("mnist").templates[0].format(c) for c in get_task("mnist").classnames]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixels)
    torch.testing.assert_close(ours, reference.logits_per_image, atol=1e-4, rtol=1e-4)


def test_clip_columns_standardised(tmp_path):
    """fer2013 comes as jpg/cls (clip-benchmark/wds_fer2013): the loader renames them, as FusionBench does."""
    import datasets
    from PIL import Image

    image = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    features = datasets.Features({"jpg": datasets.Image(), "cls": datasets.Value("int64"), "__key__": datasets.Value("string")})
    split = datasets.Dataset.from_dict({"jpg": [image] * 3, "cls": [0, 6, 2], "__key__": ["a", "b", "c"]}, features=features)
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "fer"))
    loaded = load_clip_task("fer2013", "test", tmp_path / "fer")
    assert {"image", "label"} <= set(loaded.column_names) and loaded["label"] == [0, 6, 2]
    bools = datasets.Dataset.from_dict({"image": [image] * 2, "label": [True, False]},
                                       features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("bool")}))
    bools.save_to_disk(str(tmp_path / "pcam-test"))  # a single saved split is taken as that split
    assert [int(x) for x in load_clip_task("pcam", "test", tmp_path / "pcam-test")["label"]] == [1, 0]
    with pytest.raises(ValueError, match="no label column"):
        no_label = datasets.Dataset.from_dict({"image": [image]}, features=datasets.Features({"image": datasets.Image()}))
        no_label.save_to_disk(str(tmp_path / "nolabel"))
        load_clip_task("dtd", "test", tmp_path / "nolabel")


def test_clip_eval_cli(clip_suite, tmp_path):
    """`python -m evals.clip_eval`: heads-only job, then an evaluation reading them (run in-process)."""
    import argparse

    _, zeroshot = split_clip(clip_suite["hub"], tmp_path / "prepared")
    vision = zeroshot.parent / "vision"

    def cli(*words):
        parser = argparse.ArgumentParser()
        clip_eval.add_arguments(parser)
        return clip_eval.run(parser.parse_args(list(words)))

    heads = tmp_path / "heads.safetensors"
    assert cli("--tasks", *TASK_NAMES, "--zeroshot", str(zeroshot), "--heads", str(heads), "--device", "cpu") == 0
    data = [f"{task}={clip_suite['data'][task]}" for task in TASK_NAMES]
    assert cli("--model", str(vision), "--tasks", "mnist", "--heads", str(heads), "--processor", str(zeroshot),
               "--out-dir", str(tmp_path / "m"), "--data", *data, "--device", "cpu") == 0
    assert json.loads((tmp_path / "m" / "mnist.json").read_text())["n"] == 20
