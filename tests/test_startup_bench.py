"""bench/startup.py's bookkeeping, and the stages that must start without importing torch."""

import subprocess
import sys
from pathlib import Path

from bench.startup import benchmark_totals, rule_of, top_level_imports

ROOT = Path(__file__).resolve().parents[1]
HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def write_benchmark(path: Path, *seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(f"{s}\t0:00:01\t1\t1\t1\t1\t0\t0\t50\t{s / 2}\n" for s in seconds))


def test_rules_are_read_from_the_benchmark_paths(tmp_path):
    assert rule_of(tmp_path / "s" / "quantize" / "ties" / "awq" / "w4g128n256.tsv", tmp_path) == "quantize"
    assert rule_of(tmp_path / "s" / "suite_pretrain.tsv", tmp_path) == "suite_pretrain"
    assert rule_of(tmp_path / "tables" / "table_1.aggregate.tsv", tmp_path) == "aggregate"


def test_totals_count_the_last_run_of_each_job_and_only_the_suites_targets(tmp_path):
    write_benchmark(tmp_path / "s" / "evaluate" / "merged" / "ties.tsv", 9.0, 4.0)  # rerun: the last line counts
    write_benchmark(tmp_path / "s" / "evaluate" / "pretrained.tsv", 3.0)
    write_benchmark(tmp_path / "s" / "suite_data.tsv", 2.0)
    write_benchmark(tmp_path / "other" / "evaluate" / "pretrained.tsv", 100.0)
    write_benchmark(tmp_path / "tables" / "table_1.render.tsv", 1.5)
    write_benchmark(tmp_path / "tables" / "table_3.render.tsv", 50.0)
    totals = benchmark_totals(tmp_path, "s", ["table_1"])
    assert totals == {
        "evaluate": {"jobs": 2, "s": 7.0, "cpu": 3.5},
        "suite_data": {"jobs": 1, "s": 2.0, "cpu": 1.0},
        "render": {"jobs": 1, "s": 1.5, "cpu": 0.75},
    }


def test_top_level_imports_are_read_in_order_without_their_submodules():
    stderr = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       100 |        100 |   _io\n"
        "import time:       200 |       2500 | torch\n"
        "import time:        50 |        500 |     torch._C\n"
        "import time:        10 |       1000 | numpy\n"
        "some log line\n"
    )
    assert top_level_imports(stderr) == ["torch", "numpy"]


def test_aggregate_starts_without_torch():
    # render takes its row labels from the method registry (one home for a method's label), which
    # imports the methods and torch with them; aggregate needs neither.
    code = "import sys, evals.aggregate; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "False"


def test_each_rule_runs_its_stage_with_outputs_in_the_temporary_folder(tmp_path):
    import yaml
    from snakemake.utils import validate

    from bench.startup import stage_jobs
    from epmq.cli import STAGES

    suite = tmp_path / "suite"
    for folder in ["experts/a", "experts/b", "merged/ties", "eval/merged/ties", "data", "pretrained"]:
        (suite / folder).mkdir(parents=True)
    (suite / "eval/merged/ties/a.json").write_text("{}")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(config, str(ROOT / "rules" / "schemas" / "config.schema.yaml"))
    targets = [name for name, spec in config["targets"].items() if spec["suite"] == "mini-clip8"]
    jobs = stage_jobs(suite, "suite.yaml", config, targets, tmp_path / "tables", tmp_path / "out", finetune=True)
    assert {"suite_calib", "suite_finetune", "merge", "quantize", "evaluate", "aggregate", "render", "plot"} == set(jobs)
    for rule, argv in jobs.items():
        assert argv[:2] == ["-m", "epmq"] and argv[2] in STAGES, rule
        outputs = [argv[i + 1] for i, word in enumerate(argv) if word in ("--out", "--out-dir")]
        assert outputs and all(out.startswith(str(tmp_path / "out")) for out in outputs), rule
    assert str(suite / "eval/merged/ties") in jobs["aggregate"]
    # a target renders from its own aggregate, not from every evaluation of the suite
    assert jobs["render"][jobs["render"].index("--metrics") + 1] == str(tmp_path / "tables" / "table_1.csv")
    assert jobs["plot"][jobs["plot"].index("--metrics") + 1] == str(tmp_path / "tables" / "figure_2.csv")
    # a suite without a figure target (mini-text4) gets no plot job
    text_targets = [name for name, spec in config["targets"].items() if spec["suite"] == "mini-text4"]
    text_jobs = stage_jobs(suite, "suite.yaml", config, text_targets, tmp_path / "tables", tmp_path / "out", finetune=False)
    assert "plot" not in text_jobs and "render" in text_jobs
