"""What a built DAG cost, per rule, from the ``benchmark:`` files Snakemake wrote under ``benchmarks/``.

For one suite (``benchmarks/{suite}/...``) and, optionally, some targets (their aggregate, render
and plot files under ``benchmarks/tables/``), prints per rule (quantize also per method) the number
of jobs, their wall seconds and their CPU seconds, and the totals. On a shared machine wall times
grow with the load while CPU seconds barely do, so the last line divides the CPU seconds by the
cores: the wall time the same jobs need on an otherwise idle machine with that many cores, as a
lower bound (it assumes every core busy throughout; pretraining uses them all, the other jobs one
thread each). Jobs forked by a warm server (``make main``, epmq/warm.py) do their work outside the
process Snakemake measures: their wall seconds are right, their CPU seconds are the client's (the
report says which rules), and ``--pending`` projections need a build with ``WARM=``.

With ``--pending``, a build still running or not finished: a Snakemake dry run of the targets lists
the jobs left (by their benchmark files), each is costed at the mean CPU seconds of the jobs of its
group measured so far (of its rule where no job of the group has run yet), and the projection of
the whole build is printed.

    python bench/dag_cost.py --suite mini-dino [--targets dino_table_1 ...] [--pending] [--cores 2] [--benchmarks benchmarks]

Several suites (``--suite a b ...``) are summed per rule, e.g. a paper DAG's nine suites.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
from collections import defaultdict
from pathlib import Path


def read_benchmark(path: Path) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one Snakemake benchmark file (its last repeat)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: no benchmark row")
    row = rows[-1]
    return float(row["s"]), float(row["cpu_time"])


def job_group(relative: Path) -> str:
    """The rule of a benchmark path under ``benchmarks/{suite}/`` (quantize: and its method)."""
    parts = relative.with_suffix("").parts
    if parts[0] == "quantize" and len(parts) >= 3:
        return f"quantize {parts[2].partition('-a')[0]}"
    return parts[0]


def suite_costs(root: Path, suite: str, targets: list[str], built: bool = True) -> dict[str, list[tuple[float, float]]]:
    """Measured ``(wall, CPU)`` seconds per group; ``built``: every target must have been rendered."""
    suite_dir = root / suite
    if not suite_dir.is_dir():
        raise FileNotFoundError(f"{suite_dir}: no benchmarks of suite {suite!r} (build it first)")
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for path in sorted(suite_dir.rglob("*.tsv")):
        groups[job_group(path.relative_to(suite_dir))].append(read_benchmark(path))
    for target in targets:
        files = sorted((root / "tables").glob(f"{target}.*.tsv"))
        if not files and built:
            raise FileNotFoundError(f"{root / 'tables'}: no benchmark of target {target!r}")
        for path in files:
            groups[path.suffixes[-2].lstrip(".")].append(read_benchmark(path))
    return groups


def pending_groups(dry_run: str, suite: str, tables: bool = True) -> list[str]:
    """The group of every job a Snakemake dry run lists with a benchmark file of ``suite`` or (``tables``)
    of a table."""
    groups = []
    for line in dry_run.splitlines():
        path = line.strip().removeprefix("benchmark:").strip()
        if not line.strip().startswith("benchmark:"):
            continue
        parts = Path(path).parts
        if parts[1] == suite:
            groups.append(job_group(Path(*parts[2:])))
        elif parts[1] == "tables" and tables:
            groups.append(Path(path).suffixes[-2].lstrip("."))
    return groups


def projection(groups: dict[str, list[tuple[float, float]]], pending: list[str]) -> tuple[float, list[str]]:
    """CPU seconds of the pending jobs at their group's (else their rule's) measured mean; and the uncosted groups."""
    def mean(samples):
        return sum(c for _, c in samples) / len(samples)

    total, uncosted = 0.0, []
    for group in pending:
        rule = group.split()[0]
        same_rule = [s for name, samples in groups.items() if name.split()[0] == rule for s in samples]
        if groups.get(group):
            total += mean(groups[group])
        elif same_rule:
            total += mean(same_rule)
        else:
            uncosted.append(group)
    return total, uncosted


#: below this CPU/wall share a rule's jobs were warm-started (epmq/warm.py): their work ran in a child
#: of the warm server, outside the process tree Snakemake's benchmark measures
WARM_CPU_SHARE = 0.2


def report(groups: dict[str, list[tuple[float, float]]], cores: int) -> str:
    lines = [f"{'rule':<18} {'jobs':>5} {'wall s':>9} {'cpu s':>9}"]
    total_wall = total_cpu = 0.0
    jobs = 0
    for name in sorted(groups):
        wall = sum(w for w, _ in groups[name])
        cpu = sum(c for _, c in groups[name])
        lines.append(f"{name:<18} {len(groups[name]):>5} {wall:>9.1f} {cpu:>9.1f}")
        total_wall, total_cpu, jobs = total_wall + wall, total_cpu + cpu, jobs + len(groups[name])
    lines.append(f"{'total':<18} {jobs:>5} {total_wall:>9.1f} {total_cpu:>9.1f}")
    lines.append(f"CPU seconds / {cores} cores = {total_cpu / cores:.0f} s ({total_cpu / cores / 60:.1f} min): "
                 "the idle-machine wall time of these jobs, a lower bound")
    warm = [name for name, samples in groups.items() if sum(c for _, c in samples) < WARM_CPU_SHARE * sum(w for w, _ in samples)]
    if warm:
        lines.append(f"note: {', '.join(sorted(warm))}: CPU under {WARM_CPU_SHARE:.0%} of wall, so forked by a warm "
                     "server (make main): a benchmark file then measures the client, not the job; read wall seconds, "
                     "or build with WARM= for CPU seconds")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True, nargs="+", help="one suite, or several summed per rule")
    parser.add_argument("--targets", nargs="*", default=[])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--benchmarks", type=Path, default=Path("benchmarks"))
    parser.add_argument("--pending", action="store_true", help="cost the jobs a dry run of --targets still lists")
    args = parser.parse_args(argv)
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    try:
        for index, suite in enumerate(args.suite):
            # the targets' table jobs are counted once, with the first suite
            costs = suite_costs(args.benchmarks, suite, args.targets if index == 0 else [], built=not args.pending)
            for name, samples in costs.items():
                groups[name] += samples
    except (FileNotFoundError, ValueError, KeyError) as err:
        parser.exit(2, f"dag_cost: {err}\n")
    print(report(groups, args.cores))
    if args.pending:
        if not args.targets:
            parser.exit(2, "dag_cost: --pending needs --targets\n")
        dry = subprocess.run(["snakemake", "--dry-run", "--profile", "profiles/local", *args.targets],
                             capture_output=True, text=True)
        if dry.returncode != 0:
            parser.exit(2, f"dag_cost: the dry run failed: {dry.stderr.strip().splitlines()[-1:]}\n")
        pending = [group for index, suite in enumerate(args.suite)
                   for group in pending_groups(dry.stdout, suite, tables=index == 0)]
        cpu, uncosted = projection(groups, pending)
        done = sum(c for samples in groups.values() for _, c in samples)
        print(f"pending: {len(pending)} jobs, {cpu:.0f} CPU s at the measured means"
              + (f" (not costed, none measured: {sorted(set(uncosted))})" if uncosted else ""))
        print(f"whole build: {done + cpu:.0f} CPU s / {args.cores} cores = {(done + cpu) / args.cores / 60:.1f} min "
              "on an idle machine, a lower bound")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
