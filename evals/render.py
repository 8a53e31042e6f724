"""``python -m epmq render``: a target's tidy metrics into Markdown, LaTeX and HTML tables, or a PNG.

Target kinds (``rules/schemas/config.schema.yaml``):

* ``methods`` (Table 1): pre-trained, fine-tuned, then per merge the fp merged model and each
  quantizer, per task and on average;
* ``alpha`` (Tables 5 and 12, Figure 2): GPTQ and E-PMQ at each anchor strength;
* ``bits`` (Figure 3): GPTQ and E-PMQ at each bit width;
* ``samples`` (Table 6): calibration samples per task, average accuracy and quantization time.

Every quantized row shows its change against the fp merged model of the same merge, as the
paper's arrows do; averages carry their standard error (binomial per task, combined).
"""

from __future__ import annotations

import argparse
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from epmq.io import atomic_write_text

MERGE_LABELS = {
    "simple_average": "Simple Averaging", "task_arithmetic": "Task Arithmetic",
    "ties": "TIES-Merging", "wudi": "WUDI-Merging",
}
METHOD_LABELS = {
    "rtn": "w/ RTN", "gptq": "w/ GPTQ", "awq": "w/ AWQ", "epmq": "w/ E-PMQ", "epmq_fp": "w/ E-PMQ target W* (fp)",
}


@dataclass
class Row:
    label: str
    cells: list[float | None]
    deltas: list[float | None] = field(default_factory=list)
    stderr: float | None = None  # of the last cell (the average)
    section: bool = False  # starts a new block of the table


@dataclass
class Table:
    caption: str
    columns: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)


def _average(values: pd.DataFrame) -> tuple[float, float]:
    """Unweighted mean over tasks and its standard error."""
    mean = float(values["accuracy"].mean())
    stderr = math.sqrt(float((values["stderr"] ** 2).sum())) / len(values)
    return mean, stderr


def _model_row(frame: pd.DataFrame, tasks: list[str], label: str, reference: Row | None = None, **kw) -> Row:
    by_task = frame.set_index("task")["accuracy"]
    missing = [task for task in tasks if task not in by_task]
    if missing:
        raise ValueError(f"row {label!r} lacks tasks {missing}")
    mean, stderr = _average(frame[frame["task"].isin(tasks)])
    cells = [float(by_task[task]) for task in tasks] + [mean]
    deltas = [c - r for c, r in zip(cells, reference.cells)] if reference else [None] * len(cells)
    return Row(label, cells, deltas, stderr, **kw)


def _select(df: pd.DataFrame, **equal) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for key, value in equal.items():
        mask &= df[key].astype(str) == str(value)
    if not mask.any():
        raise ValueError(f"no metrics for {equal}")
    return df[mask]


def _fmt_alpha(alpha) -> str:
    return f"{float(alpha):g}"


def _header_rows(df, tasks):
    pretrained = _model_row(_select(df, method="pretrained"), tasks, "Pre-trained")
    finetuned = _model_row(_select(df, method="finetuned"), tasks, "Fine-tuned")
    return [pretrained, finetuned]


def methods_table(df: pd.DataFrame, spec: dict, tasks: list[str]) -> Table:
    rows = _header_rows(df, tasks)
    for merge in spec["merges"]:
        merged = _model_row(_select(df, merge=merge, method="fp"), tasks, MERGE_LABELS.get(merge, merge), section=True)
        rows.append(merged)
        for method in spec["methods"]:
            rows.append(_model_row(_select(df, merge=merge, method=method), tasks, METHOD_LABELS.get(method, method), merged))
    return Table(spec["caption"], tasks + ["Avg."], rows)


