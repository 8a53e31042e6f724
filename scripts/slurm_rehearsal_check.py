"""Checks of scripts/slurm-rehearsal.sh: the SLURM run built what the local run built, and every job
went to SLURM with the cluster settings given through the EPMQ_SLURM_* variables.

    python scripts/slurm_rehearsal_check.py --configfile CONFIG --local DIR --cluster DIR
        --cluster-log FILE --sacct FILE --sbatch-calls FILE --account A --partition P --gpu-partition G
        --gpu-model M

- the tables (results/tables/*) are the same files, and each CSV has the same rows once its timing
  column (wall seconds, which no two runs share) is dropped;
- per rule, SLURM ran as many jobs as the SLURM run planned (its log's "Job stats"), except the rules that run on the login
  node (the fetches, LOGIN_RULES) and the target rules (no command), all COMPLETED, under the account; GPU rules in the GPU partition with one GPU of the model, the rest in
  the partition without a GPU;
- every sbatch line of a GPU job asks for its GPU once: `--gpus=<model>:1` and no `--gres`.

Prints the jobs per rule and exits 1 naming the first difference.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections import Counter
from pathlib import Path

import yaml

GPU_RULES = ("merge", "quantize", "evaluate")
LOGIN_RULES = ("hub_data", "hub_pretrained", "hub_expert")  # localrules in rules/experts.smk
TIMING_COLUMNS = ("quant_seconds",)


def table_rows(path: Path) -> list[dict]:
    """A table CSV's rows without the timing columns."""
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return [{key: value for key, value in row.items() if key not in TIMING_COLUMNS} for row in rows]


def compare_tables(local: Path, cluster: Path) -> list[str]:
    local_tables, cluster_tables = local / "results" / "tables", cluster / "results" / "tables"
    names = sorted(p.name for p in local_tables.iterdir())
    problems = []
    if names != sorted(p.name for p in cluster_tables.iterdir()):
        problems.append(f"table files differ: local {names}, SLURM {sorted(p.name for p in cluster_tables.iterdir())}")
    for name in names:
        if name.endswith(".csv") and table_rows(local_tables / name) != table_rows(cluster_tables / name):
            problems.append(f"{name}: the SLURM run's rows differ from the local run's")
    if not any(name.endswith(".csv") for name in names):
        problems.append(f"no tables in {local_tables}")
    return problems


def planned_job_counts(log: str) -> Counter:
    """Snakemake's "Job stats" table of a run's log: jobs per rule (target rules included)."""
    stats = log.split("Job stats:", 1)[1]
    counts = Counter()
    for line in stats.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def sacct_jobs(text: str) -> list[dict]:
    fields = ("id", "comment", "partition", "account", "tres", "state", "exit", "elapsed")
    jobs = [dict(zip(fields, line.split("|"))) for line in text.splitlines() if line.strip()]
    for job in jobs:
        job["rule"] = job["comment"].removeprefix("rule_").split("_wildcards_", 1)[0]
    return jobs


def check_jobs(jobs: list[dict], expected: Counter, target_rules: set, args) -> list[str]:
    problems = []
    ran = Counter(job["rule"] for job in jobs)
    for rule in sorted(set(ran) | set(expected)):
        off_cluster = rule in LOGIN_RULES or rule in target_rules
        if ran[rule] != (0 if off_cluster else expected[rule]):
            problems.append(f"rule {rule}: {ran[rule]} SLURM jobs of {expected[rule]} planned")
    for job in jobs:
        where = f"job {job['id']} ({job['comment']})"
        gpu = job["rule"] in GPU_RULES
        if job["state"] != "COMPLETED":
            problems.append(f"{where}: {job['state']}")
        if job["account"] != args.account:
            problems.append(f"{where}: account {job['account']!r}, not {args.account!r}")
        partition = args.gpu_partition if gpu else args.partition
        if job["partition"] != partition:
            problems.append(f"{where}: partition {job['partition']!r}, not {partition!r}")
        gpus = re.findall(r"gres/gpu(?::([^=,]+))?=(\d+)", job["tres"])
        if gpu and (f"{args.gpu_model}", "1") not in gpus:
            problems.append(f"{where}: no {args.gpu_model} GPU in {job['tres']!r}")
        if not gpu and gpus:
            problems.append(f"{where}: a GPU it does not need ({job['tres']!r})")
    return problems


def check_sbatch_calls(calls: list[str], model: str) -> list[str]:
    problems = []
    for call in calls:
        rule = re.search(r"--comment '?rule_(\w+?)(_wildcards_|'| )", call).group(1)
        if rule in GPU_RULES:
            requests = re.findall(r"--gpus=\S+|--gres=\S+|--gpus-per-\S+", call)
            if requests != [f"--gpus={model}:1"]:
                problems.append(f"sbatch line of a {rule} job asks for GPUs as {requests}: {call[:300]}")
    if not calls:
        problems.append("no sbatch calls in the SLURM run's log")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configfile", type=Path, required=True)
    parser.add_argument("--local", type=Path, required=True)
    parser.add_argument("--cluster", type=Path, required=True)
    parser.add_argument("--cluster-log", type=Path, required=True)
    parser.add_argument("--sacct", type=Path, required=True)
    parser.add_argument("--sbatch-calls", type=Path, required=True)
    parser.add_argument("--account", required=True)
    parser.add_argument("--partition", required=True)
    parser.add_argument("--gpu-partition", required=True)
    parser.add_argument("--gpu-model", required=True)
    args = parser.parse_args(argv)

    jobs = sacct_jobs(args.sacct.read_text())
    expected = planned_job_counts(args.cluster_log.read_text())
    target_rules = {"all", "paper", *yaml.safe_load(args.configfile.read_text())["targets"]}
    ran = Counter(job["rule"] for job in jobs)
    print("rule           planned  SLURM jobs")
    for rule in sorted(expected):
        print(f"{rule:<15} {expected[rule]:>7}  {ran[rule]:>5}")
    print(f"{'total':<15} {sum(expected.values()):>7}  {len(jobs):>5}")
    problems = (compare_tables(args.local, args.cluster) + check_jobs(jobs, expected, target_rules, args)
                + check_sbatch_calls(args.sbatch_calls.read_text().splitlines(), args.gpu_model))
    for problem in problems:
        print(f"slurm-rehearsal: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
