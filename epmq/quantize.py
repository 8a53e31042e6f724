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
from safetensors.torch import load_file
from torch import nn

from epmq.adapters import adapter_for_type
from epmq.checkpoint import QUANTIZATION_FILE, load_model, model_type, save_quantized
from epmq.cli import add_overwrite_argument, finite_float, positive_int, torch_device
from epmq.config import method_params, parse_assignment
from epmq.convert import hf_inputs
from epmq.engine import CalibrationTask, quantize_model
from epmq.io import LazyCheckpoint, check_output, require_local_dir, sha256_file, warn_duplicates
from epmq.merge import merge_checkpoints
from epmq.mergekit import MergekitPlan, our_merge, read_mergekit_config
from epmq.catalog import get_method, method_names

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path,
                        help="checkpoint directory of the (merged) model, or an open_clip state dict (converted on "
                             "the fly); optional with --mergekit-config: then merged here")
    parser.add_argument("--mergekit-config", type=Path, metavar="YAML",
                        help="a mergekit config: its models (other than base_model) are the experts, and without "
                             "--model its merge (if one of ours) is computed first")
    parser.add_argument("--method", required=True, choices=method_names(), help="quantization method")
    parser.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    add_overwrite_argument(parser)
    parser.add_argument("--experts", nargs="*", type=Path, default=[],
                        help="expert checkpoints, one per task (HF, or open_clip: converted on the fly)")
    parser.add_argument("--calib", nargs="*", type=Path, default=[], help="calibration files, one per task")
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: calibration file stems)")
    parser.add_argument("--bits", type=int)
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--block-size", type=positive_int)
    parser.add_argument("--percdamp", type=finite_float)
    parser.add_argument("--alpha", type=finite_float, help="E-PMQ anchor strength")
    parser.add_argument("--hessian-dtype", choices=["float32", "float64"])
    parser.add_argument("--batch-size", type=positive_int, help="calibration samples per forward pass")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other quantize parameter of the schema, VALUE in YAML (e.g. static_groups=true, awq.clip=false)")
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")


#: calibration inputs that hold token ids or token masks (integers; masks count tokens)
_TOKEN_KEYS = ("input_ids", "decoder_input_ids", "labels")
_MASK_KEYS = ("attention_mask", "decoder_attention_mask")


