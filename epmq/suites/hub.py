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

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from epmq.io import atomic_output_dir
from epmq.suites.base import Suite, register_suite

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
    """Load lm-eval's tasks once so their datasets sit in the HF cache for offline compute nodes.

    lm-eval's humaneval/mbpp task modules load ``code_eval`` when imported, which refuses unless
    ``HF_ALLOW_CODE_EVAL=1``: set here (as in evaluation) only when the suite says ``allow_code: true``.
    """
    from lm_eval.tasks import TaskManager, get_task_dict

    from evals.lm_eval_runner import code_eval_environment, task_mapping

    include = cfg["eval"].get("include_path")
    manager = TaskManager(include_path=include) if include else TaskManager()
    with code_eval_environment(cfg["eval"].get("allow_code", False)):
        get_task_dict(list(task_mapping(eval_tasks(cfg), cfg["eval"].get("chat", False)).values()), manager)


def _split_dir(data_dir, task, split) -> Path | None:
    path = Path(data_dir) / task / split if data_dir else None
    return path if path and path.exists() else None


# ---------------------------------------------------------------------------------- the models

def _store(cfg: dict) -> Path:
    """Where fetched models live, one folder per model and revision, shared by every suite."""
    return Path(cfg.get("models_dir", "resources/models"))


def _record(store: Path, out: Path, **extra) -> None:
    """``out/fetch.json``: the store's fetch record, where it was linked from, and what was changed."""
    from epmq.hub import FETCH_RECORD
    from epmq.io import atomic_write_json, provenance

    record = json.loads((store / FETCH_RECORD).read_text())
    atomic_write_json(out / FETCH_RECORD, {**record, "store": str(store.resolve()), **extra, "linked_by": provenance()})


