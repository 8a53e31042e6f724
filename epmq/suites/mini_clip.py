"""The ``mini-clip`` builder: mini-clip8's build steps (``mini_clip8``) and its zero-shot evaluation.

Evaluation follows CLIP's protocol (``evals.clip_zeroshot``): the (merged, quantized) tower's
pooled output, projected by the pretrained visual projection and normalised, against the zero-shot
heads built from the frozen MiniLM text encoder (``pretrained/head.safetensors``); top-1 accuracy
with its binomial standard error. Plain HF towers run through the fast plain-torch
``ClipVisionTower``; quantized checkpoints are rebuilt by ``epmq.checkpoint.load_model``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from epmq.suites.mini_clip8 import (
    finetune,
    load_config,
    pretrain,
    set_threads,
    test_set,
    write_calibration,
    write_data_cache,
)
from epmq.suites.base import Suite, register_suite

__all__ = ["evaluate", "finetune", "load_config", "pretrain", "write_calibration", "write_data_cache"]


def image_encoder(model_dir: str | os.PathLike):
    """pixel_values -> pooled output of the tower in ``model_dir`` (any checkpoint this project writes).

    Runs the plain-torch ``ClipVisionTower`` (no transformers import: start-up dominates the
    evaluation of this suite), on the dequantized weights for quantized checkpoints.
    """
    from epmq.checkpoint import dequantized_state, quantization_info
    from epmq.io import LazyCheckpoint
    from evals import clip_zeroshot as zs

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    info = quantization_info(model_dir)
    checkpoint = LazyCheckpoint(model_dir)
    if info is None:
        state = {key: checkpoint.get(key) for key in checkpoint.keys()}
    else:
        state = dequantized_state(checkpoint, info)
    return zs.ClipVisionTower(config, state).eval()


def evaluate(cfg: dict, model_dir, tasks, data_dir, suite_dir) -> dict[str, dict]:
    from safetensors.torch import load_file

    from evals import clip_zeroshot as zs

    if cfg.get("threads") is None:
        set_threads(cfg)
    heads_file = Path(suite_dir) / "pretrained" / "head.safetensors"
    head = load_file(str(heads_file))
    encoder = image_encoder(model_dir)
    results = {}
    for task in tasks:
        pixel_values, labels = test_set(cfg, task, data_dir)
        predictions = zs.predict(encoder, pixel_values, head["visual_projection.weight"], head[f"heads.{task}"],
                                 head["logit_scale"], cfg["eval"]["batch_size"])
        accuracy, stderr, n = zs.accuracy(predictions, labels)
        results[task] = {"task": task, "suite": cfg["suite"], "metric": "top1", "accuracy": accuracy, "stderr": stderr,
                         "n": n, "model": str(model_dir), "heads": str(heads_file)}
    return results


@register_suite("mini-clip")
class MiniClip8(Suite):
    """mini-clip8 (and its smoke variant): a CLIP tower pretrained here, zero-shot heads from MiniLM."""

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
