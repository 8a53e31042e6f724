"""``python -m epmq aggregate``: per-task metrics of many models into one tidy CSV.

Each evaluation directory is ``results/{suite}/eval/{model}`` (one ``{task}.json`` per task), where
the model id follows the workflow's path convention (``rules/common.smk``):

    pretrained | experts/{task} | merged/{merge} | quant/{merge}/{method}[-a{alpha}]/w{bits}g{group}n{samples}

One CSV row per (model, task): suite, model, merge, method, alpha, bits, group_size, samples, task,
accuracy, stderr, n, quant_seconds (read from the quantized checkpoint's quantization.json), note
(a suite's ``table_note``, e.g. where its "fp" weights came from, which every table must print).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from pathlib import Path

from epmq.io import atomic_write_text

COLUMNS = [
    "suite", "model", "merge", "method", "alpha", "bits", "group_size", "samples",
    "task", "accuracy", "stderr", "n", "quant_seconds", "note",
]
_EVAL_DIR = re.compile(r"(?P<root>.*)/(?P<suite>[^/]+)/eval/(?P<model>.+)$")
_QUANT = re.compile(r"quant/(?P<merge>[^/]+)/(?P<method>[^/-]+)(-a(?P<alpha>[^/]+))?/w(?P<bits>\d+)g(?P<group>-?\d+)n(?P<samples>\d+)$")


def model_fields(model: str) -> dict:
    """What a model id says: merge, method (``pretrained``/``finetuned``/``fp`` or a quantizer) and its setting."""
    fields = {"merge": "", "method": "", "alpha": "", "bits": "", "group_size": "", "samples": ""}
    if model == "pretrained":
        fields["method"] = "pretrained"
    elif model.startswith("experts/"):
        fields["method"] = "finetuned"
    elif model.startswith("merged/"):
        fields.update(merge=model.split("/", 1)[1], method="fp")
    elif match := _QUANT.match(model):
        fields.update(
            merge=match["merge"], method=match["method"], alpha=match["alpha"] or "",
            bits=match["bits"], group_size=match["group"], samples=match["samples"],
        )
    else:
        raise ValueError(f"unrecognised model id {model!r}")
    return fields


def rows_of(eval_dir: Path) -> list[dict]:
    match = _EVAL_DIR.match(eval_dir.as_posix().rstrip("/"))
    if not match:
        raise ValueError(f"{eval_dir} is not a results/{{suite}}/eval/{{model}} directory")
    suite, model = match["suite"], match["model"]
    fields = model_fields(model)
    seconds = ""
    if model.startswith("quant/"):
        info = json.loads((Path(match["root"]) / suite / model / "quantization.json").read_text())
        seconds = f"{info['seconds']:.3f}"
    files = sorted(eval_dir.glob("*.json"))
    if not files:
        raise ValueError(f"{eval_dir} holds no task metrics")
    rows = []
    for file in files:
        metrics = json.loads(file.read_text())
        rows.append({
            "suite": suite, "model": model, **fields, "task": metrics["task"],
            "accuracy": metrics["accuracy"], "stderr": metrics["stderr"], "n": metrics["n"], "quant_seconds": seconds,
            "note": metrics.get("table_note", ""),
        })
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-dirs", nargs="+", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)


def run(args: argparse.Namespace) -> int:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for eval_dir in args.eval_dirs:
        writer.writerows(rows_of(eval_dir))
    atomic_write_text(args.out, buffer.getvalue())
    return 0
