"""A target's tidy metrics as a :class:`Table` of rows, one builder per target kind (``python -m epmq render``).

Target kinds (``rules/schemas/config.schema.yaml``):

* ``methods`` (Tables 1, 3, 4, 7-11): reference rows (pre-trained, fine-tuned), then per suite and
  merge the fp merged model and each quantizer, per task and on average;
* ``suites`` (Table 2): the same rows, one average column per suite;
* ``alpha`` (Tables 5 and 12, Figure 2): GPTQ and E-PMQ at each anchor strength;
* ``bits`` (Figure 3): GPTQ and E-PMQ at each bit width;
* ``samples`` (Table 6): calibration samples per task, average accuracy and quantization time.

Every quantized row shows its change against the fp merged model of the same merge, as the
paper's arrows do; averages carry their standard error (binomial per task, combined). With
``paper_table`` set, each row is followed by the published numbers of the same cells: the paper's
(``results/reference/paper_tables.csv``) and, for the merges FusionBench publishes (Tables 1, 3
and 7's fp rows), FusionBench's (``results/reference/fusionbench_tables.csv``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from epmq.catalog import method_classes


MERGE_LABELS = {
    "simple_average": "Simple Averaging", "task_arithmetic": "Task Arithmetic",
    "ties": "TIES-Merging", "wudi": "WUDI-Merging",
}
#: each registered quantization method's row label (its class's ``label``)
METHOD_LABELS = {name: method.label for name, method in method_classes().items()}
#: what the epmq_fp row is, printed under every table that has it
RELAXATION_NOTE = (
    "E-PMQ's sequential continuous relaxation: every linear replaced by its unrounded E-PMQ target W*, "
    "each W* computed on the inputs produced by the unrounded W* layers before it; not the E-PMQ model "
    "minus its rounding, whose later layers see the outputs of rounded layers."
)
REFERENCE_LABELS = {"pretrained": "Pre-trained", "finetuned": "Fine-tuned"}
PAPER_TABLES = Path(__file__).resolve().parents[1] / "results" / "reference" / "paper_tables.csv"
#: second published reference: FusionBench's own numbers for the same experts and merges
SECOND_REFERENCES = {"FusionBench": PAPER_TABLES.with_name("fusionbench_tables.csv")}


@dataclass
class Row:
    label: str
    cells: list[float | None]
    deltas: list[float | None] = field(default_factory=list)
    stderr: float | None = None  # of the last cell (the average)
    section: bool = False  # starts a new block of the table
    paper: list[float | None] = field(default_factory=list)  # published values of the same cells
    others: dict[str, list[float | None]] = field(default_factory=dict)  # other references' values


@dataclass
class Table:
    caption: str
    columns: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)


def _published_cells(path: Path, table: int) -> dict[tuple[str, str, str], float]:
    with path.open() as handle:
        return {(record["setting"], record["row"], record["column"]): float(record["value"])
                for record in csv.DictReader(handle) if int(record["table"]) == table}


class PaperNumbers:
    """Published cells of one paper table: ``get(setting, row, column)``; ``others`` gives the
    same cells from the second references (:data:`SECOND_REFERENCES`), where they publish them."""

    def __init__(self, table: int | None, path: Path = PAPER_TABLES, second: dict[str, Path] | None = None):
        self.cells: dict[tuple[str, str, str], float] = {}
        self.second: dict[str, dict[tuple[str, str, str], float]] = {}
        if table is None:
            return
        self.cells = _published_cells(path, table)
        if not self.cells:
            raise ValueError(f"{path} has no cells of table {table}")
        for name, other in (SECOND_REFERENCES if second is None else second).items():
            self.second[name] = _published_cells(other, table)

    def others(self, setting: str, key: str | None, columns: list[str]) -> dict[str, list[float | None]]:
        """``{reference: values}`` of the second references that publish any of these cells."""
        rows = {name: [None if key is None else cells.get((setting, key, column)) for column in columns]
                for name, cells in self.second.items()}
        return {name: values for name, values in rows.items() if any(value is not None for value in values)}

    def __bool__(self) -> bool:
        return bool(self.cells)

    def get(self, setting: str, row: str | None, column: str) -> float | None:
        return None if row is None else self.cells.get((setting, row, column))

    def row(self, setting: str, key: str | None, columns: list[str]) -> list[float | None]:
        return [self.get(setting, key, column) for column in columns] if self else []


def task_average(values: pd.DataFrame) -> tuple[float, float]:
    """Unweighted mean over tasks and its standard error (tasks without one count as 0)."""
    mean = float(values["accuracy"].mean())
    errors = pd.to_numeric(values["stderr"], errors="coerce").fillna(0.0)
    return mean, math.sqrt(float((errors**2).sum())) / len(values)


def metrics_where(df: pd.DataFrame, **equal) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for key, value in equal.items():
        if key == "alpha":
            mask &= pd.to_numeric(df["alpha"], errors="coerce") == float(value)
        else:
            mask &= df[key].astype(str) == str(value)
    if not mask.any():
        raise ValueError(f"no metrics for {equal}")
    return df[mask]


def _model_row(frame: pd.DataFrame, tasks: list[str], label: str, reference: Row | None = None, **kw) -> Row:
    by_task = frame.set_index("task")["accuracy"]
    missing = [task for task in tasks if task not in by_task]
    if missing:
        raise ValueError(f"row {label!r} lacks tasks {missing}")
    mean, stderr = task_average(frame[frame["task"].isin(tasks)])
    cells = [float(by_task[task]) for task in tasks] + [mean]
    deltas = [c - r for c, r in zip(cells, reference.cells)] if reference else [None] * len(cells)
    return Row(label, cells, deltas, stderr, **kw)


def suite_tasks(df: pd.DataFrame, suite: str) -> list[str]:
    return list(dict.fromkeys(df[(df["suite"] == suite) & (df["method"] == "fp")]["task"]))


def spec_suites(spec: dict) -> list[str]:
    return spec["suite"] if isinstance(spec["suite"], list) else [spec["suite"]]


def _setting(spec: dict, suite: str) -> str:
    return (spec.get("paper_settings") or {}).get(suite, "")


def _fmt_alpha(alpha) -> str:
    return f"{float(alpha):g}"


def _reference_rows(df, spec, suite, tasks, paper, columns) -> list[Row]:
    rows = []
    for kind in spec["reference_rows"]:
        row = _model_row(metrics_where(df, suite=suite, method=kind), tasks, REFERENCE_LABELS[kind])
        row.paper = paper.row(_setting(spec, suite), kind, columns)
        row.others = paper.others(_setting(spec, suite), kind, columns)
        rows.append(row)
    return rows


def methods_table(df: pd.DataFrame, spec: dict, paper: PaperNumbers) -> Table:
    suites = spec_suites(spec)
    rows, columns = [], None
    for suite in suites:
        tasks = suite_tasks(df, suite)
        if columns not in (None, tasks + ["Avg."]):
            raise ValueError(f"suites of one per-task table must share their tasks: {suites}")
        columns = tasks + ["Avg."]
        keys = tasks + ["avg"]
        setting = _setting(spec, suite)
        if len(suites) > 1:
            rows.append(Row(f"{suite}", [None] * len(columns), section=True))
        rows += _reference_rows(df, spec, suite, tasks, paper, keys)
        for merge in spec["merges"]:
            merged = _model_row(metrics_where(df, suite=suite, merge=merge, method="fp"), tasks, MERGE_LABELS.get(merge, merge),
                                section=True, paper=paper.row(setting, merge, keys), others=paper.others(setting, merge, keys))
            rows.append(merged)
            for method in spec["methods"]:
                row = _model_row(metrics_where(df, suite=suite, merge=merge, method=method), tasks,
                                 METHOD_LABELS.get(method, method), merged)
                row.paper = paper.row(setting, f"{merge}/{method}", keys)
                row.others = paper.others(setting, f"{merge}/{method}", keys)
                rows.append(row)
    return Table(spec["caption"], columns, rows, [RELAXATION_NOTE] if "epmq_fp" in spec["methods"] else [])


def suites_table(df: pd.DataFrame, spec: dict, paper: PaperNumbers) -> Table:
    suites = spec_suites(spec)
    columns = list(suites)

    def row_over_suites(label, keys_of, reference=None, **select):
        cells, stderrs, published = [], [], []
        for suite in suites:
            frame = metrics_where(df, suite=suite, **select)
            mean, stderr = task_average(frame[frame["task"].isin(suite_tasks(df, suite))])
            cells.append(mean)
            stderrs.append(stderr)
            published.append(paper.get(_setting(spec, suite), keys_of, "avg"))
        deltas = [c - r for c, r in zip(cells, reference.cells)] if reference else [None] * len(cells)
        return Row(label, cells, deltas, max(stderrs), paper=published if paper else [])

    rows = [row_over_suites(REFERENCE_LABELS[kind], kind, method=kind) for kind in spec["reference_rows"]]
    for merge in spec["merges"]:
        merged = row_over_suites(MERGE_LABELS.get(merge, merge), merge, merge=merge, method="fp")
        merged.section = True
        rows.append(merged)
        for method in spec["methods"]:
            rows.append(row_over_suites(METHOD_LABELS.get(method, method), f"{merge}/{method}", merged, merge=merge, method=method))
    notes = ["Average accuracy over each suite's tasks; stderr column: the largest of the row."]
    notes += [RELAXATION_NOTE] if "epmq_fp" in spec["methods"] else []
    return Table(spec["caption"], columns, rows, notes)


def alpha_table(df: pd.DataFrame, spec: dict, paper: PaperNumbers) -> Table:
    suite = spec_suites(spec)[0]
    tasks = suite_tasks(df, suite)
    keys = tasks + ["avg"]
    rows = _reference_rows(df, spec, suite, tasks, paper, keys)
    for merge in spec["merges"]:
        merged = _model_row(metrics_where(df, suite=suite, merge=merge, method="fp"), tasks, MERGE_LABELS.get(merge, merge),
                            section=True, paper=paper.row(merge, merge, keys))
        rows.append(merged)
        gptq = _model_row(metrics_where(df, suite=suite, merge=merge, method="gptq"), tasks, "w/ GPTQ", merged)
        gptq.paper = paper.row(merge, f"{merge}/gptq", keys)
        rows.append(gptq)
        for alpha in spec["alphas"]:
            frame = metrics_where(df, suite=suite, merge=merge, method="epmq", alpha=alpha)
            label = "w/o anchor (alpha = 0)" if float(alpha) == 0 else f"w/ E-PMQ (alpha = {_fmt_alpha(alpha)})"
            row = _model_row(frame, tasks, label, merged)
            row.paper = paper.row(merge, f"{merge}/epmq-alpha{_fmt_alpha(alpha)}", keys)
            rows.append(row)
    table = Table(spec["caption"], tasks + ["Avg."], rows)
    return _average_only(table) if spec["layout"] == "average" else table


def bits_table(df: pd.DataFrame, spec: dict, paper: PaperNumbers) -> Table:
    suite = spec_suites(spec)[0]
    tasks = suite_tasks(df, suite)
    columns = [f"{b}-bit" for b in spec["bits"]]
    rows = []
    for merge in spec["merges"]:
        merged = _model_row(metrics_where(df, suite=suite, merge=merge, method="fp"), tasks, MERGE_LABELS.get(merge, merge))
        rows.append(Row(merged.label, [merged.cells[-1]] * len(columns), [None] * len(columns), merged.stderr, True))
        for method in spec["methods"]:
            cells, deltas, stderrs = [], [], []
            for bits in spec["bits"]:
                row = _model_row(metrics_where(df, suite=suite, merge=merge, method=method, bits=bits), tasks, "", merged)
                cells.append(row.cells[-1])
                deltas.append(row.deltas[-1])
                stderrs.append(row.stderr)
            rows.append(Row(METHOD_LABELS.get(method, method), cells, deltas, max(stderrs)))
    return Table(spec["caption"], columns, rows, ["Average accuracy over tasks; stderr column: the largest of the row."])


def samples_table(df: pd.DataFrame, spec: dict, paper: PaperNumbers) -> Table:
    suite = spec_suites(spec)[0]
    tasks = suite_tasks(df, suite)
    columns = []
    for samples in spec["samples"]:
        columns += [f"Avg. (n={samples})", f"Time s (n={samples})", f"Ratio (n={samples})"]

    def published(key):
        return [paper.get(str(n), key, column) for n in spec["samples"] for column in ("avg", "time_s", "ratio")] if paper else []

    rows = []
    for merge in spec["merges"]:
        merged = _model_row(metrics_where(df, suite=suite, merge=merge, method="fp"), tasks, MERGE_LABELS.get(merge, merge))
        rows.append(Row(merged.label, [merged.cells[-1], None, None] * len(spec["samples"]), [], merged.stderr, True,
                        published(merge)))
        baseline_seconds = {}
        for method in spec["methods"]:
            cells, deltas = [], []
            for samples in spec["samples"]:
                frame = metrics_where(df, suite=suite, merge=merge, method=method, samples=samples)
                row = _model_row(frame, tasks, "", merged)
                seconds = float(frame["quant_seconds"].iloc[0])
                baseline_seconds.setdefault(samples, seconds)
                cells += [row.cells[-1], seconds, seconds / baseline_seconds[samples]]
                deltas += [row.deltas[-1], None, None]
            rows.append(Row(METHOD_LABELS.get(method, method), cells, deltas, paper=published(f"{merge}/{method}")))
    notes = [f"Time: wall seconds of the whole quantization stage; ratio against {METHOD_LABELS.get(spec['methods'][0])}."]
    return Table(spec["caption"], columns, rows, notes)


def _average_only(table: Table) -> Table:
    rows = [Row(r.label, [r.cells[-1]], [r.deltas[-1]] if r.deltas else [], r.stderr, r.section, r.paper[-1:])
            for r in table.rows]
    return Table(table.caption, ["Avg."], rows, table.notes)


BUILDERS = {"methods": methods_table, "suites": suites_table, "alpha": alpha_table, "bits": bits_table,
            "samples": samples_table}
