"""Compare two builds of the same DAG file by file: every checkpoint's tensors and metadata, every
JSON record (metrics, build and quantization records), every table's CSV; what a change that must
leave results unchanged (a speed-up, warm starts) is checked with.

What differs between any two runs is left out: the ``provenance`` block of a record (times, commit)
and the other fields named in ``VOLATILE`` (timings); paths inside the checkout (the folder that
holds RESULTS) are compared relative to it. Exit 1 if anything else differs or is present on one
side only.

    python scripts/compare_builds.py BEFORE/results AFTER/results
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

#: fields of JSON records that are timings or provenance, not results. And the calibration
#: files' hashes: safetensors writes its header's metadata in an order that changes from process to
#: process (a Rust HashMap), so two runs of the same job write the same tensors and metadata in
#: files whose bytes differ; those files are compared here by content.
VOLATILE = frozenset({
    "provenance", "seconds", "eval_seconds", "quant_seconds", "created_utc", "calibration_sha256",
})


def strip_volatile(value, checkout: str):
    """``value`` without ``VOLATILE`` fields, the checkout's absolute path written as ``<checkout>``."""
    if isinstance(value, dict):
        return {key: strip_volatile(item, checkout) for key, item in value.items() if key not in VOLATILE}
    if isinstance(value, list):
        return [strip_volatile(item, checkout) for item in value]
    if isinstance(value, str) and value.startswith(checkout + "/"):
        return "<checkout>" + value[len(checkout):]
    return value


def same_checkpoint(a: Path, b: Path) -> str | None:
    import torch
    from safetensors import safe_open

    with safe_open(a, "pt") as left, safe_open(b, "pt") as right:
        if left.metadata() != right.metadata():
            return "metadata differs"
        if sorted(left.keys()) != sorted(right.keys()):
            return "tensor names differ"
        for key in left.keys():
            x, y = left.get_tensor(key), right.get_tensor(key)
            if x.dtype != y.dtype or x.shape != y.shape:
                return f"tensor {key}: dtype or shape differs"
            if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):  # bits, NaNs included
                return f"tensor {key} differs"
    return None


def same_json(a: Path, b: Path, checkouts: tuple[str, str]) -> str | None:
    left, right = (strip_volatile(json.loads(path.read_text()), checkout) for path, checkout in zip((a, b), checkouts))
    return None if left == right else "record differs"


def same_csv(a: Path, b: Path) -> str | None:
    def rows(path):
        with path.open(newline="") as handle:
            return [{key: value for key, value in row.items() if key not in VOLATILE} for row in csv.DictReader(handle)]

    return None if rows(a) == rows(b) else "rows differ"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    for root in (args.before, args.after):
        if not root.is_dir():
            print(f"error: {root} is not a directory", file=sys.stderr)
            return 2
    checkouts = (str(args.before.resolve().parent), str(args.after.resolve().parent))
    checks = {".safetensors": same_checkpoint, ".json": lambda a, b: same_json(a, b, checkouts), ".csv": same_csv}
    before, after = ({p.relative_to(root) for p in root.rglob("*") if p.suffix in checks and p.is_file()}
                     for root in (args.before, args.after))
    problems = [f"{path}: only in before" for path in sorted(before - after)]
    problems += [f"{path}: only in after" for path in sorted(after - before)]
    counts: dict[str, int] = {}
    for path in sorted(before & after):
        reason = checks[path.suffix](args.before / path, args.after / path)
        counts[path.suffix] = counts.get(path.suffix, 0) + 1
        if reason:
            problems.append(f"{path}: {reason}")
    for problem in problems:
        print(problem)
    summary = ", ".join(f"{count} {suffix}" for suffix, count in sorted(counts.items()))
    print(f"{'identical' if not problems else f'{len(problems)} differences'}: compared {summary}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
