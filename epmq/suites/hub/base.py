"""What the paper-scale suites share: their YAML, the experts table, the store, links and calibration files.

"Pretrain" and "finetune" only fetch here (``epmq.hub``): the workflow runs them, and the data
step, on the login node (``localrules``), so compute nodes need no internet. Sources and revisions
come from the experts table (``config/experts.tsv``); every fetch records the commit it resolved.
Models live once in the store (``models_dir``, one folder per model and revision) and are linked
into each suite's folder with ``fetch.json`` saying where from and what was changed.
"""

from __future__ import annotations

import json
import os
import shutil
from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

from epmq.hub.experts_table import ModelEntry
from epmq.hub.store import FETCH_RECORD
from epmq.io import atomic_output_dir
from epmq.suites.base import Suite
from epmq.suites.common import read_suite_yaml, save_calibration

#: the keys every hub suite YAML sets (``section.key`` inside a section); the paper's values are in
#: epmq/suites/paper/*.yaml, which a YAML inherits with ``base:``
REQUIRED_KEYS = ("suite", "builder", "tasks", "experts_table", "models_dir", "datasets",
                 "eval.batch_size", "eval.limit", "eval.device")


def _has(cfg: dict, key: str) -> bool:
    section, _, name = key.rpartition(".")
    where = cfg.get(section) if section else cfg
    return isinstance(where, dict) and name in where


def split_dir(data_dir: str | os.PathLike | None, task: str, split: str) -> Path | None:
    """``data_dir/task/split`` as ``suite data`` wrote it, or None when there is none."""
    path = Path(data_dir) / task / split if data_dir else None
    return path if path and path.exists() else None


def write_fetch_record(store: Path, out: Path, **extra) -> None:
    """``out/fetch.json``: the store's fetch record, where it was linked from, and what was changed."""
    from epmq.io import atomic_write_json, provenance

    record = json.loads((store / FETCH_RECORD).read_text())
    atomic_write_json(out / FETCH_RECORD, {**record, "store": str(store.resolve()), **extra, "linked_by": provenance()})


def link_expert(store: Path, pretrained: str | os.PathLike, out: str | os.PathLike) -> None:
    """Link the expert in ``store`` into ``out`` with the pretrained model's tensor names.

    Only parameters and persistent buffers are compared: a non-persistent buffer the expert's file
    carries (CLIP's ``position_ids`` in checkpoints older than transformers 4.31) is dropped and
    listed in ``out/fetch.json``. An expert whose weights need no change is hard-linked, not copied.
    """
    from safetensors.torch import save_file

    from epmq.hub.layout import align_checkpoint, is_nonpersistent, nonpersistent_buffers
    from epmq.hub.store import link_model
    from epmq.io import LazyCheckpoint

    checkpoint = LazyCheckpoint(store)
    buffers = nonpersistent_buffers(store) | nonpersistent_buffers(pretrained)
    dropped = [key for key in checkpoint.keys() if is_nonpersistent(key, buffers)]
    kept = [key for key in checkpoint.keys() if key not in dropped]
    with atomic_output_dir(out) as staging:
        if not dropped and set(kept) == set(LazyCheckpoint(pretrained).keys()):
            link_model(store, staging, skip=(FETCH_RECORD,))
            write_fetch_record(store, staging, dropped_nonpersistent_buffers=[], aligned=False)
            return
        # weights change: write them (beside the output) without the buffers, then align the names
        source = staging / "without-buffers"
        link_model(store, source, skip=(FETCH_RECORD,))
        for name in ("model.safetensors.index.json", *(p.name for p in source.glob("*.safetensors"))):
            (source / name).unlink(missing_ok=True)
        save_file({key: checkpoint.get(key).contiguous() for key in kept}, str(source / "model.safetensors"),
                  metadata={"format": "pt"})
        aligned = set(kept) != set(LazyCheckpoint(pretrained).keys())
        if aligned:
            align_checkpoint(source, pretrained, staging / "aligned")
            shutil.rmtree(source)
            source = staging / "aligned"
        for item in source.iterdir():
            shutil.move(str(item), staging / item.name)
        source.rmdir()
        write_fetch_record(store, staging, dropped_nonpersistent_buffers=dropped, aligned=aligned)


