"""The suite contract: what every suite (offline or hub) provides, and the registry that finds it.

A suite turns its YAML into the five things the workflow asks for (paper §5.1 for the protocols):

    Suite.load_config(path) -> cfg          the YAML read by ``read_suite_yaml`` and validated
    suite.write_data(out)                   raw data, prepared once (``suite data``)
    suite.build_pretrained(out, data_dir)   the model that is merged (``suite pretrain``)
    suite.build_expert(pretrained, task, out, data_dir)      one expert, same tensor names
    suite.write_calibration(task, samples, seed, out, data_dir, suite_dir)
    suite.evaluate(model_dir, tasks, data_dir, suite_dir) -> {task: {accuracy, stderr, n, ...}}
    suite.eval_tasks()                      the tasks models are evaluated on (default: the experts')

A suite is one class registered under the YAML's ``builder`` value(s) with ``@register_suite``.
The registry maps each builder to the module that defines its class and imports only that module
(a job pays for the suite it runs, not for every suite): adding a suite is one module plus one line
in ``SUITE_MODULES``.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import yaml

#: builder (the suite YAML's ``builder`` key) -> module defining its Suite class
SUITE_MODULES = {
    "mini-clip": "epmq.suites.mini_clip8",
    "mini-text": "epmq.suites.mini_text4",
    "mini-llm": "epmq.suites.mini_llm3",
    "mini-dino": "epmq.suites.mini_dino",
    "hub-clip": "epmq.suites.hub.clip",
    "hub-t5": "epmq.suites.hub.t5",
    "hub-llama": "epmq.suites.hub.llama",
}
#: the builder of a YAML that names none (the embedded default's)
DEFAULT_BUILDER = "mini-clip"

#: where the packaged suite YAMLs live (``epmq/suites[/paper]/<name>.yaml``)
PACKAGE = Path(__file__).resolve().parent

_SUITES: dict[str, type[Suite]] = {}


class Suite(ABC):
    """One suite, built from its validated config (``cfg``: ``suite``, ``tasks``, ``config_path``, ...)."""

    #: the YAML ``builder`` values this class serves (set by ``register_suite``)
    builders: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: dict):
        self.cfg = cfg

    @classmethod
    @abstractmethod
    def load_config(cls, path: str | os.PathLike) -> dict:
        """The suite YAML at ``path``, read with ``epmq.suites.common.read_suite_yaml`` and validated."""

    @abstractmethod
    def write_data(self, out: str | os.PathLike) -> None:
        """Prepare every split a later job reads, once, into the directory ``out``."""

    @abstractmethod
    def build_pretrained(self, out: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> None:
        """The model that is merged and quantized (trained here, or fetched), as an HF directory."""

    @abstractmethod
    def build_expert(self, pretrained: str | os.PathLike, task: str, out: str | os.PathLike,
                     data_dir: str | os.PathLike | None = None) -> None:
        """The expert of ``task`` (fine-tuned here, or fetched), with the pretrained model's tensor names."""

    @abstractmethod
    def write_calibration(self, task: str, samples: int, seed: int, out: str | os.PathLike,
                          data_dir: str | os.PathLike | None = None,
                          suite_dir: str | os.PathLike | None = None) -> None:
        """``samples`` calibration inputs of ``task``, drawn from its training data only, to ``out``."""

    @abstractmethod
    def evaluate(self, model_dir: str | os.PathLike, tasks: list[str], data_dir: str | os.PathLike | None,
                 suite_dir: str | os.PathLike | None) -> dict[str, dict]:
        """``{task: {"accuracy", "stderr", "n", ...}}`` of the model in ``model_dir`` on ``tasks``."""

    def eval_tasks(self) -> list[str]:
        """The tasks models are evaluated on: the experts' tasks unless the suite says otherwise."""
        return list(self.cfg["tasks"])


def register_suite(*builders: str) -> Callable[[type[Suite]], type[Suite]]:
    """Class decorator: serve the suite YAMLs whose ``builder`` is one of ``builders``."""

    def register(cls: type[Suite]) -> type[Suite]:
        for builder in builders:
            if builder in _SUITES and _SUITES[builder] is not cls:
                raise ValueError(f"suite builder {builder!r} registered twice ({_SUITES[builder].__name__}, {cls.__name__})")
            _SUITES[builder] = cls
        cls.builders = tuple(builders)
        return cls

    return register


def suite_class(builder: str, where: str | os.PathLike = "") -> type[Suite]:
    """The Suite class serving ``builder`` (importing the one module that defines it)."""
    if builder not in _SUITES:
        if builder not in SUITE_MODULES:
            raise ValueError(f"{where}: unknown builder {builder!r}; known: {sorted(SUITE_MODULES)}")
        importlib.import_module(SUITE_MODULES[builder])
    if builder not in _SUITES:
        raise ValueError(f"{where}: module {SUITE_MODULES[builder]} registers no suite for builder {builder!r}")
    return _SUITES[builder]


def builder_of(path: str | os.PathLike) -> str:
    """The ``builder`` of a suite YAML (its ``base:`` chain resolved as everywhere else)."""
    from epmq.suites.common import read_suite_yaml

    return read_suite_yaml(path).get("builder", DEFAULT_BUILDER)


def load_suite(path: str | os.PathLike) -> Suite:
    """The suite a YAML describes, with its validated config as ``.cfg``."""
    cls = suite_class(builder_of(path), path)
    return cls(cls.load_config(Path(path)))


def packaged_config(name: str) -> Path:
    """The suite YAML shipped in the package for suite ``name`` (``epmq/suites[/paper]/<name>.yaml``)."""
    for candidate in (PACKAGE / f"{name}.yaml", PACKAGE / "paper" / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    raise KeyError(f"no packaged suite config named {name!r}")


def config_files(path: str | os.PathLike) -> list[Path]:
    """Every file a suite's configuration is read from: its YAML, the ``base:`` YAMLs it inherits
    (packaged defaults included) and the experts table the resolved configuration names. The
    workflow declares them as inputs, so editing any of them reruns what depends on them."""
    from epmq.suites.common import read_suite_yaml

    path = Path(path)
    files, seen = [], set()
    while path.resolve() not in seen:
        seen.add(path.resolve())
        files.append(path)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw.get("base"), str):
            break
        path = path.parent / raw["base"]
    table = read_suite_yaml(files[0]).get("experts_table")
    if isinstance(table, str):
        files.append(Path(table))  # relative to the workflow directory, as epmq.hub reads it
    return list(dict.fromkeys(files))
