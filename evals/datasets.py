"""Datasets of the paper-scale suites, and the calibration files the quantizer reads.

Loaders return Hugging Face datasets: from the hub by default, from a local folder when a path is
given (for machines without hub access; see :func:`evals.local_data.load_local`).

- :func:`load_clip_task`: the 20 CLIP tasks (``evals.clip_tasks``), columns renamed to
  ``image``/``label``; ``split`` is ``"train"`` (calibration) or ``"test"`` (evaluation), mapped
  to each dataset's own split names.
- :func:`evals.glue.load_glue_task`: the 8 GLUE tasks; ``"validation"`` means mnli's ``validation_matched``.

Calibration inputs (what ``python -m epmq quantize --calib`` reads, one file per task, written by
the hub suites with ``epmq.suites.common.save_calibration``): the model's keyword inputs with the
samples on axis 0, plus ``sample_indices`` (int64: which examples of the training split were drawn).

- CLIP: ``pixel_values`` from the CLIP image processor (transformers' PIL backend; no torchvision).
- T5: ``input_ids``/``attention_mask`` of the GLUE prompt, ``labels`` (the target text, padding set
  to -100, teacher-forced) and ``decoder_attention_mask`` (labels != -100, so the T5 adapter leaves
  padded target positions out of the decoder's statistics).
- Llama: ``input_ids``/``attention_mask`` of text samples, at most ``max_length`` tokens.

Calibration indices: ``calibration_indices(n_total, samples, seed)`` draws ``samples`` distinct
indices with numpy's PCG64 (``default_rng(seed).permutation(n_total)[:samples]``), sorted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from evals.glue import glue_texts, load_glue_task
from evals.local_data import load_local

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp")
LABEL_COLUMNS = ("label", "labels", "fine_label", "cls")

# LLM calibration text per expert task: the MergeBench fine-tuning data (uiuctml/MergeBench,
# merging/taskloader.py: datasets MergeBench/<task>_val, alpaca-style formatting with these
# columns). An assumption: the paper does not say what it calibrated the Llama models on.
LLM_CALIBRATION = {
    "instruction": {"dataset": "MergeBench/instruction_val", "instruction": "instruction", "input": "input", "output": "output"},
    "math": {"dataset": "MergeBench/math_val", "instruction": "query", "input": None, "output": "response"},
    "coding": {"dataset": "MergeBench/coding_val", "instruction": "instruction", "input": None, "output": "response"},
    "multilingual": {"dataset": "MergeBench/multilingual_val", "instruction": "inputs", "input": None, "output": "targets"},
}


# ------------------------------------------------------------------------------- loading --
def _standard_columns(dataset, image: str, label: str, where: str):
    """Rename the image and label columns to ``image``/``label`` (trying common alternatives)."""
    columns = dataset.column_names

    def pick(preferred: str, alternatives: Sequence[str], what: str) -> str:
        for name in (preferred, *alternatives):
            if name in columns:
                return name
        raise ValueError(f"{where}: no {what} column (looked for {preferred!r} and {list(alternatives)}; has {columns})")

    image_column = pick(image, IMAGE_COLUMNS, "image")
    label_column = pick(label, LABEL_COLUMNS, "label")
    renames = {old: new for old, new in ((image_column, "image"), (label_column, "label")) if old != new}
    clashes = [new for old, new in renames.items() if new in columns]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    if renames:
        log.info("%s: using columns %s", where, renames)
        dataset = dataset.rename_columns(renames)
    return dataset


def load_clip_task(task: str, split: str, local_path: str | os.PathLike | None = None):
    """Task ``task``'s ``"train"`` or ``"test"`` split with columns ``image`` (PIL) and ``label``."""
    import datasets

    from evals.clip_tasks import get_task

    spec = get_task(task)
    real_split = spec.split(split)
    if local_path is not None:
        dataset = load_local(local_path, real_split)
        where = f"{task} ({local_path}, {real_split})"
    else:
        dataset = datasets.load_dataset(spec.dataset, spec.dataset_config, split=real_split)
        where = f"{task} ({spec.dataset}, {real_split})"
    return _standard_columns(dataset, spec.image_column, spec.label_column, where)


# --------------------------------------------------------------------------- calibration --
def calibration_indices(n_total: int, samples: int, seed: int) -> np.ndarray:
    """``samples`` distinct indices of ``range(n_total)`` drawn with ``seed`` (sorted, int64)."""
    if n_total <= 0 or samples <= 0:
        raise ValueError(f"need n_total > 0 and samples > 0, got {n_total}, {samples}")
    if samples > n_total:
        raise ValueError(f"cannot draw {samples} calibration samples from {n_total} examples")
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:samples]).astype(np.int64)


def sampled_inputs(tensors: Mapping[str, torch.Tensor], indices: np.ndarray) -> dict[str, torch.Tensor]:
    """The model inputs (contiguous) and ``sample_indices`` (int64), checked to agree on the number of samples."""
    payload = {key: value.contiguous() for key, value in tensors.items()}
    payload["sample_indices"] = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    sizes = {key: value.shape[0] for key, value in payload.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"calibration inputs disagree on the number of samples: {sizes}")
    return payload


