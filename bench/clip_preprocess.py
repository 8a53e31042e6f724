"""Throughput of CLIP evaluation's image preprocessing with 0, 2 and 4 DataLoader workers.

Builds an in-memory ``datasets.Dataset`` of JPEG-encoded images (decoded on access, like the
hub's image datasets; ``--size`` pixels, default 500 x 375, the typical photo of the CLIP tasks),
runs ``evals.clip_eval.image_batches`` over it (decode, RGB, resize, crop, normalise: the
transformers CLIP processor at 224 px) and prints images per second for each worker count,
with the machine's CPU count: workers cannot beat the cores they run on.

    python bench/clip_preprocess.py [--images 512] [--workers 0 2 4]
"""

from __future__ import annotations

import argparse
import io
import os
import time
import warnings

import numpy as np


def jpeg_dataset(images: int, width: int, height: int, seed: int = 0):
    """``images`` JPEGs with smooth structure plus noise (so they compress like photos), labels 0..9."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    encoded = []
    for index in range(images):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        base = np.stack([np.sin(x / (17 + 5 * c) + y / (23 + 3 * c) + phase[c]) for c in range(3)], axis=-1)
        pixels = np.clip(127 + 100 * base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": encoded, "label": [i % 10 for i in range(images)]}, features=features)


def throughput(dataset, processor, workers: int, batch_size: int) -> float:
    """Images per second through :func:`evals.clip_eval.image_batches` (worker start-up included)."""
    from evals.clip_eval import image_batches

    start = time.perf_counter()
    count = sum(len(labels) for _, labels in image_batches(dataset, processor, batch_size=batch_size, workers=workers))
    return count / (time.perf_counter() - start)


def main() -> None:
    import torch

    from evals.datasets import clip_image_processor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: measured on purpose
    dataset = jpeg_dataset(args.images, *args.size)
    processor = clip_image_processor(224)
    print(f"CPUs: {len(os.sched_getaffinity(0))} usable of {os.cpu_count()}; {args.images} JPEG images "
          f"{args.size[0]}x{args.size[1]}, batches of {args.batch_size}, CLIP processor at 224 px; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    rates = {}
    for workers in args.workers:
        rates[workers] = throughput(dataset, processor, workers, args.batch_size)
        ratio = f" ({rates[workers] / rates[args.workers[0]]:.2f}x {args.workers[0]} workers)" if workers else ""
        print(f"workers={workers}: {rates[workers]:.0f} images/s{ratio}")


if __name__ == "__main__":
    main()
