"""Compare two builds of the same table: which cells moved, and by how much.

Reads the tidy CSVs that ``python -m epmq render`` writes (``results/tables/<target>.csv``) and
matches rows on everything that names a cell (suite, model, merge, method, alpha, bits, group size,
samples, task). Accuracies and test counts are compared; ``quant_seconds`` is a timing and is
ignored. Prints one line per row of the table (its average and the largest per-task change), then a
summary line. ``--identical`` makes any difference, or a cell present on one side only, exit 1:
the check that a refactor left every number unchanged.

    python scripts/compare_tables.py BEFORE.csv AFTER.csv [--identical]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

CELL_KEYS = ("suite", "model", "merge", "method", "alpha", "bits", "group_size", "samples", "task")
ROW_KEYS = CELL_KEYS[:-1]


def read_cells(path: Path) -> dict[tuple[str, ...], tuple[float, str]]:
    """(cell key) -> (accuracy, n) of one tidy table CSV."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = [key for key in (*CELL_KEYS, "accuracy", "n") if rows and key not in rows[0]]
    if missing:
        raise SystemExit(f"{path}: not a rendered table CSV (no column {', '.join(missing)})")
    return {tuple(row[key] for key in CELL_KEYS): (float(row["accuracy"]), row["n"]) for row in rows}


def row_label(key: tuple[str, ...]) -> str:
    fields = dict(zip(ROW_KEYS, key))
    parts = [fields["merge"] or fields["model"], fields["method"]]
    parts += [f"{name}={fields[name]}" for name in ("alpha", "bits", "group_size", "samples") if fields[name]]
    return " ".join(part for part in parts if part)


def compare(before: dict, after: dict) -> tuple[list[str], int, int]:
    """Report lines, number of cells that differ, number of cells on one side only."""
    only = sorted(set(before) ^ set(after))
    rows: dict[tuple[str, ...], list[tuple[float, float, bool]]] = defaultdict(list)
    for key in sorted(set(before) & set(after)):
        (acc_b, n_b), (acc_a, n_a) = before[key], after[key]
        rows[key[:-1]].append((acc_b, acc_a, acc_b != acc_a or n_b != n_a))
    lines, differing = [], 0
    for row, cells in rows.items():
        changed = sum(flag for _, _, flag in cells)
        differing += changed
        avg_b = sum(b for b, _, _ in cells) / len(cells)
        avg_a = sum(a for _, a, _ in cells) / len(cells)
        largest = max(abs(a - b) for b, a, _ in cells)
        lines.append(
            f"{row_label(row):<40} avg {avg_b:6.2f} -> {avg_a:6.2f} ({avg_a - avg_b:+.2f}); "
            f"{changed}/{len(cells)} cells differ, largest |change| {largest:.2f}"
        )
    lines += [f"only in {'before' if key in before else 'after'}: {key}" for key in only]
    return lines, differing, len(only)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--identical", action="store_true", help="exit 1 unless every cell is equal")
    args = parser.parse_args(argv)
    for path in (args.before, args.after):
        if not path.is_file():
            print(f"error: {path}: no such table CSV", file=sys.stderr)
            return 2
    before, after = read_cells(args.before), read_cells(args.after)
    lines, differing, one_sided = compare(before, after)
    print("\n".join(lines))
    print(
        f"{args.before} vs {args.after}: {len(before)} / {len(after)} cells, "
        f"{differing} differ, {one_sided} on one side only"
    )
    return 1 if args.identical and (differing or one_sided) else 0


if __name__ == "__main__":
    sys.exit(main())
