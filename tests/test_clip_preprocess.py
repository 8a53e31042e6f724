"""Issue 13, item 4: CLIP evaluation preprocesses images in DataLoader workers, with the same batches as in-process."""

import importlib.util
from pathlib import Path

import torch

from evals.clip_eval import image_batches
from evals.datasets import clip_image_processor

BENCH = Path(__file__).resolve().parents[1] / "bench" / "clip_preprocess.py"


def _bench():
    spec = importlib.util.spec_from_file_location("clip_preprocess", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workers_yield_the_in_process_batches_in_order():
    dataset = _bench().jpeg_dataset(11, 64, 48)
    processor = clip_image_processor(32)
    alone = list(image_batches(dataset, processor, batch_size=4, limit=10, workers=0))
    pooled = list(image_batches(dataset, processor, batch_size=4, limit=10, workers=2))
    assert [len(labels) for _, labels in alone] == [4, 4, 2]
    assert len(pooled) == len(alone)
    for (pixels, labels), (pooled_pixels, pooled_labels) in zip(alone, pooled):
        assert pixels.shape[1:] == (3, 32, 32)
        assert torch.equal(pixels, pooled_pixels) and torch.equal(labels, pooled_labels)
    assert torch.cat([labels for _, labels in alone]).tolist() == [i % 10 for i in range(10)]
