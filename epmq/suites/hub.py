"""The paper-scale suites: experts and data from the hub (or local copies), the paper's protocols.

One module serves the three builders of ``epmq/suites/paper/*.yaml``, with the same contract as
the offline suites (``data``, ``pretrain``, ``finetune``, ``calib``, ``evaluate``):

* ``hub-clip``: CLIP ViT-B/32 and ViT-L/14 on 8/14/20 tasks. ``pretrain`` fetches the full
  pretrained CLIPModel and keeps its vision tower (the model that is merged and quantized, tensor
  names in the experts' convention) plus ``zeroshot/`` (text tower, projections, logit scale) and
  ``heads.safetensors`` (each task's zero-shot head, built once). Evaluation: zero-shot top-1.
* ``hub-t5``: FLAN-T5-base on eight GLUE tasks; text-to-text, greedy decoding, exact match
  (Spearman for STS-B), on the validation splits.
* ``hub-llama``: Llama-3.x experts merged by task arithmetic; calibration on the experts' training
  data; evaluation with lm-eval on the paper's benchmarks (``eval_tasks``).

"Pretrain" and "finetune" only fetch here (``epmq.hub``): the workflow runs them, and the data
step, on the login node (``localrules``), so compute nodes need no internet. Sources and revisions
come from the experts table (``config/experts.tsv``); every fetch records the commit it resolved.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from epmq.io import atomic_output_dir

BUILDERS = ("hub-clip", "hub-t5", "hub-llama")
_REQUIRED = ("suite", "builder", "tasks", "experts_table")


def load_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    cfg = yaml.safe_load(path.read_text())
    if "base" in cfg:
        base = yaml.safe_load((path.parent / cfg.pop("base")).read_text())
        cfg = {**base, **cfg}
    missing = [key for key in _REQUIRED if key not in cfg]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if cfg["builder"] not in BUILDERS:
        raise ValueError(f"{path}: builder must be one of {BUILDERS}, got {cfg['builder']!r}")
    cfg["tasks"] = {task: {} for task in cfg["tasks"]} if isinstance(cfg["tasks"], list) else cfg["tasks"]
    cfg.setdefault("datasets", {})
    cfg.setdefault("eval", {})
    cfg.setdefault("calib", {})
    cfg["config_path"] = str(path)
    return cfg


def eval_tasks(cfg: dict) -> list[str]:
    """The tasks models are evaluated on: the experts' tasks, or the LLM benchmarks."""
    return list(cfg.get("eval_tasks") or cfg["tasks"])


def _entries(cfg: dict):
    from epmq.hub import read_experts_table

    entries = read_experts_table(cfg["experts_table"], suite=cfg["suite"])
    pretrained = [e for e in entries if e.role == "pretrained"]
    experts = {e.task: e for e in entries if e.role == "expert"}
    if len(pretrained) != 1:
        raise ValueError(f"{cfg['experts_table']}: suite {cfg['suite']} needs exactly one pretrained row")
    missing = [task for task in cfg["tasks"] if task not in experts]
    if missing:
        raise ValueError(f"{cfg['experts_table']}: suite {cfg['suite']} has no expert row for tasks {missing}")
    return pretrained[0], experts


def _device(cfg: dict) -> str:
    import torch

    wanted = cfg["eval"].get("device", "auto")
    return ("cuda" if torch.cuda.is_available() else "cpu") if wanted == "auto" else wanted


# ----------------------------------------------------------------------------------------- data

def write_data_cache(cfg: dict, out: str | os.PathLike) -> None:
    """Download (or copy from ``datasets:`` overrides) every split a job will read, into ``out``."""
    from evals import datasets as loaders

    with atomic_output_dir(out) as tmp:
        for task in cfg["tasks"]:
            local = cfg["datasets"].get(task)
            if cfg["builder"] == "hub-clip":
                splits = {"train": loaders.load_clip_task(task, "train", local), "test": loaders.load_clip_task(task, "test", local)}
            elif cfg["builder"] == "hub-t5":
                splits = {"train": loaders.load_glue_task(task, "train", local),
                          "validation": loaders.load_glue_task(task, "validation", local)}
            else:
                splits = {"train": loaders.llm_calibration_texts(task, "train", local)[0]}
            for split, dataset in splits.items():
                dataset.save_to_disk(str(tmp / task / split))
        if cfg["builder"] == "hub-llama":
            _prefetch_lm_eval(cfg)