def alpha_table(df: pd.DataFrame, spec: dict, tasks: list[str]) -> Table:
    rows = _header_rows(df, tasks)
    for merge in spec["merges"]:
        merged = _model_row(_select(df, merge=merge, method="fp"), tasks, MERGE_LABELS.get(merge, merge), section=True)
        rows.append(merged)
        rows.append(_model_row(_select(df, merge=merge, method="gptq"), tasks, "w/ GPTQ", merged))
        for alpha in spec["alphas"]:
            frame = df[(df["merge"] == merge) & (df["method"] == "epmq")]
            frame = frame[frame["alpha"].astype(float) == float(alpha)]
            label = "w/o anchor (alpha = 0)" if float(alpha) == 0 else f"w/ E-PMQ (alpha = {_fmt_alpha(alpha)})"
            rows.append(_model_row(frame, tasks, label, merged))
    table = Table(spec["caption"], tasks + ["Avg."], rows)
    if spec["layout"] == "average":
        table = _average_only(table)
    return table


def bits_table(df: pd.DataFrame, spec: dict, tasks: list[str]) -> Table:
    columns = [f"{b}-bit" for b in spec["bits"]]
    rows = []
    for merge in spec["merges"]:
        merged = _model_row(_select(df, merge=merge, method="fp"), tasks, MERGE_LABELS.get(merge, merge), section=True)
        rows.append(Row(merged.label, [merged.cells[-1]] * len(columns), [None] * len(columns), merged.stderr, True))
        for method in spec["methods"]:
            cells, deltas, stderrs = [], [], []
            for bits in spec["bits"]:
                row = _model_row(_select(df, merge=merge, method=method, bits=bits), tasks, "", merged)
                cells.append(row.cells[-1])
                deltas.append(row.deltas[-1])
                stderrs.append(row.stderr)
            rows.append(Row(METHOD_LABELS.get(method, method), cells, deltas, max(stderrs)))
    return Table(spec["caption"], columns, rows, ["Average accuracy over tasks; stderr column: the largest of the row."])


def samples_table(df: pd.DataFrame, spec: dict, tasks: list[str]) -> Table:
    columns = []
    for samples in spec["samples"]:
        columns += [f"Avg. (n={samples})", f"Time s (n={samples})", f"Ratio (n={samples})"]
    rows = []
    for merge in spec["merges"]:
        merged = _model_row(_select(df, merge=merge, method="fp"), tasks, MERGE_LABELS.get(merge, merge), section=True)
        rows.append(Row(merged.label, [merged.cells[-1], None, None] * len(spec["samples"]), [], merged.stderr, True))
        baseline_seconds = {}
        for method in spec["methods"]:
            cells, deltas = [], []
            for samples in spec["samples"]:
                frame = _select(df, merge=merge, method=method, samples=samples)
                row = _model_row(frame, tasks, "", merged)
                seconds = float(frame["quant_seconds"].iloc[0])
                baseline_seconds.setdefault(samples, seconds)
                cells += [row.cells[-1], seconds, seconds / baseline_seconds[samples]]
                deltas += [row.deltas[-1], None, None]
            rows.append(Row(METHOD_LABELS.get(method, method), cells, deltas))
    notes = [f"Time: wall seconds of the whole quantization stage; ratio against {METHOD_LABELS.get(spec['methods'][0])}."]
    return Table(spec["caption"], columns, rows, notes)


def _average_only(table: Table) -> Table:
    rows = [Row(r.label, [r.cells[-1]], [r.deltas[-1]] if r.deltas else [], r.stderr, r.section) for r in table.rows]
    return Table(table.caption, ["Avg."], rows, table.notes)


BUILDERS = {"methods": methods_table, "alpha": alpha_table, "bits": bits_table, "samples": samples_table}


# ------------------------------------------------------------------------------------- writers

def _cell(value, delta, digits=1) -> tuple[str, str]:
    if value is None:
        return "", ""
    text = f"{value:.{digits}f}"
    if delta is None:
        return text, ""
    return text, f"{delta:+.{digits}f}"


def _row_cells(table: Table, row: Row) -> list[tuple[str, str]]:
    cells = []
    for i, value in enumerate(row.cells):
        delta = row.deltas[i] if i < len(row.deltas) else None
        digits = 2 if table.columns[i].startswith(("Time", "Ratio")) else 1
        cells.append(_cell(value, delta, digits))
    return cells