def clip_image_processor(source: str | os.PathLike | int = 224):
    """The CLIP image processor of a model folder (``preprocessor_config.json``), or CLIP's defaults at a size.

    transformers' PIL backend (resize shortest side, bicubic; centre crop; rescale; normalise with
    CLIP's mean/std) works without torchvision.
    """
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    if isinstance(source, int):
        return cls(size={"shortest_edge": source}, crop_size={"height": source, "width": source})
    source = Path(source)
    if (source / "preprocessor_config.json").exists():
        return cls.from_pretrained(str(source))
    config = json.loads((source / "config.json").read_text())
    size = (config.get("vision_config") or config).get("image_size", 224)
    log.info("%s has no preprocessor_config.json: CLIP defaults at %d px", source, size)
    return clip_image_processor(int(size))


def pixel_values(processor, images: Sequence) -> torch.Tensor:
    """``pixel_values`` [N, 3, H, W] float32 of PIL images (converted to RGB, as FusionBench does)."""
    rgb = [image.convert("RGB") for image in images]
    return processor(images=rgb, return_tensors="pt")["pixel_values"].float()


def clip_calibration(task: str, processor, *, samples: int, seed: int, local_path: str | os.PathLike | None = None,
                     dataset=None, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Draw ``samples`` training images of ``task``: their ``pixel_values`` and ``sample_indices``.

    ``batch_size`` images are preprocessed at a time (each independently: it only bounds memory)."""
    if dataset is None:
        dataset = load_clip_task(task, "train", local_path)
    if isinstance(processor, (str, os.PathLike, int)):
        processor = clip_image_processor(processor)
    indices = calibration_indices(len(dataset), samples, seed)
    chunks = []
    for start in range(0, len(indices), batch_size):
        rows = dataset[[int(i) for i in indices[start : start + batch_size]]]
        chunks.append(pixel_values(processor, rows["image"]))
    return sampled_inputs({"pixel_values": torch.cat(chunks)}, indices)


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def glue_calibration(task: str, tokenizer, *, samples: int, seed: int, max_length: int, split: str = "train",
                     local_path: str | os.PathLike | None = None, dataset=None) -> dict[str, torch.Tensor]:
    """Draw ``samples`` examples of a GLUE task: prompts, teacher-forced targets and ``sample_indices``.

    Sequences are padded to the longest drawn one (inputs with the pad token and mask 0, labels
    with -100); padding is excluded from every statistic by the masks.
    """
    if dataset is None:
        dataset = load_glue_task(task, split, local_path)
    indices = calibration_indices(len(dataset), samples, seed)
    prompts, targets = zip(*(glue_texts(task, dataset[int(i)]) for i in indices))
    source = tokenizer(list(prompts), truncation=True, max_length=max_length)
    target = tokenizer(list(targets), truncation=True, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    labels = _pad(target["input_ids"], -100)
    tensors = {
        "input_ids": _pad(source["input_ids"], pad),
        "attention_mask": _pad(source["attention_mask"], 0),
        "labels": labels,
        "decoder_attention_mask": (labels != -100).long(),
    }
    return sampled_inputs(tensors, indices)


def alpaca_text(example: Mapping, instruction: str, input: str | None, output: str) -> str:
    """An instruction/response pair in the alpaca layout MergeBench fine-tuned on."""
    context = example.get(input) if input else None
    head = ("Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n")
    body = f"### Instruction:\n{example[instruction]}\n\n"
    if context:
        body += f"### Input:\n{context}\n\n"
    return head + body + f"### Response:\n{example[output]}\n"


def llm_calibration_texts(task: str, split: str = "train", local_path: str | os.PathLike | None = None,
                          dataset=None) -> tuple[object, Callable[[Mapping], str]]:
    """(dataset, example -> text) of an LLM expert task (``LLM_CALIBRATION``; an assumption, see there)."""
    import datasets

    spec = LLM_CALIBRATION[task]
    if dataset is None:
        dataset = load_local(local_path, split) if local_path else datasets.load_dataset(spec["dataset"], split=split)
    return dataset, lambda example: alpaca_text(example, spec["instruction"], spec["input"], spec["output"])


def text_calibration(texts, tokenizer, *, samples: int, seed: int, max_length: int,
                     to_text: Callable[[Mapping], str] | None = None) -> dict[str, torch.Tensor]:
    """Draw ``samples`` texts (a list of strings, or a dataset with ``to_text``): token ids and ``sample_indices``.

    Each sample is truncated to ``max_length`` tokens and right-padded to the longest drawn one.
    """
    indices = calibration_indices(len(texts), samples, seed)
    chosen = [texts[int(i)] for i in indices]
    if to_text is not None:
        chosen = [to_text(example) for example in chosen]
    encoded = tokenizer(chosen, truncation=True, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tensors = {"input_ids": _pad(encoded["input_ids"], pad), "attention_mask": _pad(encoded["attention_mask"], 0)}
    return sampled_inputs(tensors, indices)
