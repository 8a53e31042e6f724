"""``python -m epmq render``: a target's tidy metrics into Markdown, LaTeX and HTML tables, or a PNG.

The rows are built by :mod:`evals.tables` (one builder per target kind), written by
:mod:`evals.table_formats`; the figure is drawn here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from epmq.io import atomic_write_text
from evals.table_formats import to_html, to_latex, to_markdown
from evals.tables import (
    BUILDERS,
    MERGE_LABELS,
    METHOD_LABELS,
    PaperNumbers,
    metrics_where,
    spec_suites,
    suite_tasks,
    task_average,
)


def plot(df: pd.DataFrame, spec: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite = spec_suites(spec)[0]
    tasks = suite_tasks(df, suite)
    df = df[(df["suite"] == suite) & df["task"].isin(tasks)]
    merges = spec["merges"]
    fig, axes = plt.subplots(1, len(merges), figsize=(4.2 * len(merges), 3.4), squeeze=False)
    for ax, merge in zip(axes[0], merges):
        ax.axhline(task_average(metrics_where(df, merge=merge, method="fp"))[0], color="grey", linestyle=":", label="fp merged")
        if spec["kind"] == "alpha":
            ax.axhline(task_average(metrics_where(df, merge=merge, method="gptq"))[0], color="tab:blue", linestyle="--", label="GPTQ")
            points = [(float(a), *task_average(metrics_where(df, merge=merge, method="epmq", alpha=a))) for a in spec["alphas"]]
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", color="tab:red", label="E-PMQ")
            positive = [a for a in xs if a > 0]
            ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
            ax.set_xlabel("anchor strength alpha")
        else:
            for method, color in zip(spec["methods"], ["tab:blue", "tab:red", "tab:green", "tab:orange"]):
                stats = [task_average(metrics_where(df, merge=merge, method=method, bits=b)) for b in spec["bits"]]
                ax.errorbar(spec["bits"], [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o",
                            color=color, label=METHOD_LABELS.get(method, method).removeprefix("w/ "))
            ax.set_xticks(spec["bits"])
            ax.set_xlabel("bits")
        ax.set_title(MERGE_LABELS.get(merge, merge))
        ax.set_ylabel("average accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(spec["caption"], fontsize="small")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True)
    parser.add_argument("--spec", required=True, help="the target's config entry as JSON, defaults filled (the workflow passes it)")
    parser.add_argument("--metrics", required=True, type=Path, help="the target's tidy CSV (python -m epmq aggregate)")
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--figure", action="store_true", help="write {target}.png instead of the tables")


def run(args: argparse.Namespace) -> int:
    spec = json.loads(args.spec)
    df = pd.read_csv(args.metrics, keep_default_na=False)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.figure:
        plot(df, spec, args.out_dir / f"{args.target}.png")
        return 0
    table = BUILDERS[spec["kind"]](df, spec, PaperNumbers(spec.get("paper_table")))
    if "note" in df:
        table.notes += sorted({note for note in df["note"] if note})
    atomic_write_text(args.out_dir / f"{args.target}.md", to_markdown(table))
    atomic_write_text(args.out_dir / f"{args.target}.tex", to_latex(table))
    atomic_write_text(args.out_dir / f"{args.target}.html", to_html(table))
    print(to_markdown(table))
    return 0
