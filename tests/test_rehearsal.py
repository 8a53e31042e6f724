"""The dress rehearsal: `snakemake paper --configfile config/paper-rehearsal.yaml` on hub-faithful fixtures, offline.

Builds every target of config/paper.yaml (shrunk sizes) from a fixture HF_HOME through the real
huggingface_hub / datasets / lm-eval code paths; a rerun has nothing to do. Set
``EPMQ_REHEARSAL_TARGETS`` (space-separated) to rehearse some targets only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _snakemake(work: Path, hf_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
               "--configfile", str(REPO / "config" / "paper-rehearsal.yaml"), "--cores", "2", *args]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=6 * 3600)


@pytest.mark.slow
@pytest.mark.rehearsal
def test_paper_rehearsal_builds_every_target_and_rerun_does_nothing(tmp_path):
    hf_home = tmp_path / "hf"
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "make_hub_fixtures.py"), "--hf-home", str(hf_home)],
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=3600)
    assert made.returncode == 0, made.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    (work / "config").symlink_to(REPO / "config")  # the suite YAMLs name config/experts.tsv relative to the workdir
    targets = os.environ.get("EPMQ_REHEARSAL_TARGETS", "paper").split()
    run = _snakemake(work, hf_home, *targets)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    config = __import__("yaml").safe_load((REPO / "config" / "paper-rehearsal.yaml").read_text())
    names = list(config["targets"]) if targets == ["paper"] else targets
    for target in names:
        assert (work / "results" / "tables" / f"{target}.md").exists(), target
    # what the fetch path had to do against the real layouts is recorded
    store = work / "resources" / "models"
    if (store / "openai--clip-vit-base-patch32@main").exists():
        assert "converted_from_bin" in json.loads((store / "openai--clip-vit-base-patch32@main" / "fetch.json").read_text())
    for record in (work / "results").glob("clip-*/pretrained/fetch.json"):
        assert json.loads(record.read_text())["dropped_nonpersistent_buffers"]
    for record in (work / "results").glob("llama-*/merged/*/merge.json"):
        assert json.loads(record.read_text())["expert_casts"]
    rerun = _snakemake(work, hf_home, *targets, "--dry-run")
    assert rerun.returncode == 0 and "Nothing to be done" in rerun.stdout + rerun.stderr, rerun.stdout[-2000:]