class HubSuite(Suite):
    """A paper-scale suite: pretrained model and experts fetched, data from the hub or local copies."""

    #: the keys this family reads besides ``REQUIRED_KEYS`` (``section.key`` inside a section)
    family_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def load_config(cls, path: str | os.PathLike) -> dict:
        path = Path(path)
        cfg = read_suite_yaml(path)
        missing = [key for key in (*REQUIRED_KEYS, *cls.family_keys) if not _has(cfg, key)]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}; the paper's settings are in epmq/suites/paper/*.yaml "
                             "(inherit them with `base:`)")
        if cfg["builder"] not in cls.builders:
            raise ValueError(f"{path}: builder must be one of {cls.builders}, got {cfg['builder']!r}")
        cfg["tasks"] = {task: {} for task in cfg["tasks"]} if isinstance(cfg["tasks"], list) else cfg["tasks"]
        return cfg

    # ------------------------------------------------------------- the experts table and the store
    def entries(self) -> tuple[ModelEntry, dict[str, ModelEntry]]:
        """The pretrained row and ``{task: expert row}`` of this suite in the experts table."""
        from epmq.hub.experts_table import read_experts_table

        cfg = self.cfg
        entries = read_experts_table(cfg["experts_table"], suite=cfg["suite"])
        pretrained = [e for e in entries if e.role == "pretrained"]
        experts = {e.task: e for e in entries if e.role == "expert"}
        if len(pretrained) != 1:
            raise ValueError(f"{cfg['experts_table']}: suite {cfg['suite']} needs exactly one pretrained row")
        missing = [task for task in cfg["tasks"] if task not in experts]
        if missing:
            raise ValueError(f"{cfg['experts_table']}: suite {cfg['suite']} has no expert row for tasks {missing}")
        return pretrained[0], experts

    def fetch(self, entry: ModelEntry, label: str) -> Path:
        """The store folder of ``entry`` (fetched once, shared by every suite that lists it)."""
        from epmq.hub.store import fetch_to_store

        return fetch_to_store(entry.source, entry.revision, Path(self.cfg["models_dir"]), label=label)

    def device(self) -> str:
        """The evaluation device: ``eval.device``, where ``auto`` is cuda when available."""
        import torch

        wanted = self.cfg["eval"]["device"]
        return ("cuda" if torch.cuda.is_available() else "cpu") if wanted == "auto" else wanted

    # ---------------------------------------------------------------------------------- stages
    def write_data(self, out):
        """Download (or copy from ``datasets:`` overrides) every split a job will read, into ``out``."""
        with atomic_output_dir(out) as tmp:
            for task in self.cfg["tasks"]:
                for split, dataset in self.data_splits(task, self.cfg["datasets"].get(task)).items():
                    dataset.save_to_disk(str(tmp / task / split))
            self.prefetch_evaluation()

    @abstractmethod
    def data_splits(self, task: str, local: str | None) -> dict:
        """``{split: dataset}`` of ``task`` that later jobs read (from ``local`` when given, else the hub)."""

    def prefetch_evaluation(self) -> None:
        """Put what evaluation loads by itself into the HF cache (nothing, unless a family says so)."""

    def build_pretrained(self, out, data_dir=None):
        """Fetch the pretrained model into the store and link it into ``out``."""
        from epmq.hub.store import link_model

        entry, _ = self.entries()
        store = self.fetch(entry, f"{self.cfg['suite']} pretrained")
        with atomic_output_dir(out) as staging:
            link_model(store, staging, skip=(FETCH_RECORD,))
            write_fetch_record(store, staging, dropped_nonpersistent_buffers=[])

    def build_expert(self, pretrained, task, out, data_dir=None):
        """Fetch task ``task``'s expert into the store and link it into ``out`` (``link_expert``)."""
        _, experts = self.entries()
        store = self.fetch(experts[task], f"{self.cfg['suite']} expert {task}")
        link_expert(store, pretrained, out)

    def write_calibration(self, task, samples, seed, out, data_dir=None, suite_dir=None):
        """``samples`` training examples of ``task`` (seeded) as the model's inputs, with ``sample_indices``."""
        pretrained = Path(suite_dir) / "pretrained" if suite_dir else None
        tensors = self.calibration_inputs(task, samples, seed, split_dir(data_dir, task, "train"), pretrained)
        save_calibration(tensors, out, self.cfg, task, samples, seed, split="train")

    @abstractmethod
    def calibration_inputs(self, task: str, samples: int, seed: int, train: Path | None,
                           pretrained: Path | None) -> dict:
        """The model's inputs for ``samples`` examples of ``task``'s training split (``train``: the
        split ``suite data`` wrote, else the hub) and ``sample_indices``; ``pretrained``: the suite's
        pretrained folder (tokenizer, image processor)."""
