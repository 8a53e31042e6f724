"""``python -m epmq merge --method NAME --pretrained DIR --experts DIR... [--param k=v ...] --out DIR``,
or ``python -m epmq merge --mergekit-config merge.yml --out DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from epmq.merge.registry import MERGERS
from epmq.mergekit import our_merge, read_mergekit_config
from epmq.merge.streaming import merge_checkpoints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=sorted(MERGERS), help="merge operator")
    parser.add_argument("--pretrained", metavar="DIR", help="pretrained checkpoint (HF safetensors)")
    parser.add_argument("--experts", nargs="+", metavar="DIR", help="fine-tuned expert checkpoints")
    parser.add_argument("--mergekit-config", metavar="YAML", type=Path,
                        help="a mergekit config: its models, base_model and merge (instead of --method/--pretrained/--experts)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="operator parameter (value parsed as YAML, e.g. scaling=0.3); defaults come from the schema",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (written atomically)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where WUDI optimises (default: cuda if available, else cpu); other operators run on cpu",
    )


def parse_params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"--param expects KEY=VALUE, got {pair!r}")
        params[key.strip()] = yaml.safe_load(value)
    return params


def run(args: argparse.Namespace) -> int:
    try:
        if args.mergekit_config:
            if args.method or args.pretrained or args.experts or args.param:
                raise ValueError("--mergekit-config replaces --method, --pretrained, --experts and --param: give one or the other")
            plan = read_mergekit_config(args.mergekit_config)
            method, params = our_merge(plan)
            merge_checkpoints(method, plan.pretrained, plan.experts, args.out, params, device=args.device,
                              source={"mergekit_config": plan.record()})
        else:
            missing = [flag for flag, value in (("--method", args.method), ("--pretrained", args.pretrained),
                                                ("--experts", args.experts)) if not value]
            if missing:
                raise ValueError(f"{', '.join(missing)} required (or --mergekit-config)")
            merge_checkpoints(
                args.method, args.pretrained, args.experts, args.out, parse_params(args.param), device=args.device
            )
    except ValueError as error:  # MergeError, CheckpointError and schema errors: bad input, nothing written
        message = " ".join(str(error).split())
        print(f"epmq merge: error: {message}", file=sys.stderr)
        return 2
    return 0
