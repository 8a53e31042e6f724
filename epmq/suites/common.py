"""What every offline suite module shares: reading its YAML, its digest, threads, seeds, and
writing a calibration file atomically."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import zlib
from pathlib import Path

import torch
import yaml


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_with_base(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a suite config must be a mapping")
    if "base" in raw:
        base = _read_with_base((path.parent / raw.pop("base")).resolve())
        base.pop("include_tasks", None)
        raw = deep_merge(base, raw)
    return raw


def read_suite_yaml(path: str | os.PathLike) -> dict:
    """A suite YAML with ``base:`` (a YAML it overrides, deep-merged) and ``include_tasks:`` (the
    tasks it keeps, in that order) resolved; ``config_path`` records where it came from."""
    path = Path(path)
    raw = _read_with_base(path)
    include = raw.pop("include_tasks", None)
    if include is not None:
        unknown = [task for task in include if task not in raw.get("tasks", {})]
        if unknown:
            raise ValueError(f"{path}: include_tasks names unknown tasks {unknown}")
        raw["tasks"] = {name: raw["tasks"][name] for name in include}
    raw["config_path"] = str(path)
    return raw


def config_digest(cfg: dict) -> str:
    """A short digest of the settings (not of where the file lies), recorded with every output."""
    canonical = {key: value for key, value in cfg.items() if key != "config_path"}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def set_threads(cfg: dict, override: int | None = None) -> int:
    """torch threads: ``override`` (the CLI's ``--threads``), else the config's, else every usable core.

    Under a scheduler running several jobs at once, give each job its share (``--threads 1`` with
    two jobs on two cores): oversubscribed intra-op threads wait on each other and run many times
    slower."""
    threads = int(override or cfg.get("threads") or len(os.sched_getaffinity(0)))
    torch.set_num_threads(threads)
    return threads


def state_signature(directory: Path) -> dict[str, tuple]:
    """``{tensor name: (shape, dtype)}`` of ``directory/model.safetensors``: an expert must match its
    pretrained model's."""
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return {k: (tuple(handle.get_slice(k).get_shape()), handle.get_slice(k).get_dtype()) for k in handle.keys()}


def stable_seed(*parts: object) -> int:
    """A stable 32-bit integer for (seed, names...), for seeding generators reproducibly."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def save_calibration(tensors: dict[str, torch.Tensor], out: str | os.PathLike, cfg: dict, task: str,
                     samples: int, seed: int, split: str = "calib") -> None:
    """One task's calibration set as safetensors, with the setting in its metadata (``split``: the
    data split the samples were drawn from), written atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={
            "suite": cfg["suite"], "task": task, "split": split, "seed": str(seed),
            "samples": str(samples), "config_digest": config_digest(cfg)})
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
