"""Where a build's job-seconds go: start-up (interpreter + imports) against work, per rule.

    python bench/startup.py [--benchmarks benchmarks] [--before DIR] [--suite mini-clip8]
                            [--suite-dir results/mini-clip8] [--repeats 1] [--finetune]

1. Per rule, from Snakemake's benchmark files (``benchmarks/{suite}/...`` and the suite's targets'
   ``benchmarks/tables/...``): jobs, job-seconds (column ``s``), CPU seconds (``cpu_time``);
   ``--before`` adds a second benchmark folder (an earlier build) beside them.
2. Per rule, one real job of its stage (``python -m epmq <stage>``, as the rule calls it, with the
   ``--then evaluate`` of ``evaluate_in_producer`` for fine-tuning, merging and quantizing) on an
   already built suite (``--suite-dir``), outputs in a temporary folder, under
   ``python -X importtime``: its CPU seconds and the top-level modules it imported (lazy imports
   inside the stage included); then a second process that only imports those modules, in that
   order: the job's start-up CPU seconds (interpreter + imports).
3. Per rule: jobs x start-up CPU seconds, and its share of the rule's CPU seconds; the rest is work.
   CPU seconds are compared, not wall seconds: on a shared machine an import's wall time grows with
   the load, its CPU time hardly, so a measurement today compares with benchmark files of another day.

Rules with no measured job (``suite_data``, ``suite_pretrain``: one job each; ``suite_finetune``
without ``--finetune``, 30 s a job) show no start-up columns.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml
from snakemake.utils import validate

from epmq.suites.base import packaged_config

ROOT = Path(__file__).resolve().parents[1]
_IMPORT_LINE = re.compile(r"import time:\s+\d+ \|\s+\d+ \| (\S+)$")  # top level: one space, then the name


def rule_of(path: Path, root: Path) -> str:
    """The rule a benchmark file belongs to: ``{suite}/{rule}[/...].tsv``, ``{suite}/{rule}.tsv`` or
    ``tables/{target}.{rule}.tsv``."""
    parts = path.relative_to(root).parts
    if parts[0] == "tables":
        return path.name.split(".")[-2]
    return parts[1] if len(parts) > 2 else Path(parts[1]).stem


def benchmark_totals(root: Path, suite: str, targets: list[str]) -> dict[str, dict]:
    """Per rule: jobs, job-seconds and CPU seconds of a suite's benchmark files and its targets' tables."""
    files = sorted((root / suite).rglob("*.tsv"))
    files += [path for path in sorted((root / "tables").glob("*.tsv")) if path.name.split(".")[0] in targets]
    totals: dict[str, dict] = defaultdict(lambda: {"jobs": 0, "s": 0.0, "cpu": 0.0})
    for path in files:
        with path.open() as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if not rows:
            continue
        row = rows[-1]  # a rerun appends a line: the last one is the job that made the output
        total = totals[rule_of(path, root)]
        total["jobs"] += 1
        total["s"] += float(row["s"])
        total["cpu"] += float(row["cpu_time"]) if row.get("cpu_time", "NA") != "NA" else 0.0
    return dict(totals)


def top_level_imports(stderr: str) -> list[str]:
    """The modules a process imported at top level, in order, from its ``-X importtime`` output."""
    return [match[1] for line in stderr.splitlines() if (match := _IMPORT_LINE.match(line))]


def run_cpu(argv: list[str]) -> tuple[float, float, str] | str:
    """Wall seconds, CPU seconds (user + system) and stderr of one ``python`` run, or why it failed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        said = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("import time:")]
        return f"exit code {done.returncode}: {said[-1] if said else ''}"
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, done.stderr


