"""``python -m epmq suite <data|pretrain|finetune|calib> ...``: build any suite's parts.

    python -m epmq suite data     --suite-config YAML --out DIR
    python -m epmq suite pretrain --suite-config YAML --out DIR [--data DIR]
    python -m epmq suite finetune --suite-config YAML --pretrained DIR --task NAME --out DIR [--data DIR]
    python -m epmq suite calib    --suite-config YAML --task NAME --samples N --seed S --out FILE
                                  [--data DIR] [--suite-dir DIR]

The suite YAML's ``builder`` picks the Suite class (``epmq.suites.base``): offline suites train
here, hub suites fetch. Outputs are written atomically.
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
    sub = commands.add_parser("calib", help="a task's calibration inputs, drawn from training data only")
    common(sub)
    sub.add_argument("--task", required=True)
    sub.add_argument("--samples", type=positive_int, required=True)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--suite-dir", default=None, help="results/{suite} (tokenizers and processors live there)")
    sub.add_argument("--out", required=True, help="output .safetensors (model inputs + sample_indices)")


def run(args: argparse.Namespace) -> int:
    inputs = [path for path in (args.suite_config, getattr(args, "data", None), getattr(args, "pretrained", None)) if path]
    check_output(args.out, inputs=inputs, records=STAGE_RECORDS, overwrite=args.overwrite,
                 is_file=args.suite_command == "calib")
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
        if args.task not in cfg["tasks"]:
            raise ValueError(f"unknown task {args.task!r}; the suite has {list(cfg['tasks'])}")
        suite.write_calibration(args.task, args.samples, args.seed, args.out, args.data, args.suite_dir)
    return 0
