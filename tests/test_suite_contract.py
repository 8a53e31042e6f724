"""The suite contract (``epmq.suites.base``): every builder resolves to a registered Suite class
implementing it, one YAML reader serves every suite, and a new suite is one class plus one line."""

from __future__ import annotations

import inspect

import pytest
import yaml

from epmq.suites import base
from epmq.suites.base import Suite, builder_of, config_files, load_suite, packaged_config, register_suite, suite_class

CONTRACT = ("load_config", "write_data", "build_pretrained", "build_expert", "write_calibration", "evaluate", "eval_tasks")


@pytest.mark.parametrize("builder", sorted(base.SUITE_MODULES))
def test_every_builder_is_a_suite_class_implementing_the_contract(builder):
    cls = suite_class(builder)
    assert issubclass(cls, Suite) and builder in cls.builders
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves {sorted(cls.__abstractmethods__)} unimplemented"
    for name in CONTRACT:
        assert callable(getattr(cls, name))


@pytest.mark.parametrize("name", ["mini-clip8", "mini-dino", "mini-text4", "mini-llm3", "clip-b32-ta8",
                                  "flan-t5-glue8", "llama-3b"])
def test_packaged_suites_load_through_the_registry(name):
    suite = load_suite(packaged_config(name))
    assert suite.cfg["suite"] == name and suite.cfg["tasks"]
    assert all(isinstance(task, str) for task in suite.eval_tasks())


def test_unknown_builder_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("suite: odd\nbuilder: no-such-builder\ntasks: [a]\n")
    with pytest.raises(ValueError, match="odd.yaml: unknown builder 'no-such-builder'"):
        load_suite(path)


def test_a_new_suite_is_one_class_and_one_registration(tmp_path, monkeypatch):
    monkeypatch.setitem(base.SUITE_MODULES, "toy-suite", __name__)
    monkeypatch.setattr(base, "_SUITES", dict(base._SUITES))

    @register_suite("toy-suite")
    class ToySuite(Suite):
        @classmethod
        def load_config(cls, path):
            from epmq.suites.common import read_suite_yaml

            return read_suite_yaml(path)

        def write_data(self, out): ...
        def build_pretrained(self, out, data_dir=None): ...
        def build_expert(self, pretrained, task, out, data_dir=None): ...
        def write_calibration(self, task, samples, seed, out, data_dir=None, suite_dir=None): ...

        def evaluate(self, model_dir, tasks, data_dir, suite_dir):
            return {task: {"accuracy": 50.0, "stderr": 1.0, "n": 4} for task in tasks}

    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({"suite": "toy", "builder": "toy-suite", "tasks": {"a": {}, "b": {}}}))
    suite = load_suite(path)
    assert isinstance(suite, ToySuite) and suite.eval_tasks() == ["a", "b"]
    assert suite.evaluate("m", ["a"], None, None)["a"]["n"] == 4


def test_base_chain_is_deep_merged_and_the_builder_inherited(tmp_path):
    (tmp_path / "parent.yaml").write_text(yaml.safe_dump(
        {"builder": "hub-t5", "experts_table": "parent.tsv", "eval": {"batch_size": 32, "limit": None}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(
        {"base": "parent.yaml", "suite": "c", "experts_table": "child.tsv", "eval": {"limit": 4}}))
    from epmq.suites.common import read_suite_yaml

    cfg = read_suite_yaml(tmp_path / "child.yaml")
    assert builder_of(tmp_path / "child.yaml") == "hub-t5"
    assert cfg["eval"] == {"batch_size": 32, "limit": 4}  # deep merge: the child keeps the parent's batch size
    files = [path.name for path in config_files(tmp_path / "child.yaml")]
    # the YAMLs read, then the one experts table the resolved config uses (not the overridden parent's)
    assert files == ["child.yaml", "parent.yaml", "child.tsv"]