def stage_jobs(suite_dir: Path, suite_config: str, config: dict, targets: list[str], tables_dir: Path, tmp: Path,
               finetune: bool) -> dict[str, list[str]]:
    """One real job per rule, as ``rules/*.smk`` calls its stage, with its outputs under ``tmp``; the
    render and plot jobs read the suite's first table and figure target's CSV in ``tables_dir`` (no
    render or plot job for a suite without such a target)."""
    tasks = sorted(path.name for path in (suite_dir / "experts").iterdir())
    experts = [str(suite_dir / "experts" / task) for task in tasks]
    data, common = str(suite_dir / "data"), ["--suite-config", suite_config]
    merged = sorted((suite_dir / "merged").iterdir())[0]
    eval_dirs = sorted({str(path.parent) for path in (suite_dir / "eval").rglob("*.json")})
    table = next((name for name in targets if config["targets"][name]["layout"] != "plot"), None)
    figure = next((name for name in targets if config["targets"][name]["layout"] == "plot"), None)
    def then_evaluate(model: Path, tasks_: list[str]) -> list[str]:  # the rules' evaluate_in_producer
        return ["--then", "evaluate", *common, "--suite-dir", str(suite_dir), "--model", str(model), "--data", data,
                "--threads", "1", "--tasks", *tasks_, "--out-dir", str(tmp / "eval")]

    jobs = {
        "suite_calib": ["-m", "epmq", "suite", "calib", *common, "--data", data, "--tasks", *tasks,
                        "--suite-dir", str(suite_dir), "--samples", "64", "--seed", "0", "--out", str(tmp / "calib")],
        "merge": ["-m", "epmq", "merge", "--method", "simple_average", "--pretrained", str(suite_dir / "pretrained"),
                  "--experts", *experts, "--out", str(tmp / "merged"), *then_evaluate(tmp / "merged", tasks)],
        "quantize": ["-m", "epmq", "quantize", "--model", str(merged), "--method", "rtn", "--bits", "4",
                     "--group-size", "128", "--threads", "1", "--experts", "--calib", "--tasks", "--out", str(tmp / "quant"),
                     *then_evaluate(tmp / "quant", tasks)],
        "evaluate": ["-m", "epmq", "evaluate", *common, "--suite-dir", str(suite_dir), "--model",
                     str(suite_dir / "pretrained"), "--data", data, "--threads", "1", "--tasks", *tasks,
                     "--out-dir", str(tmp / "eval")],
        "aggregate": ["-m", "epmq", "aggregate", "--eval-dirs", *eval_dirs, "--out", str(tmp / "metrics.csv")],
    }
    # a target renders from its own aggregate (the build's results/tables/{target}.csv): the suite's
    # every evaluation in one CSV repeats table cells
    for rule, target, flags in (("render", table, []), ("plot", figure, ["--figure"])):
        if target is not None:
            jobs[rule] = ["-m", "epmq", "render", "--target", target, "--spec", json.dumps(config["targets"][target]),
                          "--metrics", str(tables_dir / f"{target}.csv"), "--out-dir", str(tmp / "tables"), *flags]
    if finetune:
        jobs["suite_finetune"] = ["-m", "epmq", "suite", "finetune", *common, "--data", data, "--pretrained",
                                  str(suite_dir / "pretrained"), "--task", tasks[0], "--threads", "1",
                                  "--out", str(tmp / "expert"), *then_evaluate(tmp / "expert", tasks[:1])]
    return jobs


def measure_startup(jobs: dict[str, list[str]], tmp: Path, repeats: int) -> dict[str, dict]:
    """Per rule, median over ``repeats`` of: its job's wall and CPU seconds, and the CPU seconds of a
    second process that starts the interpreter and imports the same top-level modules in the same
    order, nothing else (its start-up). CPU seconds, unlike wall seconds, barely change with the
    machine's load, so they compare with the benchmark files' ``cpu_time`` of another day."""
    measured = {}
    for rule, argv in jobs.items():
        runs = []
        for _ in range(repeats):
            for path in tmp.iterdir():  # every stage refuses a non-empty output it did not write
                subprocess.run(["rm", "-rf", str(path)], check=True)
            job = run_cpu(["-X", "importtime", *argv])
            if isinstance(job, str):
                runs.append(job)
                break
            modules = top_level_imports(job[2])
            replay = f"import importlib\nfor name in {modules!r}:\n    importlib.import_module(name)"
            startup = run_cpu(["-c", replay])
            runs.append(startup if isinstance(startup, str) else (job[0], job[1], startup[1]))
        failed = [run for run in runs if isinstance(run, str)]
        if failed:  # e.g. a figure whose models this build did not evaluate
            print(f"  {rule}: not measured ({failed[0]})", file=sys.stderr)
            continue
        wall, cpu, startup = (statistics.median(run[i] for run in runs) for i in range(3))
        measured[rule] = {"wall": wall, "cpu": cpu, "startup": startup}
        print(f"  {rule}: {' '.join(argv[2:5])} ...: wall {wall:.2f} s, CPU {cpu:.2f} s, start-up CPU {startup:.2f} s",
              file=sys.stderr)
    return measured


