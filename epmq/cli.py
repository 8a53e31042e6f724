"""``python -m epmq <stage> ...``: every stage of the pipeline, runnable without Snakemake.

Each stage lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their stage is called, so ``python -m epmq merge`` does not pay
for importing the evaluators.

``--then`` runs another stage in the same process once the first has succeeded, e.g.
``python -m epmq quantize ... --out Q --then evaluate --model Q ...``: the workflow evaluates each
model in the job that wrote it, paying one interpreter and torch start-up instead of two.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
from types import ModuleType

from epmq.progress import quiet_foreign_bars

STAGES = {
    "quantize": ("epmq.quantize", "quantize a (merged) model with rtn, gptq, awq or epmq"),
    "export": ("epmq.export", "write a quantized checkpoint in the compressed-tensors format (transformers, vLLM)"),
    "merge": ("epmq.merge", "merge expert checkpoints (simple_average, task_arithmetic, ties, wudi)"),
    "suite": ("epmq.suites.command", "build an offline suite: pretrain, fine-tune experts, draw calibration sets"),
    "evaluate": ("epmq.evaluate", "evaluate a checkpoint on a suite's tasks, one metrics file per task"),
    "aggregate": ("evals.aggregate", "collect per-task metrics of many models into one tidy CSV"),
    "render": ("evals.render", "render a target's tables (Markdown, LaTeX, HTML) or figure (PNG)"),
    "convert": ("epmq.convert", "convert a CLIP vision tower between open_clip and transformers (--from open_clip --to hf, and back)"),
    "diagnose": ("epmq.diagnose", "per-layer merging and quantization deviations from the experts, and checks that break quantizers"),
    "demo": ("epmq.demo", "quantize one random layer with every method and print the objectives"),
}


#: separates the stages of one ``python -m epmq`` call
THEN = "--then"


def main(argv: list[str] | None = None) -> int:
    """Run the stage of ``argv`` (default: the command line), then each one after a ``--then``,
    stopping at the first that fails; the exit code of the last one run."""
    quiet_foreign_bars()  # before any stage module imports tqdm, which reads TQDM_* when imported
    words = list(sys.argv[1:] if argv is None else argv)
    stages: list[list[str]] = [[]]
    for word in words:
        if word == THEN:
            stages.append([])
        else:
            stages[-1].append(word)
    if len(stages) > 1 and not all(stages):
        print(f"error: {THEN} must separate two stages (python -m epmq STAGE ... {THEN} STAGE ...)", file=sys.stderr)
        return 2
    for stage_argv in stages:
        code = run_stage(stage_argv)
        if code:
            return code
    return 0


def run_stage(argv: list[str]) -> int:
    """One stage: parse its arguments (importing only its module), run it, map bad input to exit 2."""
    parser = argparse.ArgumentParser(prog="python -m epmq", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    commands = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, (module_name, summary) in STAGES.items():
        sub = commands.add_parser(stage, help=summary, description=summary)
        sub.set_defaults(_module=module_name)
        # Stages register their arguments lazily: only the called stage's module is imported.
        if stage in argv:
            importlib.import_module(module_name).add_arguments(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:  # bad input: one clear line, no traceback
        logging.getLogger("epmq").debug("stage failed", exc_info=True)
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing non-empty --out even if this stage did not write it (never an input)",
    )


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (thread counts, sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite float (NaN and infinities are refused here, not deep in a solver)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def torch_device(text: str) -> str:
    """argparse type: a torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (expected cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this torch build or machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (expected cpu, cuda, cuda:N or mps)")
    return text


def run_module(module: ModuleType, argv: list[str] | None = None) -> int:
    """``python -m <module> ...``: one stage module (already running as ``__main__``, so not imported
    twice) run on its own, with the CLI's log format."""
    parser = argparse.ArgumentParser(prog=f"python -m {module.__spec__.name}", description=module.__doc__.splitlines()[0])
    module.add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return module.run(parser.parse_args(argv))
