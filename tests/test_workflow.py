"""The Snakemake DAG: lint, dry runs, and the offline end-to-end smoke run (config/smoke.yaml)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def snakemake(*args, cwd, timeout=1800):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_lint_is_clean():
    out = snakemake("--lint", cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Congratulations" in out.stdout + out.stderr


@pytest.mark.slow
def test_default_config_plans_every_target(tmp_path):
    # an empty working directory: outputs already built in the checkout would leave nothing to plan
    out = snakemake("--configfile", str(ROOT / "config" / "config.yaml"), "--directory", str(tmp_path),
                    "-n", "--quiet", "rules", cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for rule in ("suite_pretrain", "suite_finetune", "merge", "quantize", "evaluate", "aggregate", "render", "plot"):
        assert rule in out.stdout, rule


@pytest.mark.slow
def test_paper_config_plans_every_table_and_figure():
    out = snakemake("paper", "--configfile", str(ROOT / "config" / "paper.yaml"), "-n", "--quiet", "rules", cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    counts = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    # 9 suites (6 CLIP, FLAN-T5, two Llama), fetched on the login node; 100 experts in all.
    assert counts["hub_pretrained"] == 9 and counts["hub_data"] == 9 and counts["hub_expert"] == 100
    assert counts["render"] == 14 and counts["plot"] == 2  # tables 1-12 and figures 2-3
    assert counts["quantize"] > 100 and counts["evaluate"] > counts["quantize"]
    lint = snakemake("--lint", "--configfile", str(ROOT / "config" / "paper.yaml"), cwd=ROOT)
    assert lint.returncode == 0 and "Congratulations" in lint.stdout + lint.stderr


@pytest.mark.slow
def test_smoke_run_builds_every_table_reruns_nothing_and_matches_warm_starts(tmp_path):
    config = str(ROOT / "config" / "smoke.yaml")
    out = snakemake("--configfile", config, "--directory", str(tmp_path), "--cores", "2", cwd=ROOT, timeout=3600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    tables = tmp_path / "results" / "tables"
    for target in ("table_1", "table_5", "figure_2", "figure_3", "table_6", "table_3", "table_4", "dino_table_1"):
        for suffix in ("csv", "md", "tex", "html"):
            assert (tables / f"{target}.{suffix}").stat().st_size > 0, (target, suffix)
    assert (tables / "figure_2.png").read_bytes()[:4] == b"\x89PNG"
    assert (tables / "figure_3.png").read_bytes()[:4] == b"\x89PNG"

    rows = list(csv.DictReader((tables / "table_1.csv").open()))
    assert {row["method"] for row in rows} >= {"pretrained", "finetuned", "fp", "rtn", "gptq", "awq", "epmq", "epmq_fp"}
    assert all(math.isfinite(float(row["accuracy"])) and 0 <= float(row["accuracy"]) <= 100 for row in rows)
    markdown = (tables / "table_1.md").read_text()
    assert "w/ E-PMQ" in markdown and "w/ GPTQ" in markdown
    cells = [cell.strip() for line in markdown.splitlines() if line.startswith("| ") and "---" not in line
             for cell in line.strip("|").split("|")[1:-1]]
    assert cells and all(cell for cell in cells), "every table cell is filled"
    for target, suite in (("table_3", "mini-text4-smoke"), ("table_4", "mini-llm3-smoke"), ("dino_table_1", "mini-dino-smoke")):
        rows = list(csv.DictReader((tables / f"{target}.csv").open()))
        assert {row["suite"] for row in rows} == {suite}
        assert {row["method"] for row in rows} >= {"fp", "gptq", "awq", "epmq"}
        assert all(math.isfinite(float(row["accuracy"])) for row in rows)
    assert "a tiny random Llama built from config stands in" in (tables / "table_4.md").read_text()  # the suite's table_note
    timing = list(csv.DictReader((tables / "table_6.csv").open()))
    assert all(float(row["quant_seconds"]) > 0 for row in timing if row["method"] in ("gptq", "epmq"))

    suite = tmp_path / "results" / "mini-clip8-smoke"
    quantized = json.loads(next((suite / "quant").glob("task_arithmetic/epmq-a*/w4g32n16/quantization.json")).read_text())
    assert quantized["method"] == "epmq" and quantized["provenance"]["torch"]
    assert all(len(task["sample_indices"]) == 16 for task in quantized["tasks"])
    metrics = json.loads(next((suite / "eval" / "merged" / "ties").glob("*.json")).read_text())
    assert "provenance" in metrics and metrics["n"] > 0
    assert (tmp_path / "logs").is_dir() and (tmp_path / "benchmarks").is_dir()

    again = snakemake("--configfile", config, "--directory", str(tmp_path), "-n", cwd=ROOT)
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr

    # The same DAG with warm starts (make main's way, epmq/warm.py), its server in the jobs' working
    # directory: every checkpoint, record and table identical to the cold build's.
    warm = tmp_path / "warm"
    warm.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "epmq.warm", *SNAKEMAKE, "--configfile", config, "--cores", "2"],
                         cwd=warm, env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "warm start: torch and" in out.stderr and "warm start off" not in out.stderr
    declined = [path for path in (warm / "logs").rglob("*.log") if "warm start declined" in path.read_text()]
    assert all("pretrain" in path.name for path in declined), declined  # only the jobs on both cores
    compared = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_builds.py"), str(tmp_path / "results"),
                               str(warm / "results")], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout[-4000:]
    assert compared.stdout.startswith("identical: compared") and ".safetensors" in compared.stdout