def to_markdown(table: Table) -> str:
    lines = [f"**{table.caption}**", "", "| Method | " + " | ".join(table.columns) + " | ± |",
             "|---|" + "---:|" * (len(table.columns) + 1)]
    for row in table.rows:
        texts = [f"{v} ({d})" if d else v for v, d in _row_cells(table, row)]
        label = f"**{row.label}**" if row.section else row.label
        stderr = f"{row.stderr:.1f}" if row.stderr is not None else ""
        lines.append(f"| {label} | " + " | ".join(texts) + f" | {stderr} |")
    lines += [""] + [f"_{note}_" for note in table.notes]
    lines.append("_Parenthesised: change against the fp merged model. ±: standard error of the last column._")
    return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("#", r"\#")


def to_latex(table: Table) -> str:
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{_tex_escape(table.caption)}}}",
             r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
             "Method & " + " & ".join(_tex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    for row in table.rows:
        if row.section and row is not table.rows[0]:
            lines.append(r"\midrule")
        texts = []
        for value, delta in _row_cells(table, row):
            arrow = ""
            if delta:
                number = float(delta)
                direction = r"\uparrow" if number > 0 else r"\downarrow" if number < 0 else ""
                arrow = r"\,{\scriptsize $" + direction + "$" + f"{abs(number):.1f}" + "}"
            texts.append(value + arrow)
        lines.append(_tex_escape(row.label) + " & " + " & ".join(texts) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["Method", *table.columns, "±"])
    body = []
    for row in table.rows:
        cells = []
        for value, delta in _row_cells(table, row):
            color = "" if not delta else ("#1a7f37" if float(delta) > 0 else "#cf222e" if float(delta) < 0 else "")
            suffix = f' <span style="color:{color};font-size:smaller">({delta})</span>' if delta else ""
            cells.append(f"<td>{value}{suffix}</td>")
        stderr = f"{row.stderr:.1f}" if row.stderr is not None else ""
        style = ' style="border-top:2px solid #888"' if row.section else ""
        body.append(f"<tr{style}><th>{html.escape(row.label)}</th>{''.join(cells)}<td>{stderr}</td></tr>")
    notes = "".join(f"<p><em>{html.escape(n)}</em></p>" for n in table.notes)
    return (f"<html><body><table border=1 cellspacing=0 cellpadding=4><caption>{html.escape(table.caption)}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{notes}</body></html>\n")


# ------------------------------------------------------------------------------------- figures

def plot(df: pd.DataFrame, spec: dict, tasks: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merges = spec["merges"]
    fig, axes = plt.subplots(1, len(merges), figsize=(4.2 * len(merges), 3.4), squeeze=False)
    for ax, merge in zip(axes[0], merges):
        fp = _average(_select(df, merge=merge, method="fp"))[0]
        ax.axhline(fp, color="grey", linestyle=":", label="fp merged")
        if spec["kind"] == "alpha":
            gptq = _average(_select(df, merge=merge, method="gptq"))[0]
            ax.axhline(gptq, color="tab:blue", linestyle="--", label="GPTQ")
            points = []
            for alpha in spec["alphas"]:
                frame = df[(df["merge"] == merge) & (df["method"] == "epmq")]
                points.append((float(alpha), *_average(frame[frame["alpha"].astype(float) == float(alpha)])))
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", color="tab:red", label="E-PMQ")
            ax.set_xscale("symlog", linthresh=min(a for a in xs if a > 0) if any(a > 0 for a in xs) else 1)
            ax.set_xlabel("anchor strength alpha")
        else:
            for method, color in zip(spec["methods"], ["tab:blue", "tab:red", "tab:green", "tab:orange"]):
                stats = [_average(_select(df, merge=merge, method=method, bits=b)) for b in spec["bits"]]
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
    tasks = list(dict.fromkeys(df[df["method"] == "pretrained"]["task"]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.figure:
        plot(df, spec, tasks, args.out_dir / f"{args.target}.png")
        return 0
    table = BUILDERS[spec["kind"]](df, spec, tasks)
    atomic_write_text(args.out_dir / f"{args.target}.md", to_markdown(table))
    atomic_write_text(args.out_dir / f"{args.target}.tex", to_latex(table))
    atomic_write_text(args.out_dir / f"{args.target}.html", to_html(table))
    print(to_markdown(table))
    return 0