def read_calibration_file(file: Path) -> dict[str, torch.Tensor]:
    """One calibration file's tensors, checked for what needs no model: readable, at least one
    sample, one sample count, integer token ids and masks, finite values, masks that count tokens.
    Every refusal names the file and the tensor."""
    if not file.is_file():
        raise FileNotFoundError(f"calibration file not found: {file}")
    try:
        tensors = load_file(str(file))
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{file}: cannot read calibration file ({error}); truncated or not a safetensors file?") from error
    inputs = {key: value for key, value in tensors.items() if key != "sample_indices"}
    if not inputs:
        raise ValueError(f"{file}: no model inputs")
    for key, value in inputs.items():
        if value.ndim == 0:
            raise ValueError(f"{file}: tensor {key!r} is a scalar; samples go along the first axis")
    sizes = {key: value.shape[0] for key, value in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{file}: inputs disagree on the number of samples: {sizes}")
    if not next(iter(sizes.values())):
        raise ValueError(f"{file}: 0 calibration samples")
    for key, value in inputs.items():
        if key in _TOKEN_KEYS + _MASK_KEYS and (value.is_floating_point() or value.is_complex()):
            raise ValueError(f"{file}: tensor {key!r} must hold integers (token ids or a mask), found {value.dtype}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{file}: tensor {key!r} contains NaN or Inf")
    for key in _MASK_KEYS:
        if key in inputs and not inputs[key].any():
            raise ValueError(f"{file}: {key} is all zero, so no token of this task would be counted")
    return tensors


def check_calibration_fits(model: nn.Module, tasks: list[CalibrationTask], files: list[Path]) -> None:
    """Refuse calibration inputs the model cannot read: its main input missing, token ids outside
    its vocabulary, images of the wrong rank or channel count. Names the file and the tensor."""
    config = model.config
    main_input = getattr(model, "main_input_name", "input_ids")
    vocab = getattr(config, "vocab_size", None)
    for task, file in zip(tasks, files):
        batch = task.batches[0]
        if main_input not in batch and not (main_input == "input_ids" and "inputs_embeds" in batch):
            raise ValueError(f"{file}: no {main_input!r} tensor; {type(model).__name__} reads {main_input} "
                             f"(the file has {sorted(batch)})")
        for key in _TOKEN_KEYS:
            if key not in batch or not vocab:
                continue
            ids = torch.cat([b[key] for b in task.batches])
            low, high = int(ids.min()), int(ids.max())
            allowed_low = -100 if key == "labels" else 0  # -100: positions the loss ignores
            if low < allowed_low or high >= vocab:
                raise ValueError(f"{file}: tensor {key!r} has ids in [{low}, {high}], outside the vocabulary [0, {vocab})")
        if "pixel_values" in batch:
            shape = tuple(batch["pixel_values"].shape)
            channels = getattr(config, "num_channels", None)
            if len(shape) != 4 or (channels and shape[1] != channels):
                raise ValueError(f"{file}: tensor 'pixel_values' has shape {shape}; expected "
                                 f"(samples, {channels or 'channels'}, height, width)")


def load_calibration(files: list[Path], names: list[str], experts: list[Path], batch_size: int) -> list[CalibrationTask]:
    if experts and len(experts) != len(files):
        raise ValueError(f"got {len(experts)} experts but {len(files)} calibration files: pass one per task, same order")
    if len(names) != len(files):
        raise ValueError(f"got {len(names)} task names for {len(files)} calibration files")
    tasks = []
    for position, (name, file) in enumerate(zip(names, files)):
        tensors = read_calibration_file(file)
        indices = tensors.pop("sample_indices", None)
        n = next(iter(tensors.values())).shape[0]
        batches = [{key: value[i : i + batch_size] for key, value in tensors.items()} for i in range(0, n, batch_size)]
        expert = LazyCheckpoint(experts[position]) if experts else None
        tasks.append(CalibrationTask(name, batches, expert, None if indices is None else indices.tolist()))
    return tasks


def _merged_model(plan: MergekitPlan, method: str, params: dict, out: Path):
    """The merge a mergekit config asks for, computed with our operator in a scratch folder beside ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merge-", dir=out.parent) as scratch:
        merged = merge_checkpoints(method, plan.pretrained, plan.experts, Path(scratch) / "merged", params)
        return load_model(merged, plain_torch=True)


def run(args: argparse.Namespace) -> int:
    plan = merge = None
    if args.mergekit_config:
        if args.experts:
            raise ValueError("--mergekit-config names the experts (its models): drop --experts")
        plan = read_mergekit_config(args.mergekit_config)
        args.experts = plan.experts
        merge = None if args.model else our_merge(plan)  # refuse an unmapped merge before anything is computed
    elif args.model is None:
        raise ValueError("--model is required (or --mergekit-config)")
    source = args.model or Path(plan.pretrained)
    if not source.is_file():  # a file can only be an open_clip state dict (a CLIP tower), converted below
        require_local_dir(source, "--model")
        adapter_for_type(model_type(source))  # refuse an unsupported family before reading anything big
    check_output(args.out, inputs=[source, *args.experts, *args.calib], records=[QUANTIZATION_FILE],
                 overwrite=args.overwrite)
    warn_duplicates(args.experts, "--experts")
    warn_duplicates(args.calib, "--calib")
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
        key, value = parse_assignment(item, "--set")
        section, _, leaf = key.partition(".")
        if leaf:
            overrides.setdefault(section, {})[leaf] = value
        else:
            overrides[key] = value
    params = method_params("quantize", **overrides)
    method = get_method(args.method, params)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"mergekit_config": {**plan.record(), "merged_here": args.model is None}} if plan else {}
    # open_clip model or experts become temporary HF folders (experts named like the model), recorded
    with hf_inputs([source], workdir=args.out.parent) as ((model_dir,), model_conversions), \
            hf_inputs(args.experts, like=model_dir, workdir=args.out.parent) as (experts, expert_conversions):
        conversions = model_conversions + expert_conversions
        if conversions:
            record["open_clip_conversions"] = conversions
        if merge is not None:
            model = _merged_model(plan, *merge, args.out)
        else:
            model = load_model(model_dir, plain_torch=True)
        _quantize(args, method, params, model, experts, record)
    return 0


def _quantize(args: argparse.Namespace, method, params: dict, model: nn.Module, experts: list[Path], record: dict) -> None:
    names = args.tasks or [file.stem for file in args.calib]
    tasks = load_calibration(args.calib, names, experts, params["batch_size"]) if method.needs_calibration else []
    model = model.to(args.device)
    check_calibration_fits(model, tasks, args.calib)
    result = quantize_model(model, method, tasks)
    metadata = {
        "method": method.name,
        "params": method.describe(),
        "model": str(args.model) if args.model else None,
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
        **record,
    }
    save_quantized(args.out, model.cpu(), {name: layer.replacement for name, layer in result.replacements.items()}, metadata)
    log.info("quantized %d linears with %s in %.1f s -> %s", len(result.replacements), method.name, result.seconds, args.out)
