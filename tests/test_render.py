import csv
import json
import math

import pytest

from epmq.cli import main

TASKS = ["a", "b"]
SPEC = {"suite": "s", "kind": "methods", "caption": "cap", "layout": "per_task",
        "merges": ["task_arithmetic"], "methods": ["gptq", "epmq"], "alphas": [0.01], "bits": [4], "samples": [8],
        "paper_table": None, "reference_rows": ["pretrained", "finetuned"], "paper_settings": {}}


def write_eval(root, model, scores, seconds=None):
    directory = root / "s" / "eval" / model
    directory.mkdir(parents=True)
    for task, accuracy in scores.items():
        (directory / f"{task}.json").write_text(json.dumps({"task": task, "accuracy": accuracy, "stderr": 1.0, "n": 100}))
    if seconds is not None:
        quant = root / "s" / model
        quant.mkdir(parents=True)
        (quant / "quantization.json").write_text(json.dumps({"seconds": seconds}))
    return directory


@pytest.fixture
def metrics(tmp_path):
    dirs = [
        write_eval(tmp_path, "pretrained", {"a": 40.0, "b": 50.0}),
        write_eval(tmp_path, "experts/a", {"a": 90.0}),
        write_eval(tmp_path, "experts/b", {"b": 80.0}),
        write_eval(tmp_path, "merged/task_arithmetic", {"a": 70.0, "b": 60.0}),
        write_eval(tmp_path, "quant/task_arithmetic/gptq/w4g128n8", {"a": 65.0, "b": 61.0}, seconds=2.0),
        write_eval(tmp_path, "quant/task_arithmetic/epmq-a0.01/w4g128n8", {"a": 75.0, "b": 66.0}, seconds=3.0),
    ]
    out = tmp_path / "tables" / "t.csv"
    assert main(["aggregate", "--eval-dirs", *map(str, dirs), "--out", str(out)]) == 0
    return out


def test_aggregate_parses_models_and_reads_timings(metrics):
    rows = list(csv.DictReader(metrics.open()))
    assert len(rows) == 10
    epmq = [r for r in rows if r["method"] == "epmq"]
    assert {r["alpha"] for r in epmq} == {"0.01"} and {r["bits"] for r in epmq} == {"4"}
    assert {r["quant_seconds"] for r in epmq} == {"3.000"}
    assert {r["method"] for r in rows} == {"pretrained", "finetuned", "fp", "gptq", "epmq"}


def test_methods_table_shows_changes_against_the_fp_merge(metrics, tmp_path):
    assert main(["render", "--target", "t", "--spec", json.dumps(SPEC), "--metrics", str(metrics),
                 "--out-dir", str(tmp_path / "tables")]) == 0
    markdown = (tmp_path / "tables" / "t.md").read_text()
    assert "| w/ E-PMQ | 75.0 (+5.0) | 66.0 (+6.0) | 70.5 (+5.5) | 0.7 |" in markdown
    assert "| w/ GPTQ | 65.0 (-5.0) | 61.0 (+1.0) | 63.0 (-2.0) | 0.7 |" in markdown
    assert "| Fine-tuned | 90.0 | 80.0 | 85.0 | 0.7 |" in markdown
    assert f"{math.sqrt(2) / 2:.1f}" == "0.7"  # stderr of a mean of two tasks with stderr 1
    latex = (tmp_path / "tables" / "t.tex").read_text()
    assert r"$\uparrow$5.5" in latex and r"$\downarrow$2.0" in latex
    assert "<table" in (tmp_path / "tables" / "t.html").read_text()


def test_samples_table_reports_time_ratios(metrics, tmp_path):
    spec = {**SPEC, "kind": "samples"}
    assert main(["render", "--target", "t6", "--spec", json.dumps(spec), "--metrics", str(metrics),
                 "--out-dir", str(tmp_path / "tables")]) == 0
    markdown = (tmp_path / "tables" / "t6.md").read_text()
    assert "| w/ E-PMQ | 70.5 (+5.5) | 3.00 | 1.50 |" in markdown


def test_missing_rows_fail_loudly(metrics, tmp_path, capsys):
    spec = {**SPEC, "methods": ["awq"]}
    assert main(["render", "--target", "t", "--spec", json.dumps(spec), "--metrics", str(metrics),
                 "--out-dir", str(tmp_path / "tables")]) == 2
    assert "no metrics for" in capsys.readouterr().err


def test_published_numbers_are_printed_under_our_rows(metrics, tmp_path):
    spec = {**SPEC, "kind": "alpha", "layout": "average", "alphas": [0.01], "paper_table": 5}
    assert main(["render", "--target", "t5", "--spec", json.dumps(spec), "--metrics", str(metrics),
                 "--out-dir", str(tmp_path / "tables")]) == 0
    lines = (tmp_path / "tables" / "t5.md").read_text().splitlines()
    gptq = lines.index("| w/ GPTQ | 63.0 (-2.0) | 0.7 |")
    assert lines[gptq + 1] == "| _paper_ | _65.0_ | |"  # Table 5: Task Arithmetic w/ GPTQ, 65.03
    merged = lines.index("| **Task Arithmetic** | 65.0 | 0.7 |")
    assert lines[merged + 1] == "| _paper_ | _68.0_ | |"


def test_a_suite_table_note_reaches_every_rendered_table(tmp_path):
    note = "fp weights were dequantized from 4-bit blocks of 32"
    dirs = [write_eval(tmp_path, "merged/task_arithmetic", {"a": 70.0, "b": 60.0}),
            write_eval(tmp_path, "quant/task_arithmetic/gptq/w4g128n8", {"a": 65.0, "b": 61.0}, seconds=2.0),
            write_eval(tmp_path, "quant/task_arithmetic/epmq-a0.01/w4g128n8", {"a": 75.0, "b": 66.0}, seconds=3.0)]
    for directory in dirs:
        for file in directory.glob("*.json"):
            file.write_text(json.dumps({**json.loads(file.read_text()), "table_note": note}))
    out = tmp_path / "tables" / "t.csv"
    assert main(["aggregate", "--eval-dirs", *map(str, dirs), "--out", str(out)]) == 0
    assert {row["note"] for row in csv.DictReader(out.open())} == {note}
    spec = {**SPEC, "reference_rows": []}
    assert main(["render", "--target", "t", "--spec", json.dumps(spec), "--metrics", str(out),
                 "--out-dir", str(tmp_path / "tables")]) == 0
    for suffix in ("md", "tex", "html"):
        assert note in (tmp_path / "tables" / f"t.{suffix}").read_text()
