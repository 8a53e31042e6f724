"""Reading a suite YAML: base files, deep merges, include_tasks; the digest ignores where it lies."""

import pytest
import yaml

from epmq.suites.common import config_digest, deep_merge, read_suite_yaml, stable_seed


def test_deep_merge_merges_mappings_and_replaces_lists():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    merged = deep_merge(base, {"a": {"y": [3]}, "c": 4})
    assert merged == {"a": {"x": 1, "y": [3]}, "b": 2, "c": 4}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2}


def test_base_and_include_tasks(tmp_path):
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(
        {"suite": "full", "seed": 0, "calib": {"samples": 256, "max_length": 96},
         "tasks": {"a": {"n": 1}, "b": {"n": 2}, "c": {"n": 3}}, "include_tasks": ["a"]}))
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(
        {"base": "full.yaml", "suite": "small", "calib": {"samples": 8}, "include_tasks": ["c", "b"]}))
    cfg = read_suite_yaml(tmp_path / "small.yaml")
    assert cfg["suite"] == "small" and cfg["calib"] == {"samples": 8, "max_length": 96}
    assert list(cfg["tasks"]) == ["c", "b"]  # the base's own include_tasks does not apply
    assert cfg["config_path"] == str(tmp_path / "small.yaml")
    moved = {**cfg, "config_path": "/elsewhere/small.yaml"}
    assert config_digest(moved) == config_digest(cfg) != config_digest({**cfg, "seed": 1})


def test_bad_suite_yaml_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        read_suite_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"tasks": {"a": {}}, "include_tasks": ["z"]}))
    with pytest.raises(ValueError, match="unknown tasks"):
        read_suite_yaml(tmp_path / "bad.yaml")


def test_stable_seed_depends_on_every_part():
    assert stable_seed(0, "calib", "a") == stable_seed(0, "calib", "a")
    assert len({stable_seed(0, "calib", "a"), stable_seed(1, "calib", "a"), stable_seed(0, "calib", "b")}) == 3
