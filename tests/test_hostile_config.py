"""Code through configuration (issue 18): suite YAMLs, task names and paths that would reach a shell
or run code, refused; config edits rerun what reads them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.hostile_helpers import (  # noqa: F401  (fixtures: built, w)
    ROOT, built, refused, w,
)


# ----------------------------------------------------------- code through configuration ----
def _snakemake(config: Path, *targets, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--configfile", str(config),
         "--directory", str(cwd), "--cores", "1", *targets],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )


def _workflow_config(path: Path, suites: dict) -> Path:
    config = {
        "threads": 1,
        "suites": suites,
        "targets": {"t": {"suite": next(iter(suites)), "kind": "methods", "caption": "c",
                          "merges": ["simple_average"], "methods": ["rtn"], "reference_rows": []}},
    }
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_suite_config_path_with_braces_is_refused_by_the_schema(tmp_path):
    evil = tmp_path / "x$(touch${IFS}PWNED).yaml"
    evil.write_text("builder: mini-clip\nsuite: evil\n")
    config = _workflow_config(tmp_path / "config.json", {"evil": {"builder": "mini-clip", "suite_config": str(evil)}})
    result = _snakemake(config, "results/evil/data", cwd=tmp_path)
    assert result.returncode != 0
    assert "does not match '^[^{}]*$'" in result.stdout + result.stderr
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()


@pytest.mark.slow
def test_suite_config_path_cannot_inject_shell(tmp_path):
    evil = tmp_path / "x$(touch PWNED; touch `echo PWNED2`).yaml"
    evil.write_text("builder: mini-clip\nsuite: evil\n")  # valid enough to plan; the job itself then fails
    config = _workflow_config(tmp_path / "config.json", {"evil": {"builder": "mini-clip", "suite_config": str(evil)}})
    result = _snakemake(config, "results/evil/data", cwd=tmp_path)
    assert result.returncode != 0  # the stage refuses the incomplete YAML
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists(), result.stderr
    log = (tmp_path / "logs/evil/suite_data.log").read_text()
    assert "PWNED" in log and "error:" in log  # the name reached the stage as one quoted argument


@pytest.mark.slow
def test_task_names_cannot_inject_shell(tmp_path):
    suite_yaml = tmp_path / "hub-evil.yaml"
    suite_yaml.write_text(textwrap.dedent(f"""
        base: {ROOT / "epmq/suites/paper/llama-3b.yaml"}
        suite: hub-evil
        builder: hub-llama
        experts_table: experts.tsv
        tasks: [math]
        eval_tasks: ["gsm8k$(touch${{IFS}}PWNED)"]
    """))
    config = _workflow_config(tmp_path / "config.json",
                              {"hub-evil": {"builder": "hub-llama", "suite_config": str(suite_yaml)}})
    (tmp_path / "experts.tsv").write_text("suite\trole\ttask\tsource\trevision\tnote\n")
    result = _snakemake(config, "-n", "results/hub-evil/eval/pretrained", cwd=tmp_path)
    assert result.returncode != 0
    assert "are not plain names" in result.stdout + result.stderr
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.slow
def test_suite_named_dot_dot_is_refused_by_the_schema(tmp_path):
    config = _workflow_config(tmp_path / "config.json", {"..": {"builder": "mini-clip"}})
    result = _snakemake(config, "-n", cwd=tmp_path)
    assert result.returncode != 0
    assert "does not match" in result.stdout + result.stderr


@pytest.mark.slow
def test_suite_yaml_edits_rerun_the_jobs_that_read_it(tmp_path):
    base = tmp_path / "base.yaml"
    shutil.copy(ROOT / "epmq/suites/mini-clip8-smoke.yaml", tmp_path / "smoke.yaml")
    shutil.copy(ROOT / "epmq/suites/mini-clip8.yaml", base)
    text = (tmp_path / "smoke.yaml").read_text().replace("base: mini-clip8.yaml", "base: base.yaml")
    (tmp_path / "smoke.yaml").write_text(text)
    config = _workflow_config(tmp_path / "config.json",
                              {"mini": {"builder": "mini-clip", "suite_config": str(tmp_path / "smoke.yaml")}})
    data = tmp_path / "results/mini/data"
    data.mkdir(parents=True)
    future = data.stat().st_mtime + 1000
    os.utime(data, (future, future))
    assert "Nothing to be done" in _snakemake(config, "-n", "results/mini/data", cwd=tmp_path).stdout
    os.utime(base, (future + 10, future + 10))  # the inherited (packaged) defaults are edited
    plan = _snakemake(config, "-n", "results/mini/data", cwd=tmp_path)
    assert "suite_data" in plan.stdout and "base.yaml" in plan.stdout, plan.stdout


def test_config_files_name_the_yaml_its_bases_and_the_experts_table():
    from epmq.suites.base import config_files

    files = [str(path) for path in config_files(ROOT / "epmq/suites/paper/clip-b32-ta8.yaml")]
    assert files[0].endswith("clip-b32-ta8.yaml") and files[-1] == "config/experts.tsv"
    assert any(name.endswith("clip.base.yaml") for name in files)


def test_mini_llm3_expressions_are_data_not_code():
    from epmq.suites.expressions import ExpressionError, check_snippet, evaluate

    assert evaluate("a + b - c", {"a": 3, "b": 4, "c": 1}) == 6
    assert evaluate("c < a + b and not a == 0", {"a": 3, "b": 4, "c": 1}) is True
    for hostile in ["__import__('os').system('touch PWNED')", "().__class__.__base__", "open('x', 'w')",
                    "[x for x in (1,)]", "a ** 10 ** 10", "lambda: 1", "b.real"]:
        with pytest.raises(ExpressionError):
            evaluate(hostile, {"a": 1, "b": 2})
    assert check_snippet('s = "sun"\nprint(s.upper())')
    for hostile in ["import os", "print(().__class__)", "open('PWNED', 'w')", "while True:\n    pass",
                    "def f():\n    pass", "print(range(10 ** 9))", "print(range(1000000000))", "__builtins__"]:
        with pytest.raises(ExpressionError):
            check_snippet(hostile)


def test_a_suite_yaml_answer_cannot_run_code(tmp_path):
    from epmq.suites.base import packaged_config
    from epmq.suites.expressions import ExpressionError
    from epmq.suites.mini_llm3 import MiniLlm3
    from epmq.suites.mini_llm3.data import generate_items

    cfg = MiniLlm3.load_config(packaged_config("mini-llm3"))
    cfg["tasks"]["arith"]["templates"][0]["answer"] = f"open({str(tmp_path / 'PWNED')!r}, 'w')"
    with pytest.raises(ExpressionError, match="Call is not allowed"):
        generate_items(cfg, "arith", 50)
    assert not (tmp_path / "PWNED").exists()


def test_missing_local_model_is_not_taken_for_a_hub_id(w, capsys):
    refused(["quantize", "--model", "m/nonexist", "--method", "rtn", "--out", w / "q2"],
            inputs=[w / "merged"], out=w / "q2", match="--model m/nonexist does not exist", capsys=capsys)


def test_hub_cache_names_cannot_collide_or_escape(tmp_path):
    from epmq.hub.store import HubFetchError, resource_name

    (tmp_path / "a" / "model").mkdir(parents=True)
    (tmp_path / "b" / "model").mkdir(parents=True)
    assert resource_name(str(tmp_path / "a" / "model")) != resource_name(str(tmp_path / "b" / "model"))
    for revision in ["../../../etc", "main/../..", "/abs"]:
        with pytest.raises(HubFetchError, match="not a branch, tag or commit"):
            resource_name("owner/name", revision)
    assert "/" not in resource_name("owner/name", "refs/pr/3")
