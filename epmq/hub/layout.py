"""Tensor-name layouts of fetched checkpoints: splitting a CLIPModel, aligning names, non-persistent buffers.

``split_clip`` turns a full pretrained ``CLIPModel`` (``openai/clip-vit-base-patch32``) into the two
things the CLIP suites use (paper §5.1: zero-shot CLIP with FusionBench's experts):

- ``vision/``: the vision tower as a ``CLIPVisionModel`` checkpoint, the thing that is merged and
  quantized. Its tensor names follow the experts' convention. FusionBench's experts
  ``tanganke/clip-vit-*_<task>`` are ``CLIPVisionModel.save_pretrained`` folders written by
  transformers 4, whose keys carry the ``vision_model.`` prefix (``vision_model.encoder.layers.0...``);
  transformers 5 writes the same model without the prefix. The merge refuses experts whose tensor
  names differ from the pretrained model's (``epmq.merge.registry.check_consistent``), so the
  pretrained tower is written with the experts' prefix: detected from one expert (``like``) when
  given, else ``vision_model.`` (transformers 4's convention). transformers 5 loads both forms
  into ``CLIPVisionModel`` (checked by ``tests/test_hub.py``), and ``LazyCheckpoint.resolve``
  matches E-PMQ's expert tensors to module names in either form. ``align_checkpoint`` rewrites an
  expert into a reference's convention when a source mixes them.
- ``zeroshot/``: what the zero-shot heads need and what stays pretrained: the text tower, the
  text and visual projections and the logit scale (a ``CLIPModel`` checkpoint without the vision
  weights), with the tokenizer and image-processor files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from epmq.hub.store import FETCH_RECORD
from epmq.io import LazyCheckpoint, atomic_output_dir, atomic_write_json, provenance

VISION_PREFIX = "vision_model."  # transformers 4's CLIPVisionModel keys (FusionBench's experts)


def nonpersistent_buffers(model_dir: str | os.PathLike) -> set[str]:
    """State-dict names of the non-persistent buffers of the model class ``model_dir/config.json`` names.

    The model is built on the meta device (no memory). transformers registers CLIP's
    ``embeddings.position_ids`` with ``persistent=False`` since 4.31, so checkpoints written before
    carry it and later ones do not; such buffers are not part of a model's weights.
    """
    import torch
    import transformers

    if not (Path(model_dir) / "config.json").exists():
        return set()  # a bare weights folder: no class to ask, nothing is known to be non-persistent
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is None:
        return set()
    with torch.device("meta"):
        model = cls(config)
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() for name in module._non_persistent_buffers_set}


def is_nonpersistent(key: str, buffers: set[str]) -> bool:
    """Whether checkpoint key ``key`` is one of ``buffers`` (matching with or without leading prefixes)."""
    return any(key == name or key.endswith("." + name) or name.endswith("." + key) for name in buffers)



_TOKENIZER_AND_PROCESSOR = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                            "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
                            "processor_config.json")


def vision_key_prefix(checkpoint: str | os.PathLike) -> str:
    """``"vision_model."`` if a CLIP vision checkpoint's keys carry that prefix, else ``""``."""
    keys = LazyCheckpoint(checkpoint).keys()
    prefixed = sum(key.startswith(VISION_PREFIX) for key in keys)
    if prefixed and prefixed != len(keys):
        raise ValueError(f"{checkpoint}: some keys carry {VISION_PREFIX!r} and some do not")
    return VISION_PREFIX if prefixed else ""