def pretrain(cfg: dict, out: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> None:
    """Fetch the pretrained model; for CLIP keep the vision tower and build the zero-shot heads."""
    from epmq.hub import FETCH_RECORD, fetch_to_store, link_model, split_clip
    from evals.clip_eval import build_heads

    entry, experts = _entries(cfg)
    label = f"{cfg['suite']} pretrained"
    if cfg["builder"] == "hub-clip":
        from epmq.convert import is_open_clip

        local = Path(entry.source.removeprefix("local:")).expanduser()
        if local.exists() and is_open_clip(local):
            raise ValueError(f"{cfg['experts_table']}: the pretrained row of suite {cfg['suite']} is an open_clip checkpoint "
                             f"({entry.source}); it must be a full HF CLIPModel (its text tower builds the zero-shot heads). "
                             "Experts may be open_clip")
    store = fetch_to_store(entry.source, entry.revision, _store(cfg), label=label)
    if cfg["builder"] != "hub-clip":
        with atomic_output_dir(out) as staging:
            link_model(store, staging, skip=(FETCH_RECORD,))
            _record(store, staging, dropped_nonpersistent_buffers=[])
        return
    first_expert = experts[next(iter(cfg["tasks"]))]
    like = fetch_to_store(first_expert.source, first_expert.revision, _store(cfg),
                          label=f"{cfg['suite']} expert {first_expert.task}")
    with atomic_output_dir(out) as staging:
        # split into a folder beside the output (same filesystem), then move its parts in
        vision, zeroshot = split_clip(store, staging / "split", like=like)
        for item in vision.iterdir():
            shutil.move(str(item), staging / item.name)
        shutil.move(str(zeroshot), staging / "zeroshot")
        shutil.rmtree(staging / "split")
        split = json.loads((staging / "clip_split.json").read_text())
        _record(store, staging, dropped_nonpersistent_buffers=split["dropped_nonpersistent_buffers"])
        build_heads(staging / "zeroshot", list(cfg["tasks"]), staging / "heads.safetensors", device=_device(cfg))


def finetune(cfg: dict, pretrained: str | os.PathLike, task: str, out: str | os.PathLike,
             data_dir: str | os.PathLike | None = None) -> None:
    """Fetch task ``task``'s expert into the store and link it into ``out``, with the pretrained model's tensor names.

    Only parameters and persistent buffers are compared: a non-persistent buffer the expert's file
    carries (CLIP's ``position_ids`` in checkpoints older than transformers 4.31) is dropped and
    listed in ``out/fetch.json``. An expert whose weights need no change is hard-linked, not copied.

    An open_clip expert (recognised by its keys, ``visual.conv1.weight``; a local ``.pt``/``.pth``
    state dict, or safetensors from a folder or the hub) is converted to the pretrained tower's
    layout (``epmq.convert``; ``convert.json`` records it, and what the pretrained tower lacks,
    such as open_clip's ``visual.proj``, is dropped and listed there).
    """
    from safetensors.torch import save_file

    from epmq.convert import is_open_clip, open_clip_checkpoint_to_hf
    from epmq.hub import (
        FETCH_RECORD,
        align_checkpoint,
        fetch_to_store,
        is_local_source,
        is_nonpersistent,
        link_model,
        nonpersistent_buffers,
    )
    from epmq.io import LazyCheckpoint

    _, experts = _entries(cfg)
    entry = experts[task]
    local = Path(entry.source.removeprefix("local:")).expanduser()
    if is_local_source(entry.source) and local.exists() and is_open_clip(local):
        # a state-dict file that fetch (folders of safetensors) does not take: converted beside the output
        with atomic_output_dir(out) as staging:
            open_clip_checkpoint_to_hf(local, staging / "converted", like=pretrained)
            for item in (staging / "converted").iterdir():
                shutil.move(str(item), staging / item.name)
            (staging / "converted").rmdir()
        return
    store = fetch_to_store(entry.source, entry.revision, _store(cfg), label=f"{cfg['suite']} expert {task}")
    if is_open_clip(store):
        with atomic_output_dir(out) as staging:
            open_clip_checkpoint_to_hf(store, staging / "converted", like=pretrained)
            for item in (staging / "converted").iterdir():
                shutil.move(str(item), staging / item.name)
            (staging / "converted").rmdir()
            _record(store, staging, dropped_nonpersistent_buffers=[], converted_from="open_clip")
        return
    checkpoint = LazyCheckpoint(store)
    buffers = nonpersistent_buffers(store) | nonpersistent_buffers(pretrained)
    dropped = [key for key in checkpoint.keys() if is_nonpersistent(key, buffers)]
    kept = [key for key in checkpoint.keys() if key not in dropped]
    with atomic_output_dir(out) as staging:
        if not dropped and set(kept) == set(LazyCheckpoint(pretrained).keys()):
            link_model(store, staging, skip=(FETCH_RECORD,))
            _record(store, staging, dropped_nonpersistent_buffers=[], aligned=False)
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
        _record(store, staging, dropped_nonpersistent_buffers=dropped, aligned=aligned)


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


@register_suite("hub-clip", "hub-t5", "hub-llama")
class HubSuite(Suite):
    """The paper-scale suites: models and data fetched from the hub (or local copies)."""

    @classmethod
    def load_config(cls, path):
        return load_config(path)

    def write_data(self, out):
        write_data_cache(self.cfg, out)

    def build_pretrained(self, out, data_dir=None):
        pretrain(self.cfg, out, data_dir)

    def build_expert(self, pretrained, task, out, data_dir=None):
        finetune(self.cfg, pretrained, task, out, data_dir)

    def write_calibration(self, task, samples, seed, out, data_dir=None, suite_dir=None):
        write_calibration(self.cfg, task, samples, seed, out, data_dir, suite_dir=suite_dir)

    def evaluate(self, model_dir, tasks, data_dir, suite_dir):
        return evaluate(self.cfg, model_dir, tasks, data_dir, suite_dir)

    def eval_tasks(self):
        return eval_tasks(self.cfg)