def _share(startup: float, cpu: float) -> str:
    """Start-up's share of a rule's benchmarked CPU seconds; "n/a" where the benchmark shows less CPU
    than start-up alone (Snakemake samples a job's CPU time about once a second and misses most of
    a job shorter than that)."""
    return f"{startup / cpu:.0%}" if cpu >= startup > 0 else "n/a"


def report(after: dict, before: dict | None, measured: dict[str, dict]) -> str:
    """Per rule: the benchmark totals (and an earlier build's), the measured job, and jobs x start-up
    CPU seconds against the rule's CPU seconds."""
    head, rule_line = "| rule | jobs | job-s | CPU-s |", "|---|---:|---:|---:|"
    if before is not None:
        head += " jobs before | job-s before | CPU-s before |"
        rule_line += "---:|---:|---:|"
    head += " one job: CPU-s | its start-up CPU-s | start-up CPU-s, all jobs | start-up share of CPU-s |"
    rule_line += "---:|---:|---:|---:|"
    lines = [head, rule_line]
    rules = sorted(set(after) | set(before or {}), key=lambda r: -(after.get(r, {}).get("cpu") or 0))
    blank = {"jobs": 0, "s": 0.0, "cpu": 0.0}
    startup_total = 0.0
    for rule in [*rules, "total"]:
        if rule == "total":
            a = {key: sum(t[key] for t in after.values()) for key in blank}
            b = {key: sum(t[key] for t in before.values()) for key in blank} if before is not None else None
        else:
            a, b = after.get(rule, blank), (before or {}).get(rule, blank)
        line = f"| {rule} | {a['jobs']} | {a['s']:.1f} | {a['cpu']:.1f} |"
        if before is not None:
            line += f" {b['jobs']} | {b['s']:.1f} | {b['cpu']:.1f} |"
        if rule == "total":
            line += f" | | {startup_total:.1f} | {_share(startup_total, a['cpu'])} |"
        elif rule in measured:
            m = measured[rule]
            startup = m["startup"] * a["jobs"]
            startup_total += startup
            line += f" {m['cpu']:.2f} | {m['startup']:.2f} | {startup:.1f} | {_share(startup, a['cpu'])} |"
        else:
            line += " | | | |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "benchmarks", help="Snakemake benchmark folder")
    parser.add_argument("--before", type=Path, default=None, help="a second benchmark folder (an earlier build)")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--suite", default="mini-clip8")
    parser.add_argument("--suite-dir", type=Path, default=None, help="the built suite (default results/{suite})")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each job (median)")
    parser.add_argument("--finetune", action="store_true", help="also run one fine-tuning job (30 s on 2 cores)")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    validate(config, str(ROOT / "rules" / "schemas" / "config.schema.yaml"))  # fills the defaults, as the Snakefile does
    suite_dir = (args.suite_dir or ROOT / "results" / args.suite).resolve()
    for folder in [args.benchmarks / args.suite, suite_dir / "eval", *([args.before / args.suite] if args.before else [])]:
        if not folder.is_dir():
            print(f"error: {folder} is not a folder (build the suite's targets first)", file=sys.stderr)
            return 2
    targets = [name for name, spec in config["targets"].items()
               if args.suite in (spec["suite"] if isinstance(spec["suite"], list) else [spec["suite"]])]
    suite_config = config["suites"][args.suite].get("suite_config") or str(packaged_config(args.suite))
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        jobs = stage_jobs(suite_dir, suite_config, config, targets, suite_dir.parent / "tables", Path(tmp), args.finetune)
        measured = measure_startup(jobs, Path(tmp), args.repeats)
    after = benchmark_totals(args.benchmarks, args.suite, targets)
    before = benchmark_totals(args.before, args.suite, targets) if args.before else None
    print(report(after, before, measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
