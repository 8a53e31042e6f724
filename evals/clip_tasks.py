"""The 20 CLIP image-classification tasks of the paper: class names, prompt templates, datasets.

Suites (paper §5.1 and §5.3; Tables 1, 2, 7-11): TA8, TALL14 = TA8 + 6, TALL20 = TALL14 + 6. Task names are the
paper's (as in ``results/reference/paper_tables.csv``); ``fusion_bench_name`` is FusionBench's
name for the same task, used in its expert ids ``tanganke/clip-vit-<backbone>_<fusion_bench_name>``.

Every fact here was transcribed, as data, from tanganke/fusion_bench (commit 54c9e8c9, 2026-08-05):

- class names and prompt templates: ``fusion_bench/tasks/clip_classification/<module>.py``, kept
  in the data module :mod:`evals.clip_task_prompts` (its docstring says how they were transcribed).
- datasets and splits: ``config/dataset/image_classification/{train,test}/<name>.yaml``
  (food101 evaluates on ``validation``; svhn is config ``cropped_digits`` of ``ufldl-stanford/svhn``;
  fer2013 comes from ``clip-benchmark/wds_fer2013`` through ``fusion_bench/dataset/fer2013.py``,
  which renames its columns ``jpg``/``cls`` to ``image``/``label``).
- columns: FusionBench's ``ImageClassificationDataset`` reads ``item["image"]`` and
  ``item["label"]`` of every dataset (booleans, as in pcam, become 0/1), so every dataset except
  fer2013 is taken to have those two columns; :func:`evals.datasets.load_clip_task` also accepts a
  few common alternatives (``img``, ``fine_label``, ...) and says which it used.
- expert ids: ``config/model/clip-vit/clip-vit-{base-patch32,large-patch14}_<name>.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

from evals.clip_task_prompts import CLASSNAMES, TEMPLATES

TA8 = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
TALL14 = TA8 + ("flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100")
TALL20 = TALL14 + ("cifar10", "food101", "fashion-mnist", "emnist-letters", "kmnist", "rendered-sst2")
SUITES = {"ta8": TA8, "tall14": TALL14, "tall20": TALL20}

# FusionBench's expert ids: tanganke/clip-vit-<backbone>_<fusion_bench_name>
BACKBONES = {"b32": "clip-vit-base-patch32", "l14": "clip-vit-large-patch14"}
PRETRAINED = {"b32": "openai/clip-vit-base-patch32", "l14": "openai/clip-vit-large-patch14"}


@dataclass(frozen=True)
class ClipTask:
    """One task: what the zero-shot head is built from and where its images come from."""

    name: str
    fusion_bench_name: str
    dataset: str  # HF dataset id
    dataset_config: str | None
    train_split: str  # calibration draws from here
    test_split: str  # evaluation
    image_column: str
    label_column: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    def split(self, split: str) -> str:
        """The dataset split for ``"train"`` / ``"test"`` (any other name is passed through)."""
        return {"train": self.train_split, "test": self.test_split}.get(split, split)

    def expert_id(self, backbone: str) -> str:
        """FusionBench's fine-tuned vision tower for this task (``backbone`` = b32 | l14)."""
        return f"tanganke/{BACKBONES[backbone]}_{self.fusion_bench_name}"


def get_task(name: str) -> ClipTask:
    if name not in TASKS:
        raise KeyError(f"unknown CLIP task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def suite_tasks(suite: str) -> tuple[str, ...]:
    """Task names of ``ta8`` / ``tall14`` / ``tall20`` (also accepts ``clip-b32-ta8`` style names)."""
    key = suite.rsplit("-", 1)[-1].lower()
    if key not in SUITES:
        raise KeyError(f"unknown CLIP suite {suite!r}; known: {', '.join(SUITES)}")
    return SUITES[key]


# task -> (FusionBench name, HF dataset id, dataset config, train split, test split, image column, label column)
_DATASETS: dict[str, tuple[str, str, str | None, str, str, str, str]] = {
    "sun397": ("sun397", "tanganke/sun397", None, "train", "test", "image", "label"),
    "stanford-cars": ("stanford-cars", "tanganke/stanford_cars", None, "train", "test", "image", "label"),
    "resisc45": ("resisc45", "tanganke/resisc45", None, "train", "test", "image", "label"),
    "eurosat": ("eurosat", "tanganke/eurosat", None, "train", "test", "image", "label"),
    "svhn": ("svhn", "ufldl-stanford/svhn", "cropped_digits", "train", "test", "image", "label"),
    "gtsrb": ("gtsrb", "tanganke/gtsrb", None, "train", "test", "image", "label"),
    "mnist": ("mnist", "ylecun/mnist", None, "train", "test", "image", "label"),
    "dtd": ("dtd", "tanganke/dtd", None, "train", "test", "image", "label"),
    "flowers102": ("oxford_flowers102", "dpdl-benchmark/oxford_flowers102", None, "train", "test", "image", "label"),
    "pcam": ("pcam", "1aurent/PatchCamelyon", None, "train", "test", "image", "label"),
    "fer2013": ("fer2013", "clip-benchmark/wds_fer2013", None, "train", "test", "jpg", "cls"),
    "oxford-iiit-pet": ("oxford-iiit-pet", "timm/oxford-iiit-pet", None, "train", "test", "image", "label"),
    "stl10": ("stl10", "tanganke/stl10", None, "train", "test", "image", "label"),
    "cifar100": ("cifar100", "tanganke/cifar100", None, "train", "test", "image", "label"),
    "cifar10": ("cifar10", "tanganke/cifar10", None, "train", "test", "image", "label"),
    "food101": ("food101", "ethz/food101", None, "train", "validation", "image", "label"),
    "fashion-mnist": ("fashion_mnist", "zalando-datasets/fashion_mnist", None, "train", "test", "image", "label"),
    "emnist-letters": ("emnist_letters", "tanganke/emnist_letters", None, "train", "test", "image", "label"),
    "kmnist": ("kmnist", "tanganke/kmnist", None, "train", "test", "image", "label"),
    "rendered-sst2": ("rendered-sst2", "nateraw/rendered-sst2", None, "train", "test", "image", "label"),
}

TASKS: dict[str, ClipTask] = {
    name: ClipTask(name, fb, dataset, config, train, test, image, label, CLASSNAMES[name], TEMPLATES[name])
    for name, (fb, dataset, config, train, test, image, label) in _DATASETS.items()
}
assert tuple(TASKS) == TALL20, "every task of TALL20 must have its data, in suite order"