def _prefetch_lm_eval(cfg: dict) -> None:
    """Load lm-eval's tasks once so their datasets sit in the HF cache for offline compute nodes."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from evals.lm_eval_runner import task_mapping

    include = cfg["eval"].get("include_path")
    manager = TaskManager(include_path=include) if include else TaskManager()
    get_task_dict(list(task_mapping(eval_tasks(cfg), cfg["eval"].get("chat", False)).values()), manager)


def _split_dir(data_dir, task, split) -> Path | None:
    path = Path(data_dir) / task / split if data_dir else None
    return path if path and path.exists() else None


# ---------------------------------------------------------------------------------- the models

def pretrain(cfg: dict, out: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> None:
    """Fetch the pretrained model; for CLIP keep the vision tower and build the zero-shot heads."""
    from epmq.hub import fetch, resource_name, split_clip
    from evals.clip_eval import build_heads

    entry, experts = _entries(cfg)
    label = f"{cfg['suite']} pretrained"
    if cfg["builder"] != "hub-clip":
        fetch(entry.source, entry.revision, out, label=label)
        return
    cache = Path(cfg.get("models_dir", "resources/models")) / resource_name(entry.source, entry.revision)
    if not cache.exists():
        fetch(entry.source, entry.revision, cache, label=label)
    first_expert = experts[next(iter(cfg["tasks"]))]
    with tempfile.TemporaryDirectory() as tmp:
        like = Path(tmp) / "expert"
        fetch(first_expert.source, first_expert.revision, like, label=f"{cfg['suite']} expert {first_expert.task}")
        vision, zeroshot = split_clip(cache, Path(tmp) / "split", like=like)
        with atomic_output_dir(out) as staging:
            for item in vision.iterdir():
                shutil.move(str(item), staging / item.name)
            shutil.move(str(zeroshot), staging / "zeroshot")
            build_heads(staging / "zeroshot", list(cfg["tasks"]), staging / "heads.safetensors", device=_device(cfg))


def finetune(cfg: dict, pretrained: str | os.PathLike, task: str, out: str | os.PathLike,
             data_dir: str | os.PathLike | None = None) -> None:
    """Fetch task ``task``'s expert, with the pretrained model's tensor names."""
    from epmq.hub import align_checkpoint, fetch
    from epmq.io import LazyCheckpoint

    _, experts = _entries(cfg)
    entry = experts[task]
    with tempfile.TemporaryDirectory() as tmp:
        fetched = fetch(entry.source, entry.revision, Path(tmp) / "expert", label=f"{cfg['suite']} expert {task}")
        if set(LazyCheckpoint(fetched).keys()) != set(LazyCheckpoint(pretrained).keys()):
            fetched = align_checkpoint(fetched, pretrained, Path(tmp) / "aligned")
        with atomic_output_dir(out) as staging:
            for item in Path(fetched).iterdir():
                shutil.copy2(item, staging / item.name)


def write_calibration(cfg: dict, task: str, samples: int, seed: int, out: str | os.PathLike,
                      data_dir: str | os.PathLike | None = None, suite_dir: str | os.PathLike | None = None) -> None:
    """``samples`` training examples of ``task`` (seeded) as the model's inputs; indices recorded."""
    from evals import datasets as loaders

    local = _split_dir(data_dir, task, "train")
    pretrained = Path(suite_dir) / "pretrained" if suite_dir else None
    options = cfg["calib"]
    if cfg["builder"] == "hub-clip":
        processor = pretrained / "zeroshot" if pretrained else cfg.get("image_size", 224)
        dataset = loaders.load_local(local, "train") if local else None
        loaders.write_clip_calibration(task, out, processor, samples=samples, seed=seed, dataset=dataset,
                                       local_path=None if dataset is not None else cfg["datasets"].get(task))
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    if cfg["builder"] == "hub-t5":
        dataset = loaders.load_local(local, "train") if local else None
        loaders.write_glue_calibration(task, out, tokenizer, samples=samples, seed=seed, dataset=dataset,
                                       local_path=None if dataset is not None else cfg["datasets"].get(task),
                                       max_length=options.get("max_length", 512))
        return
    dataset = loaders.load_local(local, "train") if local else None
    texts, to_text = loaders.llm_calibration_texts(task, "train", cfg["datasets"].get(task), dataset=dataset)
    loaders.write_text_calibration(texts, out, tokenizer, samples=samples, seed=seed, to_text=to_text, task=task,
                                   max_length=options.get("max_length", 512))


# ---------------------------------------------------------------------------------- evaluation

def evaluate(cfg: dict, model_dir, tasks, data_dir, suite_dir) -> dict[str, dict]:
    """Evaluate ``model_dir`` on ``tasks`` with the suite's protocol; the per-task result dicts."""
    suite_dir = Path(suite_dir)
    options = cfg["eval"]
    with tempfile.TemporaryDirectory() as out:
        if cfg["builder"] == "hub-clip":
            from evals.clip_eval import available_cpus, evaluate_clip

            data = {t: p for t in tasks if (p := _split_dir(data_dir, t, "test") or cfg["datasets"].get(t))}
            return evaluate_clip(model_dir, tasks, out, heads_file=suite_dir / "pretrained" / "heads.safetensors",
                                 processor_dir=suite_dir / "pretrained" / "zeroshot", data=data,
                                 batch_size=options.get("batch_size", 128), limit=options.get("limit"), device=_device(cfg),
                                 workers=cfg.get("threads") or available_cpus())
        if cfg["builder"] == "hub-t5":
            from evals.glue import evaluate_glue

            data = {t: p for t in tasks if (p := _split_dir(data_dir, t, "validation") or cfg["datasets"].get(t))}
            return evaluate_glue(model_dir, tasks, out, tokenizer_dir=suite_dir / "pretrained", data=data,
                                 batch_size=options.get("batch_size", 32), limit=options.get("limit"), device=_device(cfg))
        from evals.lm_eval_runner import run_lm_eval, task_mapping

        return run_lm_eval(model_dir, task_mapping(tasks, options.get("chat", False)), out,
                           tokenizer_dir=suite_dir / "pretrained", include_path=options.get("include_path"),
                           batch_size=options.get("batch_size", 8),
                           limit=options.get("limit"), num_fewshot=options.get("num_fewshot"),
                           apply_chat_template=options.get("chat", False),
                           confirm_run_unsafe_code=options.get("allow_code", False), device=_device(cfg))
