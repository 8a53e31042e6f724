"""The layer-wise calibration engine: quantize every linear of every block in forward order.

Sequential, like the reference GPTQ drivers: the inputs of block b are the outputs of the
already-quantized blocks 0..b-1, and inside a block each group of linears (those sharing one input)
is quantized before the next group's inputs are collected. Statistics are collected per
calibration task (E-PMQ folds each task with its expert's weight as soon as the task is done), and
expert weights are read one tensor at a time from their safetensors files, so memory does not grow
with the number of experts. The engine knows no model by name: a :class:`ModelAdapter` tells it
which stacks of blocks exist and how to run a batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from epmq.adapters import ModelAdapter, Stack, adapter_for, block_linears, linear_groups
from epmq.io import LazyCheckpoint
from epmq.quant.base import LayerResult, QuantMethod
from epmq.progress import progress

log = logging.getLogger(__name__)


@dataclass
class CalibrationTask:
    """One task's calibration batches (model keyword inputs) and, for E-PMQ, its expert checkpoint."""

    name: str
    batches: list[dict[str, torch.Tensor]]
    expert: LazyCheckpoint | None = None
    sample_indices: list[int] | None = None


@dataclass
class QuantizationResult:
    """What the engine produced: the replacement of each quantized linear and one record per layer."""

    replacements: dict[str, LayerResult] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    #: where each layer's replacement is kept once the layer is done
    device: str | torch.device = "cpu"


@dataclass
class _BlockInput:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    batch: dict


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward pass."""


@dataclass
class BlockContext:
    """One block being quantized, with the cached inputs of every calibration batch of every task."""

    adapter: ModelAdapter
    stack: Stack
    block: nn.Module
    prefix: str
    inputs: list[list[_BlockInput]]
    #: linear groups by block structure (class, linear names and shapes): a stack's blocks share one
    #: forward, so the grouping pass runs once per structure, not once per block
    group_cache: dict = field(default_factory=dict)

    def all_inputs(self) -> list[_BlockInput]:
        return [block_input for task_inputs in self.inputs for block_input in task_inputs]

    def run(self, block_input: _BlockInput):
        """The block's raw output on one cached input."""
        return self.block(block_input.hidden, *block_input.args, **block_input.kwargs)

    def hidden(self, output) -> torch.Tensor:
        return self.adapter.block_output(output)


@contextlib.contextmanager
def _tf32_off():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def quantize_model(
    model: nn.Module,
    method: QuantMethod,
    tasks: list[CalibrationTask] | None = None,
    adapter: ModelAdapter | None = None,
    results_device: str | torch.device = "cpu",
) -> QuantizationResult:
    """Quantize ``model`` in place (weights replaced by their dequantized values) and return the result.

    Each layer's replacement (codes, scales, zeros) moves to ``results_device`` as soon as the
    layer is done, so a model quantized on a GPU does not keep every layer's codes there.
    """
    adapter = adapter or adapter_for(model)
    tasks = tasks or []
    if method.needs_calibration and not tasks:
        raise ValueError(f"method {method.name!r} needs calibration data")
    if method.needs_experts:
        missing = [task.name for task in tasks if task.expert is None]
        if missing:
            raise ValueError(f"method {method.name!r} needs an expert checkpoint for every task; missing: {missing}")
    model.eval()
    result = QuantizationResult(device=results_device)
    group_cache: dict = {}
    start = time.perf_counter()
    with torch.no_grad(), _tf32_off():
        for stack in adapter.stacks(model):
            inputs = _capture_stack_inputs(model, adapter, stack, tasks) if method.needs_calibration else None
            for index, block in progress(enumerate(stack.blocks), f"quantizing {stack.name} blocks",
                                         total=len(stack.blocks), unit="block"):
                block_start = time.perf_counter()
                prefix = f"{stack.prefix}.{index}"
                if inputs is None:
                    for name, linear in block_linears(block).items():
                        _quantize_linear(method, f"{prefix}.{name}", linear, None, 0.0, result)
                else:
                    # the stack's last block feeds nothing: its outputs are neither kept nor computed
                    last = index == len(stack.blocks) - 1
                    context = BlockContext(adapter, stack, block, prefix, inputs, group_cache)
                    fp_outputs = None if method.quantized_inputs or last else [context.run(x) for x in context.all_inputs()]
                    method.prepare_block(context)
                    _quantize_block(context, tasks, method, result)
                    if not last:
                        _advance(context, fp_outputs)
                log.info(
                    "%s block %d/%d quantized in %.2f s", stack.name, index + 1, len(stack.blocks),
                    time.perf_counter() - block_start,
                )
    result.seconds = time.perf_counter() - start
    return result


def _capture_stack_inputs(model, adapter, stack: Stack, tasks) -> list[list[_BlockInput]]:
    """The inputs of the stack's first block, for every batch of every task."""
    device = next(model.parameters()).device
    captured: list[_BlockInput] = []

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(_BlockInput(hidden, tuple(args[1:]), kwargs, {}))
        raise _StopForward

    handle = stack.blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    per_task = []
    try:
        for task in tasks:
            task_inputs = []
            for batch in task.batches:
                batch = {key: _to(value, device) for key, value in batch.items()}
                with contextlib.suppress(_StopForward):
                    adapter.run_model(model, batch)
                if len(captured) != 1:
                    raise RuntimeError(f"running a batch of task {task.name!r} did not reach {stack.prefix}.0")
                block_input = captured.pop()
                block_input.batch = batch
                task_inputs.append(block_input)
            per_task.append(task_inputs)
    finally:
        handle.remove()
    return per_task


