"""Several stages in one process (``python -m epmq A ... --then B ...``), the workflow jobs that use
it (``evaluate_in_producer``), and calibration sets written per budget (``suite calib --tasks``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from epmq.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "epmq/suites/mini-clip8-smoke.yaml"


def eval_dir(root: Path, model: str, accuracy: float) -> Path:
    folder = root / "results" / "mini-clip8" / "eval" / model
    folder.mkdir(parents=True)
    (folder / "fashion.json").write_text(json.dumps({"task": "fashion", "accuracy": accuracy, "stderr": 1.0, "n": 10}))
    return folder


def test_then_runs_each_stage_in_turn(tmp_path):
    merged, rtn = eval_dir(tmp_path, "merged/ties", 80.0), eval_dir(tmp_path, "experts/fashion", 90.0)
    code = main(["aggregate", "--eval-dirs", str(merged), "--out", str(tmp_path / "a.csv"),
                 "--then", "aggregate", "--eval-dirs", str(merged), str(rtn), "--out", str(tmp_path / "b.csv")])
    assert code == 0
    assert len((tmp_path / "a.csv").read_text().splitlines()) == 2
    assert len((tmp_path / "b.csv").read_text().splitlines()) == 3


def test_a_failing_stage_stops_the_chain(tmp_path, capsys):
    merged = eval_dir(tmp_path, "merged/ties", 80.0)
    code = main(["aggregate", "--eval-dirs", str(tmp_path / "missing"), "--out", str(tmp_path / "a.csv"),
                 "--then", "aggregate", "--eval-dirs", str(merged), "--out", str(tmp_path / "b.csv")])
    assert code == 2
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "b.csv").exists()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--then", "demo"], ["aggregate", "--out", "x.csv", "--then"],
                                  ["aggregate", "--then", "--then", "demo"]])
def test_then_without_a_stage_on_each_side_is_refused(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--then must separate two stages" in err


def test_calibration_folder_refuses_unknown_and_repeated_tasks(tmp_path, capsys):
    for tasks, message in ((["fashion", "nope"], "unknown tasks ['nope']"), (["fashion", "fashion"], "names a task twice")):
        code = main(["suite", "calib", "--suite-config", str(SMOKE), "--tasks", *tasks, "--samples", "4",
                     "--out", str(tmp_path / "calib")])
        assert code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "calib").exists()


# ------------------------------------------------------------------------------- workflow --
def dry_run(tmp_path, *config_files):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                          str(tmp_path), "--configfile", str(ROOT / "config" / "smoke.yaml"), *config_files, "-n", "-p",
                          "table_1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = [block for block in out.stdout.split("\nrule ")[1:]]
    return {rule: [job for job in jobs if job.startswith(f"{rule}:")] for rule in
            ("suite_calib", "suite_finetune", "merge", "quantize", "evaluate")}


@pytest.mark.slow
def test_producers_evaluate_their_models_unless_configured_not_to(tmp_path):
    fused = dry_run(tmp_path)
    assert len(fused["suite_calib"]) == 1  # one budget: every task's set in one job
    quantized = [job for rule in ("suite_finetune", "merge", "quantize") for job in fused[rule]]
    assert quantized and all("--then evaluate" in job and "/eval/" in job.split("output:")[1].split("\n")[0]
                             for job in quantized)
    assert len(fused["evaluate"]) == 1 and "results/mini-clip8-smoke/eval/pretrained" in fused["evaluate"][0]

    (tmp_path / "separate.yaml").write_text("evaluate_in_producer: false\n")  # merged over smoke.yaml
    separate = dry_run(tmp_path, str(tmp_path / "separate.yaml"))
    assert not any("--then" in job for rule in separate.values() for job in rule)
    n_models = 1 + sum(len(separate[rule]) for rule in ("suite_finetune", "merge", "quantize"))
    assert len(separate["evaluate"]) == n_models
