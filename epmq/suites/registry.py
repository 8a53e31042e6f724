"""Which module builds and evaluates a suite: dispatch on the suite YAML's ``builder`` key.

Every suite module has the same contract (used by ``python -m epmq suite`` and
``python -m epmq evaluate``, and through them by the workflow):

    load_config(path) -> cfg                      cfg["suite"], cfg["tasks"] (name -> spec), cfg["config_path"]
    write_data_cache(cfg, out_dir)                raw data, prepared once
    pretrain(cfg, out_dir, data_dir)              the model that is merged (HF directory)
    finetune(cfg, pretrained_dir, task, out_dir, data_dir)   one expert, same tensor names
    write_calibration(cfg, task, samples, seed, out_file, data_dir[, suite_dir])
    evaluate(cfg, model_dir, tasks, data_dir, suite_dir) -> {task: {accuracy, stderr, n, ...}}

and optionally ``eval_tasks(cfg)`` when models are evaluated on other tasks than the experts'
(the LLM benchmarks).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from types import ModuleType

import yaml

BUILDERS = {
    "mini-clip": "epmq.suites.mini_clip",
    "mini-text": "epmq.suites.mini_text4",
    "mini-llm": "epmq.suites.mini_llm3",
    "mini-dino": "epmq.suites.mini_dino",
    "hub-clip": "epmq.suites.hub",
    "hub-t5": "epmq.suites.hub",
    "hub-llama": "epmq.suites.hub",
}
PACKAGE = Path(__file__).resolve().parent


def builder_of(path: str | Path) -> str:
    """The ``builder`` of a suite YAML, following ``base:`` files (mini-clip when none says)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if "builder" in raw:
        return raw["builder"]
    if "base" in raw:
        return builder_of(path.parent / raw["base"])
    return "mini-clip"


def suite_module(path: str | Path) -> ModuleType:
    builder = builder_of(path)
    if builder not in BUILDERS:
        raise ValueError(f"{path}: unknown builder {builder!r}; known: {sorted(BUILDERS)}")
    return importlib.import_module(BUILDERS[builder])


def load_suite(path: str | Path) -> tuple[ModuleType, dict]:
    """(the suite's module, its validated config)."""
    module = suite_module(path)
    return module, module.load_config(path)


def config_files(path: str | Path) -> list[Path]:
    """Every file a suite's configuration is read from: its YAML, the ``base:`` YAMLs it inherits
    (packaged defaults included) and the experts table it names. The workflow declares them as
    inputs, so editing any of them reruns what depends on them."""
    path = Path(path)
    files, seen = [], set()
    while path.resolve() not in seen:
        seen.add(path.resolve())
        files.append(path)
        raw = yaml.safe_load(path.read_text()) or {}
        if isinstance(raw.get("experts_table"), str):
            files.append(Path(raw["experts_table"]))  # relative to the workflow directory, as epmq.hub reads it
        if not isinstance(raw.get("base"), str):
            break
        path = path.parent / raw["base"]
    return list(dict.fromkeys(files))


def eval_tasks(module: ModuleType, cfg: dict) -> list[str]:
    return list(module.eval_tasks(cfg)) if hasattr(module, "eval_tasks") else list(cfg["tasks"])


def packaged_config(name: str) -> Path:
    """The suite YAML shipped in the package for suite ``name`` (``epmq/suites[/paper]/<name>.yaml``)."""
    for candidate in (PACKAGE / f"{name}.yaml", PACKAGE / "paper" / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    raise KeyError(f"no packaged suite config named {name!r}")


def call_with_supported(function, *args, **optional):
    """Call ``function`` with the optional keyword arguments its signature accepts."""
    accepted = inspect.signature(function).parameters
    return function(*args, **{key: value for key, value in optional.items() if key in accepted})