def split_clip(
    clip_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    like: str | os.PathLike | None = None,
    prefix: str | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/vision`` (CLIPVisionModel) and ``out_dir/zeroshot`` (text side) from a CLIPModel folder.

    The vision tower's keys get ``prefix``: given, or that of the expert checkpoint ``like``, or
    ``vision_model.`` (see the module docstring). Non-persistent buffers stored in the file
    (``position_ids`` of older checkpoints) are dropped and listed in ``clip_split.json``: experts
    saved by newer transformers lack them, and only parameters and persistent buffers are compared
    and merged. Returns the two folders.
    """
    from transformers import CLIPConfig

    clip_dir, out_dir = Path(clip_dir), Path(out_dir)
    config = json.loads((clip_dir / "config.json").read_text())
    if config.get("model_type") != "clip":
        raise ValueError(f"{clip_dir} is not a full CLIPModel (model_type {config.get('model_type')!r}); "
                         "the pretrained CLIP source must be e.g. openai/clip-vit-base-patch32")
    prefix_from = "argument" if prefix is not None else (f"expert {like}" if like is not None else "default (transformers 4)")
    if prefix is None:
        prefix = vision_key_prefix(like) if like is not None else VISION_PREFIX
    checkpoint = LazyCheckpoint(clip_dir)
    buffers = nonpersistent_buffers(clip_dir)
    dropped = [key for key in checkpoint.keys() if is_nonpersistent(key, buffers)]
    kept = [key for key in checkpoint.keys() if key not in dropped]
    vision_keys = [key for key in kept if key.startswith(VISION_PREFIX)]
    text_keys = [key for key in kept if not key.startswith(VISION_PREFIX)]
    if not vision_keys or "visual_projection.weight" not in checkpoint or "logit_scale" not in checkpoint:
        raise ValueError(f"{clip_dir}: expected vision_model.*, visual_projection.weight and logit_scale tensors")
    upstream = clip_dir / FETCH_RECORD
    origin = {
        "clip_dir": str(clip_dir.resolve()),
        "resolved_commit": json.loads(upstream.read_text()).get("resolved_commit") if upstream.exists() else None,
        "vision_key_prefix": prefix,
        "prefix_from": prefix_from,
        # in the file, but not weights of transformers' CLIPModel (position_ids, see nonpersistent_buffers)
        "dropped_nonpersistent_buffers": dropped,
    }
    with atomic_output_dir(out_dir) as staging:
        vision, zeroshot = staging / "vision", staging / "zeroshot"
        vision.mkdir()
        zeroshot.mkdir()
        vision_config = CLIPConfig.from_pretrained(clip_dir).vision_config
        vision_config.architectures = ["CLIPVisionModel"]
        vision_config.save_pretrained(vision)
        state = {prefix + key[len(VISION_PREFIX):]: checkpoint.get(key).contiguous() for key in vision_keys}
        save_file(state, str(vision / "model.safetensors"), metadata={"format": "pt"})
        del state
        save_file({key: checkpoint.get(key).contiguous() for key in text_keys}, str(zeroshot / "model.safetensors"),
                  metadata={"format": "pt"})
        shutil.copy2(clip_dir / "config.json", zeroshot / "config.json")
        for name in _TOKENIZER_AND_PROCESSOR:
            if (clip_dir / name).exists():
                shutil.copy2(clip_dir / name, zeroshot / name)
                if name == "preprocessor_config.json":
                    shutil.copy2(clip_dir / name, vision / name)
        atomic_write_json(vision / "clip_split.json", {**origin, "part": "vision", "provenance": provenance()})
        atomic_write_json(zeroshot / "clip_split.json", {**origin, "part": "zeroshot", "provenance": provenance()})
    return out_dir / "vision", out_dir / "zeroshot"


def align_checkpoint(src: str | os.PathLike, like: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Rewrite checkpoint ``src`` with the tensor names of ``like`` (same architecture, other convention).

    Names are matched exactly or, failing that, by a unique match after dropping leading dotted
    components (``vision_model.``, ``model.``; as ``LazyCheckpoint.resolve``). Tensors of ``src``
    that ``like`` lacks are dropped only when they duplicate a kept tensor (tied embeddings);
    anything else, and any tensor of ``like`` that ``src`` lacks, is an error. Non-weight files are
    copied from ``src``.
    """
    import torch

    src, like, out_dir = Path(src), Path(like), Path(out_dir)
    source, reference = LazyCheckpoint(src), LazyCheckpoint(like)
    state, used = {}, set()
    for key in reference.keys():
        try:
            stored = source.resolve(key)
        except ValueError as error:
            raise ValueError(f"cannot align {src} to {like}: {error}") from error
        state[key] = source.get(stored).contiguous()
        used.add(stored)
    for key in source.keys():
        if key in used:
            continue
        tensor = source.get(key)
        if not any(value.shape == tensor.shape and torch.equal(value, tensor) for value in state.values()):
            raise ValueError(f"cannot align {src} to {like}: {src} has tensor {key!r} that {like} lacks")
    with atomic_output_dir(out_dir) as staging:
        for path in sorted(src.iterdir()):
            if path.is_file() and not path.name.endswith((".safetensors", ".safetensors.index.json")):
                shutil.copy2(path, staging / path.name)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(staging / "align.json", {"src": str(src), "like": str(like), "provenance": provenance()})
    return out_dir
