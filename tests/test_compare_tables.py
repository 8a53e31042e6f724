"""scripts/compare_tables.py: the before/after check of rendered table CSVs."""

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_tables.py"
HEADER = ["suite", "model", "merge", "method", "alpha", "bits", "group_size", "samples", "task",
          "accuracy", "stderr", "n", "quant_seconds", "note"]


def write(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


def row(task, accuracy, seconds="1.0", method="gptq"):
    return ["s", f"quant/ta/{method}", "task_arithmetic", method, "", "4", "128", "256", task, accuracy, "1", "100", seconds, ""]


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_timings_are_ignored_and_identical_tables_pass(tmp_path):
    before = write(tmp_path / "a.csv", [row("x", "50.0", "1.0"), row("y", "60.0", "2.0")])
    after = write(tmp_path / "b.csv", [row("y", "60.0", "9.0"), row("x", "50.0", "7.5")])
    result = run(before, after, "--identical")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 differ, 0 on one side only" in result.stdout


def test_a_moved_cell_and_a_missing_cell_fail_identical(tmp_path):
    before = write(tmp_path / "a.csv", [row("x", "50.0"), row("y", "60.0"), row("x", "40.0", method="rtn")])
    after = write(tmp_path / "b.csv", [row("x", "50.0"), row("y", "61.0")])
    result = run(before, after, "--identical")
    assert result.returncode == 1
    assert "avg  55.00 ->  55.50 (+0.50); 1/2 cells differ, largest |change| 1.00" in result.stdout
    assert "1 differ, 1 on one side only" in result.stdout
    assert run(before, after).returncode == 0


def test_missing_file_is_exit_2(tmp_path):
    result = run(tmp_path / "none.csv", tmp_path / "none.csv")
    assert result.returncode == 2 and "no such table CSV" in result.stderr
