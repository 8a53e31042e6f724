"""mini-clip8's data: the raw pools, their disjoint splits, the tasks' domain transforms, the
training augmentation, and the images every stage reads (paper §5.1; the package docstring says why).

Splits
------
Each source pool is cut once into disjoint splits (seeded): Fashion-MNIST's training set into
pretrain / finetune / calib, its test set is the test pool; sklearn's 1,797 digits into
pretrain / finetune / calib / test. Every task built from a source uses that source's splits
(filtered by its label map, transformed by its domain transform), so no image is in two splits
of any task, nor in pretraining and a task's test set. Calibration images come from the training
side only and are disjoint from the images the experts were fine-tuned on.

Seeds: splits from numpy ``default_rng``, noise and augmentation from ``torch.Generator``, each
derived from the config's ``seed`` and stable names.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from epmq.suites.common import stable_seed

SOURCES_FILE = "sources.safetensors"
SPLITS = ("pretrain", "finetune", "calib", "test")
#: images in [0, 1], [N, 1, H, W] -> a tower's ``pixel_values`` (``to_pixel_values`` or another suite's)
PixelValues = Callable[[torch.Tensor, dict], torch.Tensor]


def seeded_generator(cfg: dict, *names: object) -> torch.Generator:
    """A ``torch.Generator`` seeded from the config's ``seed`` and ``names``."""
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
    digit_images, digit_labels = sklearn_digits()
    small = torch.from_numpy(digit_images).float()[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
    inner = cfg["data"]["digits_size"]
    big = F.interpolate(small, size=(inner, inner), mode="bilinear", align_corners=False).clamp(0, 1)
    pad = (size - inner) // 2
    big = F.pad(big, (pad, size - inner - pad, pad, size - inner - pad))
    pools["digits_images"] = (big[:, 0] * 255).round().to(torch.uint8).numpy()
    pools["digits_labels"] = digit_labels.astype(np.int64)
    return pools


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as ``sklearn.datasets.load_digits()`` gives them (``images``
    [N, 8, 8] float64 in 0..16, ``target``), read from the CSV it ships without importing
    scikit-learn: that import costs 1.7 s, on the path every later job waits for."""
    package = importlib.util.find_spec("sklearn")
    if package is None or not package.submodule_search_locations:
        raise FileNotFoundError("scikit-learn is not installed: its digits are mini-clip8's digit source")
    path = Path(package.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, mode="rt", encoding="utf-8") as handle:
        table = np.loadtxt(handle, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


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


def to_pixel_values(images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Images in [0, 1], [N, 1, H, W] -> normalised float32 ``pixel_values``."""
    return ((images - cfg["data"]["pixel_mean"]) / cfg["data"]["pixel_std"]).float().contiguous()


def epoch_batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches, epoch-wise shuffled without replacement."""
    order = torch.randperm(n, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > n:
            order, position = torch.randperm(n, generator=generator), 0
        yield order[position : position + batch_size]
        position += batch_size


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
    images = apply_transform(images, spec["transform"], seeded_generator(cfg, "transform", task, split))
    return TaskSplit(task, split, images, torch.from_numpy(labels), pool, indices)


def calibration_set(cfg: dict, task: str, samples: int, seed: int, data_dir: str | os.PathLike | None = None,
                    pixel_values: PixelValues = to_pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` calibration inputs of a task, drawn without replacement from its calib split.

    Returns (pixel_values [N, C, H, W] float32, sample_indices [N] int64 into the calib split).
    """
    split = task_split(cfg, task, "calib", Sources(cfg, data_dir))
    if not 0 < samples <= len(split):
        raise ValueError(f"task {task}: {samples} calibration samples requested, its calib split has {len(split)}")
    generator = torch.Generator().manual_seed(stable_seed(seed, "calib", task))
    indices = torch.randperm(len(split), generator=generator)[:samples].to(torch.int64)
    return pixel_values(split.images[indices], cfg), indices
