"""mini-text4's settings (``mini-text4.yaml``, every hyperparameter of the suite) read and checked,
and the names of the files its stages write."""

from __future__ import annotations

import os
from pathlib import Path

from epmq.suites.base import packaged_config
from epmq.suites.common import read_suite_yaml

#: ``suite data``: the cleaned e-mails, one JSON object a line, and what the cleaning removed
EMAILS_FILE = "emails.jsonl"
MANIFEST_FILE = "manifest.json"
#: an expert's task head (outside ``model.safetensors``: neither merged nor quantized)
HEAD_FILE = "head.safetensors"
BUILD_FILE = "build.json"
#: the disjoint pools the corpus is cut into once; every task draws its splits from them
POOLS = ("finetune", "calib", "test")


def load_config(path: str | os.PathLike | None = None) -> dict:
    """Read a suite YAML (resolving ``base:`` and ``include_tasks:``; default: the packaged
    ``mini-text4.yaml``) and check its structure."""
    path = Path(path) if path is not None else packaged_config("mini-text4")
    raw = read_suite_yaml(path)
    check_config(raw, path)
    return raw


def check_config(cfg: dict, path: Path) -> None:
    required = ["suite", "builder", "seed", "data", "model", "finetune", "calib", "eval", "tasks"]
    missing = [key for key in required if key not in cfg]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if cfg["builder"] != "mini-text":
        raise ValueError(f"{path}: builder must be 'mini-text', got {cfg['builder']!r}")
    fractions = cfg["data"]["pool_fractions"]
    if sorted(fractions) != sorted(POOLS) or abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"{path}: data.pool_fractions must give {POOLS} and sum to 1")
    if sorted(cfg["data"]["balance"]) != sorted(POOLS) or not set(cfg["data"]["balance"].values()) <= {"equal", "fill"}:
        raise ValueError(f"{path}: data.balance must map each of {POOLS} to equal or fill")
    if not cfg["tasks"]:
        raise ValueError(f"{path}: no tasks")
    for name, task in cfg["tasks"].items():
        for key in ("label_field", "classes", "n"):
            if key not in task:
                raise ValueError(f"{path}: task {name!r} lacks {key!r}")
        if task["label_field"] not in ("group", "list_id"):
            raise ValueError(f"{path}: task {name!r}: label_field must be group or list_id")
        if len(task["classes"]) < 2:
            raise ValueError(f"{path}: task {name!r} needs at least two classes")
        values = [v for vs in task["classes"].values() for v in vs]
        if len(values) != len(set(values)):
            raise ValueError(f"{path}: task {name!r}: a {task['label_field']} value is in two classes")
        if sorted(task["n"]) != sorted(POOLS):
            raise ValueError(f"{path}: task {name!r}: n must give sizes for {POOLS}")
