"""Zero-shot evaluation of the image suites, CLIP's protocol (``evals.clip_zeroshot``, paper §5.1).

The tower's pooled output, projected by the pretrained visual projection and normalised, against
the zero-shot heads built from the frozen MiniLM text encoder (``pretrained/head.safetensors``);
top-1 accuracy with its binomial standard error.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from epmq.suites.mini_clip8.data import PixelValues, Sources, task_split, to_pixel_values
from evals import clip_zeroshot as zs


def evaluate_tasks(encoder: zs.ImageEncoder, head: dict, cfg: dict, tasks, sources: Sources,
                   pixel_values: PixelValues = to_pixel_values) -> dict[str, dict]:
    """Zero-shot top-1 accuracy and standard error (%) of ``encoder`` on each task's test split.

    Tasks whose test images are identical (mini-clip8's fashion and fashion-coarse, digits and
    digits-parity: one split, another label map) share one forward pass: same batches, same
    embeddings, so the predictions are exactly those of separate passes."""
    results = {}
    embedded: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # (pixel_values, their per-batch embeddings)
    for task in tasks:
        split = task_split(cfg, task, "test", sources)
        inputs = pixel_values(split.images, cfg)
        embeddings = next((e for seen, e in embedded if seen.shape == inputs.shape and torch.equal(seen, inputs)), None)
        if embeddings is None:
            embeddings = zs.image_embeddings(encoder, inputs, head["visual_projection.weight"], cfg["eval"]["batch_size"])
            embedded.append((inputs, embeddings))
        preds = zs.classify(embeddings, head[f"heads.{task}"], head["logit_scale"])
        acc, se, n = zs.accuracy(preds, split.labels)
        results[task] = {"accuracy": acc, "stderr": se, "n": n}
    return results


def rounded(results: dict[str, dict], digits: int | None) -> dict[str, dict]:
    """``evaluate_tasks``' results with accuracy and standard error rounded to ``digits`` (None: as they are)."""
    if digits is None:
        return results
    return {task: {**r, "accuracy": round(r["accuracy"], digits), "stderr": round(r["stderr"], digits)}
            for task, r in results.items()}


def average_accuracy(results: dict[str, dict]) -> dict:
    """Mean accuracy over the tasks of ``evaluate_tasks``' results, with its standard error."""
    accs = [r["accuracy"] for r in results.values()]
    return {"accuracy": round(float(np.mean(accs)), 3),
            "stderr": round(zs.average_stderr([r["stderr"] for r in results.values()]), 3)}


def clip_tower(model_dir: str | os.PathLike) -> zs.ImageEncoder:
    """pixel_values -> pooled output of the CLIP tower in ``model_dir`` (any checkpoint this project writes).

    The plain-torch ``CLIPVisionModel`` of ``epmq.models`` (no transformers import: start-up
    dominates the evaluation of mini-clip8), quantized checkpoints dequantized by ``load_model``.
    """
    from epmq.checkpoint import load_model

    return zs.hf_pooled_encoder(load_model(model_dir, plain_torch=True).eval())
