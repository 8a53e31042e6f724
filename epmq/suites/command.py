"""``python -m epmq suite <data|pretrain|finetune|calib> ...``: build any suite's parts.

    python -m epmq suite data     --suite-config YAML --out DIR
    python -m epmq suite pretrain --suite-config YAML --out DIR [--data DIR]
    python -m epmq suite finetune --suite-config YAML --pretrained DIR --task NAME --out DIR [--data DIR]
    python -m epmq suite calib    --suite-config YAML --tasks NAME [NAME ...] --samples N --seed S --out DIR
                                  [--data DIR] [--suite-dir DIR]

The suite YAML's ``builder`` picks the Suite class (``epmq.suites.base``): offline suites train
here, hub suites fetch. Outputs are written atomically. ``calib`` writes one ``<task>.safetensors``
per task into ``--out`` (with a ``manifest.json``): all tasks of one budget in one process, since
drawing a set costs less than starting one.
"""

from __future__ import annotations

import argparse

import torch

from epmq.cli import add_overwrite_argument, positive_int
from epmq.io import check_output
from epmq.suites.base import load_suite, packaged_config

#: provenance files the suite stages write into their output folders (a previous output holds one)
STAGE_RECORDS = ("build.json", "manifest.json", "fetch.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="suite_command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser, data: bool = True) -> None:
        sub.add_argument("--suite-config", default=None, help="suite YAML (default: the packaged mini-clip8.yaml)")
        sub.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: the suite's choice)")
        add_overwrite_argument(sub)
        if data:
            sub.add_argument("--data", default=None, help="directory written by `suite data`")

    sub = commands.add_parser("data", help="prepare the suite's data once")
    common(sub, data=False)
    sub.add_argument("--out", required=True)
    sub = commands.add_parser("pretrain", help="the model that is merged (trained here, or fetched)")
    common(sub)
    sub.add_argument("--out", required=True)
    sub = commands.add_parser("finetune", help="one expert (trained here, or fetched)")
    common(sub)
    sub.add_argument("--pretrained", required=True)
    sub.add_argument("--task", required=True)
    sub.add_argument("--out", required=True)
    sub = commands.add_parser("calib", help="tasks' calibration inputs, drawn from training data only")
    common(sub)
    sub.add_argument("--tasks", nargs="+", required=True)
    sub.add_argument("--samples", type=positive_int, required=True)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--suite-dir", default=None, help="results/{suite} (tokenizers and processors live there)")
    sub.add_argument("--out", required=True, help="output folder: <task>.safetensors (model inputs + sample_indices) per task")


def run(args: argparse.Namespace) -> int:
    inputs = [path for path in (args.suite_config, getattr(args, "data", None), getattr(args, "pretrained", None)) if path]
    check_output(args.out, inputs=inputs, records=STAGE_RECORDS, overwrite=args.overwrite)
    suite = load_suite(args.suite_config or packaged_config("mini-clip8"))
    cfg = suite.cfg
    if args.threads:
        cfg["threads"] = args.threads
        torch.set_num_threads(args.threads)
    if args.suite_command == "data":
        suite.write_data(args.out)
    elif args.suite_command == "pretrain":
        suite.build_pretrained(args.out, args.data)
    elif args.suite_command == "finetune":
        if args.task not in cfg["tasks"]:
            raise ValueError(f"unknown task {args.task!r}; the suite has {list(cfg['tasks'])}")
        suite.build_expert(args.pretrained, args.task, args.out, args.data)
    elif args.suite_command == "calib":
        write_calibration_sets(suite, args)
    return 0


def write_calibration_sets(suite, args: argparse.Namespace) -> None:
    """``suite calib``: each task's set into one folder, written atomically, and its manifest."""
    from epmq.io import atomic_output_dir, atomic_write_json, provenance
    from epmq.suites.common import config_digest

    unknown = [task for task in args.tasks if task not in suite.cfg["tasks"]]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the suite has {list(suite.cfg['tasks'])}")
    if len(set(args.tasks)) != len(args.tasks):
        raise ValueError(f"--tasks names a task twice: {args.tasks}")
    with atomic_output_dir(args.out) as tmp:
        for task in args.tasks:
            suite.write_calibration(task, args.samples, args.seed, tmp / f"{task}.safetensors", args.data, args.suite_dir)
        atomic_write_json(tmp / "manifest.json", {
            "suite": suite.cfg["suite"], "tasks": args.tasks, "samples": args.samples, "seed": args.seed,
            "provenance": provenance(config=str(suite.cfg["config_path"]), config_digest=config_digest(suite.cfg))})
