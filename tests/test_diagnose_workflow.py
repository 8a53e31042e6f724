"""The workflow's diagnose target: every offline suite's task-arithmetic merge, outside the default targets."""

import re

import pytest

from tests.test_workflow import ROOT, snakemake


def planned(out: str) -> dict[str, int]:
    stats = out.split("Job stats:")[1]
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", stats, flags=re.M)}


@pytest.mark.slow
def test_diagnose_offline_plans_one_diagnosis_per_offline_suite(tmp_path):
    out = snakemake("--configfile", str(ROOT / "config" / "config.yaml"), "--directory", str(tmp_path),
                    "-n", "diagnose_offline", "--quiet", "rules", cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    jobs = planned(out.stdout)
    # mini-clip8, mini-dino, mini-text4, mini-llm3: task_arithmetic only
    assert jobs["diagnose"] == 4 and jobs["merge"] == 4
    assert jobs["quantize"] == 12  # rtn, gptq, epmq at each suite's default grid


@pytest.mark.slow
def test_default_targets_do_not_diagnose(tmp_path):
    out = snakemake("--configfile", str(ROOT / "config" / "config.yaml"), "--directory", str(tmp_path),
                    "-n", "--quiet", "rules", cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "diagnose" not in planned(out.stdout)
