"""mini-text4's splits: the cleaned corpus (``suite data`` cache), cut once into disjoint pools,
each task's class-balanced splits drawn from them, and the calibration sets.

The deduplicated corpus is cut **once** into disjoint pools ``finetune`` / ``calib`` / ``test``
(seeded, stratified by group and list), and every task draws its splits from those pools
(at most ``n`` per split; test splits with the same count per class, the others as balanced as
the pool allows: ``data.balance``). So no e-mail is in the test split of one task and in the
fine-tuning or calibration split of another. Calibration samples come from the ``calib`` pool:
training-side data, disjoint from every expert's fine-tuning data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from epmq.suites.common import stable_seed
from epmq.suites.mini_text4.config import EMAILS_FILE, POOLS
from epmq.suites.mini_text4.corpus import clean_corpus
from epmq.suites.mini_text4.model import load_tokenizer, tokenize


def load_emails(cfg: dict, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The cleaned e-mails: from a ``suite data`` cache if given, else parsed from the tarball."""
    if data_dir is None:
        return clean_corpus(cfg)[0]
    path = Path(data_dir) / EMAILS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {EMAILS_FILE} in {data_dir}; run `python -m epmq suite data` first")
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def pool_assignment(cfg: dict, emails: list[dict]) -> dict[str, str]:
    """e-mail key -> finetune | calib | test; one seeded cut of every (group, list) stratum."""
    fractions = cfg["data"]["pool_fractions"]
    strata: dict[tuple, list[str]] = {}
    for item in emails:
        strata.setdefault((item["group"], item["list_id"] or ""), []).append(item["key"])
    assignment = {}
    for stratum in sorted(strata):
        keys = sorted(strata[stratum])
        rng = np.random.default_rng(stable_seed(cfg["seed"], "pools", *stratum))
        order = [keys[i] for i in rng.permutation(len(keys))]
        n_finetune = int(round(fractions["finetune"] * len(keys)))
        n_calib = int(round(fractions["calib"] * len(keys)))
        for position, key in enumerate(order):
            assignment[key] = "finetune" if position < n_finetune else "calib" if position < n_finetune + n_calib else "test"
    return assignment


def _balanced_quota(available: list[int], total: int) -> list[int]:
    """Water-filling: as equal a share per class as availability allows, summing to <= total."""
    quota = [0] * len(available)
    remaining = total
    open_classes = [c for c in range(len(available)) if available[c] > 0]
    while remaining > 0 and open_classes:
        share = max(1, remaining // len(open_classes))
        for c in list(open_classes):
            take = min(share, available[c] - quota[c], remaining)
            quota[c] += take
            remaining -= take
            if quota[c] == available[c]:
                open_classes.remove(c)
            if remaining == 0:
                break
    return quota


@dataclass
class TaskSplit:
    task: str
    split: str
    texts: list[str]
    labels: torch.Tensor  # [N] int64
    keys: list[str]  # e-mail keys (for disjointness checks)
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def task_split(cfg: dict, task: str, split: str, emails: list[dict], pools: dict[str, str] | None = None) -> TaskSplit:
    """A task's split: the pool's e-mails whose label field falls in one of the task's classes,
    class-balanced (``data.balance``: ``equal`` counts per class, or ``fill``: water-filling) and
    drawn in a seeded order; at most ``n[split]`` e-mails."""
    if split not in POOLS:
        raise ValueError(f"task splits are {POOLS}, not {split!r}")
    spec = cfg["tasks"][task]
    pools = pools if pools is not None else pool_assignment(cfg, emails)
    class_names = list(spec["classes"])
    label_of = {value: c for c, name in enumerate(class_names) for value in spec["classes"][name]}
    restrict = set(spec.get("groups") or [])
    members: list[list[dict]] = [[] for _ in class_names]
    for item in emails:
        if pools[item["key"]] != split or (restrict and item["group"] not in restrict):
            continue
        label = label_of.get(item[spec["label_field"]])
        if label is not None:
            members[label].append(item)
    available = [len(m) for m in members]
    if cfg["data"]["balance"][split] == "equal":  # the same count per class: chance = 1 / classes
        per_class = min(min(available), spec["n"][split] // len(members))
        quota = [per_class] * len(members)
    else:  # "fill": water-filling, as equal as availability allows, up to n
        quota = _balanced_quota(available, spec["n"][split])
    chosen: list[tuple[dict, int]] = []
    for label, (items, q) in enumerate(zip(members, quota)):
        rng = np.random.default_rng(stable_seed(cfg["seed"], "draw", task, split, class_names[label]))
        chosen.extend((items[i], label) for i in sorted(rng.permutation(len(items))[:q].tolist()))
    rng = np.random.default_rng(stable_seed(cfg["seed"], "order", task, split))
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    return TaskSplit(task, split, [c[0]["text"] for c in chosen], torch.tensor([c[1] for c in chosen], dtype=torch.int64),
                     [c[0]["key"] for c in chosen], class_names)


def task_splits(cfg: dict, task: str, data_dir: str | os.PathLike | None = None) -> dict[str, TaskSplit]:
    """Every split of ``task``, from the ``suite data`` cache in ``data_dir`` (or the tarball)."""
    emails = load_emails(cfg, data_dir)
    pools = pool_assignment(cfg, emails)
    return {split: task_split(cfg, task, split, emails, pools) for split in POOLS}


def calibration_set(cfg: dict, task: str, samples: int, seed: int, data_dir: str | os.PathLike | None = None,
                    tokenizer=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``samples`` e-mails of the task's calib split (training side, disjoint from fine-tuning),
    drawn without replacement; (tokens, sample_indices into the calib split)."""
    split = task_splits(cfg, task, data_dir)["calib"]
    if not 0 < samples <= len(split):
        raise ValueError(f"task {task}: {samples} calibration samples requested, its calib split has {len(split)}")
    generator = torch.Generator().manual_seed(stable_seed(seed, "calib", task))
    indices = torch.randperm(len(split), generator=generator)[:samples].to(torch.int64)
    tokenizer = tokenizer or load_tokenizer(cfg)
    return tokenize(cfg, tokenizer, [split.texts[i] for i in indices.tolist()]), indices

