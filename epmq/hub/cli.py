"""Fetch pretrained models and experts (hub id or local path) into ``resources/``, and split CLIP.

``python -m epmq.hub {fetch,fetch-suite,clip-split,align} ...`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from epmq.hub.experts_table import EXPERTS_TABLE, read_experts_table
from epmq.hub.layout import align_checkpoint, split_clip
from epmq.hub.store import DEFAULT_ALLOW, FETCH_RECORD, fetch, is_local_source, resource_name
from epmq.io import check_output


def fetch_suite(table: str | os.PathLike, suite: str, root: str | os.PathLike = "resources/models", **kwargs) -> dict[str, Path]:
    """Fetch every model of ``suite`` (each distinct source once); return ``{label: folder}``."""
    folders: dict[str, Path] = {}
    done: dict[tuple[str, str], Path] = {}
    for entry in read_experts_table(table, suite):
        key = (entry.source, entry.revision)
        if key not in done:
            done[key] = fetch(entry.source, entry.revision, Path(root) / resource_name(*key), label=entry.label, **kwargs)
        folders[entry.label] = done[key]
    return folders


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="hub_command", required=True)
    one = commands.add_parser("fetch", help="fetch one model (hub id or local folder)")
    one.add_argument("--source", required=True, help="hub id owner/name or local folder")
    one.add_argument("--revision", default="main")
    one.add_argument("--out", required=True, type=Path)
    one.add_argument("--overwrite", action="store_true", help="replace a non-empty --out this command did not write")
    one.add_argument("--label", default=None, help="what the model is, for error messages")
    one.add_argument("--allow", nargs="+", default=list(DEFAULT_ALLOW), help="file patterns to take")
    suite = commands.add_parser("fetch-suite", help="fetch every model of one suite of the experts table")
    suite.add_argument("--table", type=Path, default=EXPERTS_TABLE)
    suite.add_argument("--suite", required=True)
    suite.add_argument("--root", type=Path, default=Path("resources/models"))
    split = commands.add_parser("clip-split", help="CLIPModel folder -> vision/ (CLIPVisionModel) + zeroshot/")
    split.add_argument("--clip", required=True, type=Path)
    split.add_argument("--out", required=True, type=Path)
    split.add_argument("--overwrite", action="store_true", help="replace a non-empty --out this command did not write")
    split.add_argument("--like", type=Path, default=None, help="an expert checkpoint whose key convention to follow")
    split.add_argument("--prefix", default=None, help="key prefix of the vision tower ('none' for no prefix)")
    align = commands.add_parser("align", help="rewrite a checkpoint with another's tensor names")
    align.add_argument("--src", required=True, type=Path)
    align.add_argument("--like", required=True, type=Path)
    align.add_argument("--out", required=True, type=Path)
    align.add_argument("--overwrite", action="store_true", help="replace a non-empty --out this command did not write")


#: per command: the provenance file a previous output of it holds, and the inputs its --out must spare
_OUTPUTS = {
    "fetch": (FETCH_RECORD, lambda a: [a.source.removeprefix("local:")] if is_local_source(a.source) else []),
    "clip-split": ("vision/clip_split.json", lambda a: [a.clip] + ([a.like] if a.like else [])),
    "align": ("align.json", lambda a: [a.src, a.like]),
}


def run(args: argparse.Namespace) -> int:
    try:
        if args.hub_command in _OUTPUTS:
            record, inputs = _OUTPUTS[args.hub_command]
            check_output(args.out, inputs=inputs(args), records=[record], overwrite=args.overwrite)
        if args.hub_command == "fetch":
            fetch(args.source, args.revision, args.out, tuple(args.allow), label=args.label)
        elif args.hub_command == "fetch-suite":
            for label, folder in fetch_suite(args.table, args.suite, args.root).items():
                print(f"{label}\t{folder}")
        elif args.hub_command == "clip-split":
            prefix = "" if args.prefix == "none" else args.prefix
            split_clip(args.clip, args.out, like=args.like, prefix=prefix)
        elif args.hub_command == "align":
            align_checkpoint(args.src, args.like, args.out)
    except ValueError as error:  # HubFetchError and bad inputs: one clear line
        print(f"epmq hub: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epmq.hub", description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(None if argv is None else list(argv)))

