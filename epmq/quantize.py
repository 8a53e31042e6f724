"""``python -m epmq quantize``: quantize a (merged) HF checkpoint with rtn, gptq, awq, epmq or epmq_fp.

Calibration input format: one safetensors file per task (``--calib``), in the same order as
``--experts``. Each file holds the model's keyword inputs with the samples along the first axis
(``pixel_values`` for CLIP; ``input_ids`` and ``attention_mask`` for text; T5 adds
``decoder_input_ids``/``decoder_attention_mask`` or ``labels``) and optionally ``sample_indices``
(int64, which examples of the task's training split were drawn; recorded in quantization.json).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from epmq.adapters import adapter_for_type
from epmq.checkpoint import load_model, model_type, save_quantized
from epmq.config import method_params
from epmq.engine import CalibrationTask, quantize_model
from epmq.io import LazyCheckpoint, sha256_file
from epmq.merge import merge_checkpoints
from epmq.mergekit import MergekitPlan, our_merge, read_mergekit_config
from epmq.methods import get_method

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path,
                        help="checkpoint directory of the (merged) model (optional with --mergekit-config: then merged here)")
    parser.add_argument("--mergekit-config", type=Path, metavar="YAML",
                        help="a mergekit config: its models (other than base_model) are the experts, and without "
                             "--model its merge (if one of ours) is computed first")
    parser.add_argument("--method", required=True, help="rtn | gptq | awq | epmq | epmq_fp")
    parser.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    parser.add_argument("--experts", nargs="*", type=Path, default=[], help="expert checkpoints, one per task")
    parser.add_argument("--calib", nargs="*", type=Path, default=[], help="calibration files, one per task")
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: calibration file stems)")
    parser.add_argument("--bits", type=int)
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--percdamp", type=float)
    parser.add_argument("--alpha", type=float, help="E-PMQ anchor strength")
    parser.add_argument("--hessian-dtype", choices=["float32", "float64"])
    parser.add_argument("--batch-size", type=int, help="calibration samples per forward pass")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other quantize parameter of the schema, VALUE in YAML (e.g. static_groups=true, awq.clip=false)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def load_calibration(files: list[Path], names: list[str], experts: list[Path], batch_size: int) -> list[CalibrationTask]:
    if experts and len(experts) != len(files):
        raise ValueError(f"got {len(experts)} experts but {len(files)} calibration files: pass one per task, same order")
    if len(names) != len(files):
        raise ValueError(f"got {len(names)} task names for {len(files)} calibration files")
    tasks = []
    for position, (name, file) in enumerate(zip(names, files)):
        tensors = load_file(str(file))
        indices = tensors.pop("sample_indices", None)
        if not tensors:
            raise ValueError(f"{file}: no model inputs")
        sizes = {key: value.shape[0] for key, value in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{file}: inputs disagree on the number of samples: {sizes}")
        n = next(iter(sizes.values()))
        batches = [{key: value[i : i + batch_size] for key, value in tensors.items()} for i in range(0, n, batch_size)]
        expert = LazyCheckpoint(experts[position]) if experts else None
        tasks.append(CalibrationTask(name, batches, expert, None if indices is None else indices.tolist()))
    return tasks


def _merged_model(plan: MergekitPlan, method: str, params: dict, out: Path):
    """The merge a mergekit config asks for, computed with our operator in a scratch folder beside ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merge-", dir=out.parent) as scratch:
        merged = merge_checkpoints(method, plan.pretrained, plan.experts, Path(scratch) / "merged", params)
        return load_model(merged)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {
        key: value
        for key, value in {
            "bits": args.bits, "group_size": args.group_size, "sym": args.sym, "act_order": args.act_order,
            "block_size": args.block_size, "percdamp": args.percdamp, "alpha": args.alpha,
            "hessian_dtype": args.hessian_dtype, "batch_size": args.batch_size,
        }.items()
        if value is not None
    }
    for item in args.set:
        key, _, value = item.partition("=")
        if not value:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        section, _, leaf = key.partition(".")
        if leaf:
            overrides.setdefault(section, {})[leaf] = yaml.safe_load(value)
        else:
            overrides[key] = yaml.safe_load(value)
    plan = None
    if args.mergekit_config:
        if args.experts:
            raise ValueError("--mergekit-config names the experts (its models): drop --experts")
        plan = read_mergekit_config(args.mergekit_config)
        args.experts = plan.experts
        merge = None if args.model else our_merge(plan)  # refuse an unmapped merge before anything is computed
    elif args.model is None:
        raise ValueError("--model is required (or --mergekit-config)")
    adapter_for_type(model_type(args.model or plan.pretrained))  # refuse an unsupported family before reading anything big
    params = method_params("quantize", **overrides)
    method = get_method(args.method, params)
    names = args.tasks or [file.stem for file in args.calib]
    tasks = load_calibration(args.calib, names, args.experts, params["batch_size"]) if method.needs_calibration else []
    if args.model is None:
        model = _merged_model(plan, *merge, args.out)
    else:
        model = load_model(args.model)
    model = model.to(args.device)
    result = quantize_model(model, method, tasks)
    metadata = {
        "method": method.name,
        "params": method.describe(),
        "model": str(args.model) if args.model else None,
        **({"mergekit_config": {**plan.record(), "merged_here": args.model is None}} if plan else {}),
        "tasks": [
            {
                "name": task.name,
                "calibration_file": str(file),
                "calibration_sha256": sha256_file(file),
                "samples": sum(next(iter(b.values())).shape[0] for b in task.batches),
                "sample_indices": task.sample_indices,
                "expert": str(expert) if expert else None,
            }
            for task, file, expert in zip(tasks, args.calib, args.experts or [None] * len(tasks))
        ],
        "seconds": result.seconds,
        "layer_log": result.records,
    }
    save_quantized(args.out, model.cpu(), {name: layer.replacement for name, layer in result.replacements.items()}, metadata)
    log.info("quantized %d linears with %s in %.1f s -> %s", len(result.replacements), method.name, result.seconds, args.out)
    return 0
