"""``python -m epmq evaluate``: one checkpoint on a suite's tasks, one ``<task>.json`` per task.

    python -m epmq evaluate --suite-config YAML --model DIR --tasks T1 T2 ... --out-dir DIR
                            [--data DIR] [--suite-dir DIR] [--threads N]

The suite's module (picked by the YAML's ``builder``) runs its protocol on every listed task in
one process; each result ({task, metric, accuracy (score in %), stderr, n, ...}) is written with
provenance, atomically, after all tasks are done. ``--suite-dir`` is ``results/{suite}``: the
pretrained model's evaluation assets (heads, tokenizer, processor) and the experts live there.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch

from epmq.io import atomic_write_json, provenance
from epmq.suites.base import load_suite

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite-config", required=True)
    parser.add_argument("--model", required=True, help="checkpoint directory (HF, merged or quantized)")
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--data", default=None, help="the suite's data directory (`suite data`)")
    parser.add_argument("--suite-dir", default=None, help="results/{suite}")
    parser.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite_config)
    cfg = suite.cfg
    if args.threads:
        cfg["threads"] = args.threads
        torch.set_num_threads(args.threads)
    known = suite.eval_tasks()
    unknown = [task for task in args.tasks if task not in known]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the suite evaluates {known}")
    started = time.time()
    results = suite.evaluate(args.model, args.tasks, args.data, args.suite_dir)
    record = provenance(suite_config=str(cfg["config_path"]), eval_seconds=round(time.time() - started, 2))
    for task in args.tasks:
        result = dict(results[task])
        if not math.isfinite(result["accuracy"]):
            raise FloatingPointError(f"{task}: the score is not finite ({result['accuracy']})")
        if isinstance(result.get("stderr"), float) and not math.isfinite(result["stderr"]):
            result["stderr"] = None  # JSON has no NaN: a standard error lm-eval could not give is null
        result.setdefault("model", str(args.model))
        result.setdefault("provenance", record)
        atomic_write_json(args.out_dir / f"{task}.json", result)
        log.info("%s: %.2f%% (n=%s)", task, result["accuracy"], result.get("n"))
    return 0