def _quantize_block(context: BlockContext, tasks, method: QuantMethod, result):
    linears = block_linears(context.block)
    if not method.collects_statistics:
        for name, linear in linears.items():
            _quantize_linear(method, f"{context.prefix}.{name}", linear, None, 0.0, result)
        return
    structure = (type(context.block), tuple((name, tuple(linear.weight.shape)) for name, linear in linears.items()))
    if structure not in context.group_cache:
        context.group_cache[structure] = linear_groups(context.block, lambda: context.run(context.inputs[0][0]))
    groups = context.group_cache[structure]
    # True-sequential: each group's inputs are collected after the earlier groups are quantized;
    # otherwise one pass over the fp block collects every group's statistics (llm-compressor).
    passes = [[group] for group in groups] if method.params["true_sequential"] else [groups]
    for pass_groups in passes:
        pass_start = time.perf_counter()
        all_stats = _collect_statistics(context, pass_groups, linears, tasks, method)
        per_layer = (time.perf_counter() - pass_start) / sum(len(group) for group in pass_groups)
        for group, stats in zip(pass_groups, all_stats):
            for name in group:
                _quantize_linear(method, f"{context.prefix}.{name}", linears[name], stats, per_layer, result)


def _collect_statistics(context: BlockContext, groups, linears, tasks, method):
    """Statistics of each group's shared input over every task, in one pass per batch."""
    all_stats = []
    handles = []
    masks: dict[str, torch.Tensor | None] = {}
    try:
        for position, group in enumerate(groups):
            first = linears[group[0]]
            names = [f"{context.prefix}.{name}" for name in group]
            stats = method.statistics(names, first.in_features, first.weight.device)
            all_stats.append(stats)
            last = position == len(groups) - 1
            handles.append(first.register_forward_pre_hook(_accumulator(stats, masks, group[0], stop=last)))
        for task, task_inputs in zip(tasks, context.inputs):
            for block_input in task_inputs:
                for group in groups:
                    masks[group[0]] = context.adapter.input_mask(context.stack, group[0], block_input.batch)
                with contextlib.suppress(_StopForward):
                    context.run(block_input)
            for group, stats in zip(groups, all_stats):
                stats.end_task(_expert_weights(task, stats.names, linears, group) if method.needs_experts else None)
    finally:
        for handle in handles:
            handle.remove()
    return all_stats


def _accumulator(stats, masks, name, stop: bool):
    def accumulate(module, args):
        x = args[0]
        mask = masks.get(name)
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
            x = x[mask]
        stats.add_batch(x.reshape(-1, x.shape[-1]))
        if stop:  # nothing after this linear is needed: skip the rest of the block
            raise _StopForward

    return accumulate


def _expert_weights(task: CalibrationTask, full_names, linears, group) -> dict[str, torch.Tensor]:
    weights = {}
    for full_name, name in zip(full_names, group):
        key = f"{full_name}.weight"
        weight = task.expert.get(key)
        expected = tuple(linears[name].weight.shape)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"expert of task {task.name!r} ({task.expert.path}): {key} has shape {tuple(weight.shape)}, "
                f"the merged model has {expected}"
            )
        weights[full_name] = weight
    return weights


def _quantize_linear(method, full_name, linear: nn.Linear, stats, stats_seconds, result: QuantizationResult):
    if stats is not None and not stats.tokens:
        raise ValueError(f"no calibration token reaches {full_name} (every mask is zero): its statistics would be empty")
    start = time.perf_counter()
    layer = method.quantize(full_name, linear.weight.detach().float(), stats)
    new_weight = layer.weight.to(device=linear.weight.device, dtype=linear.weight.dtype)
    if not torch.isfinite(new_weight).all():
        raise FloatingPointError(f"{method.name} produced NaN/Inf for {full_name}")
    linear.weight.data.copy_(new_weight)
    record = {
        "event": "layer",
        "layer": full_name,
        "method": method.name,
        "seconds": round(time.perf_counter() - start + stats_seconds, 4),
        **{key: (float(f"{value:.6g}") if isinstance(value, float) else value) for key, value in layer.record.items()},
    }
    if stats is not None:
        record["tokens"] = stats.tokens
    log.info(json.dumps(record))
    result.replacements[full_name] = layer.to(result.device)
    result.records.append(record)


def _advance(context: BlockContext, outputs: list | None) -> None:
    """Replace every cached block input by the block's output on it: the next block's input.

    ``outputs`` are precomputed outputs (of the fp block, for methods whose later blocks see fp
    inputs); by default the already-quantized block is run.
    """
    for position, block_input in enumerate(context.all_inputs()):
        output = context.run(block_input) if outputs is None else outputs[position]
        block_input.hidden = context.hidden(output)
        block_input.args, block_input.kwargs = context.adapter.next_block_inputs(output, block_input.args, block_input.kwargs)
