"""The second published reference: FusionBench's own numbers, and how the rendered tables show them.

``results/reference/fusionbench_tables.csv`` transcribes the merge tables of tanganke/fusion_bench
``docs/modelpool/clip_vit.md`` (CLIP-ViT-B/32 and ViT-L/14, eight tasks) and
``docs/modelpool/flan-t5_generation.md`` (FLAN-T5-base, full fine-tuning, GLUE) at commit 54c9e8c,
keyed by the paper's table numbers (1, 7, 3) and row/column names; see results/reference/README.md.
"""

import csv
import json
from decimal import Decimal
from pathlib import Path
from statistics import mean

import pytest

from epmq.cli import main

CSV_PATH = Path(__file__).resolve().parents[1] / "results" / "reference" / "fusionbench_tables.csv"
CLIP8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
GLUE = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]
LAYOUT = {
    1: (CLIP8, ["pretrained", "finetuned", "simple_average", "task_arithmetic", "ties", "wudi"]),
    7: (CLIP8, ["pretrained", "finetuned", "simple_average", "task_arithmetic", "ties"]),
    3: (GLUE, ["pretrained", "finetuned", "simple_average", "task_arithmetic", "ties"]),
}

with CSV_PATH.open(newline="") as handle:
    ROWS = list(csv.DictReader(handle))
CELLS = {(int(r["table"]), r["row"], r["column"]): r["value"] for r in ROWS}


def test_layout_is_complete_and_unique():
    assert list(ROWS[0]) == ["table", "setting", "row", "column", "value", "source"]
    expected = {(table, row, column) for table, (tasks, rows) in LAYOUT.items() for row in rows for column in tasks + ["avg"]}
    assert len(CELLS) == len(ROWS) == len(expected) and set(CELLS) == expected
    assert {r["setting"] for r in ROWS} == {""}
    assert {r["source"] for r in ROWS} == {"docs/modelpool/clip_vit.md", "docs/modelpool/flan-t5_generation.md"}


@pytest.mark.parametrize(("table", "row", "column", "value"), [
    (1, "pretrained", "avg", "48.2"), (1, "finetuned", "avg", "90.3"), (1, "simple_average", "avg", "66.5"),
    (1, "task_arithmetic", "avg", "68.0"), (1, "ties", "avg", "72.2"), (1, "wudi", "avg", "84.5"),
    (1, "wudi", "sun397", "68.0"), (1, "wudi", "dtd", "66.6"),
    (7, "pretrained", "avg", "64.6"), (7, "finetuned", "dtd", "85.5"), (7, "ties", "avg", "84.0"),
    (3, "task_arithmetic", "cola", "70.5"), (3, "finetuned", "avg", "86.4"), (3, "ties", "stsb", "78.3"),
])
def test_literal_cells(table, row, column, value):
    assert CELLS[(table, row, column)] == value


def test_averages_are_the_mean_of_the_printed_tasks():
    for table, (tasks, rows) in LAYOUT.items():
        for row in rows:
            values = [float(CELLS[(table, row, task)]) for task in tasks]
            # each task is printed to 0.1, so the mean of the printed values is within 0.05 of the true
            # mean, itself printed to 0.1
            assert abs(mean(values) - float(CELLS[(table, row, "avg")])) <= 0.1 + 1e-9, (table, row)
            assert all(Decimal(CELLS[(table, row, column)]).as_tuple().exponent == -1 for column in tasks + ["avg"])


def test_where_the_paper_and_fusionbench_agree_and_differ():
    paper = {(int(r["table"]), r["row"], r["column"]): r["value"]
             for r in csv.DictReader((CSV_PATH.parent / "paper_tables.csv").open()) if r["setting"] == ""}
    # Table 1's full-precision rows are FusionBench's numbers
    for row in ["pretrained", "finetuned", "simple_average", "task_arithmetic", "ties"]:
        for column in CLIP8 + ["avg"]:
            assert paper[(1, row, column)] == CELLS[(1, row, column)], (row, column)
    # FLAN-T5 task arithmetic: the paper prints CoLA 69.80, FusionBench 70.5
    assert paper[(3, "task_arithmetic", "cola")] == "69.80" and CELLS[(3, "task_arithmetic", "cola")] == "70.5"


def test_rendered_tables_print_fusionbench_under_the_paper(tmp_path):
    def write_eval(model, scores):
        directory = tmp_path / "mini" / "eval" / model
        directory.mkdir(parents=True)
        for task, accuracy in scores.items():
            (directory / f"{task}.json").write_text(json.dumps({"task": task, "accuracy": accuracy, "stderr": 1.0, "n": 100}))
        return directory

    scores = dict.fromkeys(GLUE, 70.0)
    dirs = [write_eval("pretrained", scores), *[write_eval(f"experts/{task}", {task: 80.0}) for task in GLUE],
            write_eval("merged/task_arithmetic", scores), write_eval("quant/task_arithmetic/gptq/w4g128n8", scores)]
    (tmp_path / "mini" / "quant/task_arithmetic/gptq/w4g128n8").mkdir(parents=True)
    (tmp_path / "mini" / "quant/task_arithmetic/gptq/w4g128n8/quantization.json").write_text(json.dumps({"seconds": 1.0}))
    metrics = tmp_path / "t.csv"
    assert main(["aggregate", "--eval-dirs", *map(str, dirs), "--out", str(metrics)]) == 0
    spec = {"suite": "mini", "kind": "methods", "caption": "cap", "layout": "per_task", "merges": ["task_arithmetic"],
            "methods": ["gptq"], "alphas": [0.01], "bits": [4], "samples": [8], "paper_table": 3,
            "reference_rows": ["pretrained"], "paper_settings": {}}
    assert main(["render", "--target", "t3", "--spec", json.dumps(spec), "--metrics", str(metrics),
                 "--out-dir", str(tmp_path / "tables")]) == 0
    lines = (tmp_path / "tables" / "t3.md").read_text().splitlines()
    merged = next(i for i, line in enumerate(lines) if line.startswith("| **Task Arithmetic** |"))
    assert lines[merged + 1].startswith("| _paper_ | _69.8_ |")
    assert lines[merged + 2].startswith("| _FusionBench_ | _70.5_ | _57.8_ |") and lines[merged + 2].endswith("_78.9_ | |")
    gptq = lines.index(next(line for line in lines if line.startswith("| w/ GPTQ |")))
    assert not lines[gptq + 2].startswith("| _FusionBench_")  # FusionBench publishes no quantized rows
    assert any("FusionBench: its own published numbers" in line for line in lines)
    latex = (tmp_path / "tables" / "t3.tex").read_text()
    assert r"\quad\textit{FusionBench} & \textit{70.5}" in latex
    assert "<td>FusionBench</td><td>70.5</td>" in (tmp_path / "tables" / "t3.html").read_text()
