"""The experts table (``config/experts.tsv``): which pretrained model and which expert per task
each paper suite fetches, from where (hub id ``owner/name`` or a local folder) and at which revision."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

EXPERTS_TABLE = Path("config/experts.tsv")
COLUMNS = ("suite", "role", "task", "source", "revision", "note")
ROLES = ("pretrained", "expert")


@dataclass(frozen=True)
class ModelEntry:
    """One row of ``config/experts.tsv``."""

    suite: str
    role: str  # pretrained | expert
    task: str  # "-" for the pretrained model
    source: str  # hub id owner/name, or a local folder
    revision: str
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.suite} {self.role}" + ("" if self.role == "pretrained" else f" {self.task}")

    @property
    def placeholder(self) -> bool:
        return self.note.lower().startswith("placeholder")


def read_experts_table(path: str | os.PathLike = EXPERTS_TABLE, suite: str | None = None) -> list[ModelEntry]:
    """Rows of the experts table (``#`` lines are comments), checked; only ``suite``'s when given.

    Each suite must have exactly one pretrained row and unique expert tasks.
    """
    path = Path(path)
    with path.open(newline="") as handle:
        lines = [line for line in handle if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(lines, delimiter="\t")
    if tuple(reader.fieldnames or ())[: len(COLUMNS) - 1] != COLUMNS[:-1]:
        raise ValueError(f"{path}: header must be {' '.join(COLUMNS)} (tab-separated), got {reader.fieldnames}")
    entries = []
    for number, row in enumerate(reader, start=2):
        values = {key: (row.get(key) or "").strip() for key in COLUMNS}
        if values["role"] not in ROLES:
            raise ValueError(f"{path} row {number}: role must be one of {ROLES}, got {values['role']!r}")
        if not values["source"] or not values["suite"] or not values["task"]:
            raise ValueError(f"{path} row {number}: suite, task and source are required")
        entries.append(ModelEntry(**{**values, "revision": values["revision"] or "main"}))
    suites = {entry.suite for entry in entries}
    for name in suites:
        rows = [entry for entry in entries if entry.suite == name]
        pretrained = [entry for entry in rows if entry.role == "pretrained"]
        if len(pretrained) != 1:
            raise ValueError(f"{path}: suite {name} has {len(pretrained)} pretrained rows (needs exactly 1)")
        tasks = [entry.task for entry in rows if entry.role == "expert"]
        if len(tasks) != len(set(tasks)):
            raise ValueError(f"{path}: suite {name} lists a task twice")
    if suite is not None:
        entries = [entry for entry in entries if entry.suite == suite]
        if not entries:
            raise ValueError(f"{path}: no rows for suite {suite!r} (suites: {', '.join(sorted(suites))})")
    return entries
