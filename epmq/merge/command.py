"""``python -m epmq merge --method NAME --pretrained DIR --experts DIR... [--param k=v ...] --out DIR``,
or ``python -m epmq merge --mergekit-config merge.yml --out DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from epmq.cli import add_overwrite_argument, torch_device
from epmq.config import parse_assignment
from epmq.convert import hf_inputs
from epmq.io import check_output
from epmq.merge.registry import MERGERS
from epmq.merge.streaming import MERGE_RECORD, merge_checkpoints
from epmq.mergekit import our_merge, read_mergekit_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=sorted(MERGERS), help="merge operator")
    parser.add_argument("--pretrained", metavar="DIR",
                        help="pretrained checkpoint (HF safetensors, or an open_clip state dict: converted on the fly)")
    parser.add_argument("--experts", nargs="+", metavar="DIR",
                        help="fine-tuned expert checkpoints (HF, or open_clip: converted on the fly, recorded in merge.json)")
    parser.add_argument("--mergekit-config", metavar="YAML", type=Path,
                        help="a mergekit config: its models, base_model and merge (instead of --method/--pretrained/--experts)")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="operator parameter (value parsed as YAML, e.g. scaling=0.3, lr=1e-5); defaults come from the schema",
    )
    parser.add_argument(
        "--cast-experts",
        action="store_true",
        help="cast experts stored in another floating dtype to the pretrained model's dtype (recorded in merge.json)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (written atomically)")
    add_overwrite_argument(parser)
    parser.add_argument(
        "--device",
        type=torch_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where WUDI optimises (default: cuda if available, else cpu); other operators run on cpu",
    )


def parse_params(pairs: list[str]) -> dict:
    return dict(parse_assignment(pair, "--param") for pair in pairs)


def run(args: argparse.Namespace) -> int:
    try:
        record = {}
        if args.mergekit_config:
            if args.method or args.pretrained or args.experts or args.param:
                raise ValueError("--mergekit-config replaces --method, --pretrained, --experts and --param: give one or the other")
            plan = read_mergekit_config(args.mergekit_config)
            method, params = our_merge(plan)
            pretrained, experts = plan.pretrained, plan.experts
            record["source"] = {"mergekit_config": plan.record()}
        else:
            missing = [flag for flag, value in (("--method", args.method), ("--pretrained", args.pretrained),
                                                ("--experts", args.experts)) if not value]
            if missing:
                raise ValueError(f"{', '.join(missing)} required (or --mergekit-config)")
            method, params = args.method, parse_params(args.param)
            pretrained, experts = args.pretrained, args.experts
        sources, out = [Path(pretrained), *map(Path, experts)], Path(args.out)
        # checked on the user's own paths, before open_clip inputs are converted beside the output
        check_output(out, inputs=sources, records=[MERGE_RECORD], overwrite=args.overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        # open_clip inputs become temporary HF folders beside the output, named like the pretrained model
        with hf_inputs(sources, workdir=out.parent) as (paths, conversions):
            if conversions:
                record["open_clip_conversions"] = conversions
            merge_checkpoints(method, paths[0], paths[1:], out, params, device=args.device,
                              record=record or None, overwrite=args.overwrite, cast_experts=args.cast_experts)
    except ValueError as error:  # MergeError, CheckpointError and schema errors: bad input, nothing written
        message = " ".join(str(error).split())
        print(f"epmq merge: error: {message}", file=sys.stderr)
        return 2
    return 0
