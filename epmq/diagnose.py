"""``python -m epmq diagnose``: where a merged model deviates from its experts, and where quantization adds to it.

Per linear layer of the adapter's blocks, in forward order, with ``X_i`` the inputs task ``i``'s
calibration data gives that linear in the fp merged model (the paper's common layer-wise input)
and ``H_i = X_i X_i^T`` (float64):

- merging deviation (eq. 5): ``sum_i ||W_m X_i - W_i X_i||^2 = sum_i tr((W_m - W_i) H_i (W_m - W_i)^T)``
- quantization deviation (eq. 3), per quantized model ``Q``: ``sum_i ||Q X_i - W_m X_i||^2``
- deviation of ``Q`` from the experts: ``sum_i ||Q X_i - W_i X_i||^2``

each relative to the experts' output energy ``sum_i ||W_i X_i||^2``; totals sum numerators and
denominators over layers. Tasks are processed one at a time, so memory holds one task's ``H`` of
every linear (not one per expert).

Before any of that, the merged checkpoint is checked for what breaks quantizers, each finding
naming its tensor: NaN/Inf, all-zero weights, mixed floating dtypes, input channels whose weight
column is zero in a linear; and, from calibration, input channels that never carry signal (zero
second moment over every task). NaN/Inf stop the run after the report (no deviation is defined).

Writes ``diagnose.json`` and ``diagnose.png`` (per-layer relative deviations on a log scale, and
the totals) into ``--out``.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from epmq.adapters import adapter_for, block_linears
from epmq.checkpoint import load_model
from epmq.io import LazyCheckpoint, atomic_output_dir, atomic_write_json, provenance, sha256_file
from epmq.progress import progress
from epmq.quantize import load_calibration
from epmq.solver import quadratic_objective

log = logging.getLogger(__name__)


def checkpoint_findings(path: str | Path, linears: list[str]) -> list[dict]:
    """What in a checkpoint breaks quantizers, one finding per tensor (``tensor``, ``problem``, ``detail``)."""
    checkpoint = LazyCheckpoint(path)
    findings = []
    dtypes: Counter = Counter()
    first_of: dict[str, str] = {}
    weight_keys = {checkpoint.resolve(f"{name}.weight"): name for name in linears}
    for key in checkpoint.keys():
        tensor = checkpoint.get(key)
        if not tensor.is_floating_point():
            continue
        dtypes[str(tensor.dtype)] += 1
        first_of.setdefault(str(tensor.dtype), key)
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            findings.append({"tensor": key, "problem": "nan_inf",
                             "detail": f"{int((~finite).sum())} of {tensor.numel()} entries are NaN or Inf"})
            continue
        if (tensor.ndim >= 2 or key.endswith("weight")) and tensor.numel() and not bool(tensor.any()):
            findings.append({"tensor": key, "problem": "all_zero", "detail": f"shape {list(tensor.shape)}"})
            continue
        if key in weight_keys:
            dead = int((~tensor.any(dim=0)).sum())
            if dead:
                findings.append({"tensor": key, "problem": "dead_input_channels",
                                 "detail": f"{dead} of {tensor.shape[1]} input columns are all zero"})
    if len(dtypes) > 1:
        common = dtypes.most_common(1)[0][0]
        for dtype, count in sorted(dtypes.items()):
            if dtype != common:
                findings.append({"tensor": first_of[dtype], "problem": "mixed_dtypes",
                                 "detail": f"{count} tensors are {dtype}, {dtypes[common]} are {common}"})
    return findings


def task_second_moments(model: nn.Module, adapter, batches: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """``H = X X^T`` (float64) of every linear in ``names`` over one task's batches (counted tokens only)."""
    moments: dict[str, torch.Tensor] = {}
    stacks = {f"{stack.prefix}.{index}.{name}": (stack, name)
              for stack in adapter.stacks(model) for index, block in enumerate(stack.blocks)
              for name in block_linears(block)}
    current: dict = {}

    def hook(full_name):
        stack, name = stacks[full_name]

        def accumulate(module, args):
            x = args[0]
            mask = adapter.input_mask(stack, name, current["batch"])
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                x = x[mask]
            x = x.reshape(-1, x.shape[-1]).double()
            moments[full_name] = moments[full_name] + x.T @ x if full_name in moments else x.T @ x

        return accumulate

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            for batch in batches:
                current["batch"] = batch
                adapter.run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return moments


def forward_order(model: nn.Module, adapter, batch: dict) -> list[str]:
    """The adapter's linears in the order one batch reaches them (never-reached ones last)."""
    names = [f"{stack.prefix}.{index}.{name}" for stack in adapter.stacks(model)
             for index, block in enumerate(stack.blocks) for name in block_linears(block)]
    order: list[str] = []
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: order.append(name) if name not in order else None) for name in names]
    try:
        with torch.no_grad():
            adapter.run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return order + [name for name in names if name not in order]


def diagnose(merged: Path, experts: list[Path], calib: list[Path], quantized: list[Path],
             batch_size: int = 8, device: str = "cpu") -> dict:
    """The report ``python -m epmq diagnose`` writes (see the module docstring)."""
    model = load_model(merged).to(device).eval()
    adapter = adapter_for(model)
    names = [f"{stack.prefix}.{index}.{name}" for stack in adapter.stacks(model)
             for index, block in enumerate(stack.blocks) for name in block_linears(block)]
    report = {
        "merged": str(merged), "experts": [str(e) for e in experts], "quantized": [str(q) for q in quantized],
        "calibration": [{"file": str(c), "sha256": sha256_file(c)} for c in calib],
        "checks": checkpoint_findings(merged, names),
    }
    if any(finding["problem"] == "nan_inf" for finding in report["checks"]):
        return report
    tasks = load_calibration(calib, [c.stem for c in calib], experts, batch_size)
    order = forward_order(model, adapter, {k: v.to(device) for k, v in tasks[0].batches[0].items()})
    merged_weights = {name: model.get_submodule(name).weight.detach().double().cpu() for name in order}
    quantized_weights = []
    for path in quantized:
        other = load_model(path)
        quantized_weights.append({name: other.get_submodule(name).weight.detach().double() for name in order})
        del other
    zero = {name: 0.0 for name in order}
    merge, energy = dict(zero), dict(zero)
    quant = [dict(zero) for _ in quantized]
    total = [dict(zero) for _ in quantized]
    signal = {name: None for name in order}
    for task in progress(tasks, desc="diagnose tasks", unit="task"):
        moments = task_second_moments(model, adapter, [{k: v.to(device) for k, v in b.items()} for b in task.batches], order)
        for name in order:
            h = moments[name].cpu()
            diagonal = torch.diagonal(h) > 0
            signal[name] = diagonal if signal[name] is None else signal[name] | diagonal
            expert = task.expert.get(f"{name}.weight").double()
            merged_weight = merged_weights[name]
            energy[name] += quadratic_objective(expert, torch.zeros_like(expert), h)
            merge[name] += quadratic_objective(merged_weight, expert, h)
            for position, weights in enumerate(quantized_weights):
                quant[position][name] += quadratic_objective(weights[name], merged_weight, h)
                total[position][name] += quadratic_objective(weights[name], expert, h)
        del moments
    for name in order:
        dead = int((~signal[name]).sum())
        if dead:
            report["checks"].append({"tensor": f"{name}.weight", "problem": "dead_input_channels",
                                     "detail": f"{dead} of {signal[name].numel()} input channels carry no signal "
                                               "on any calibration task"})

    def relative(numerator, denominator):
        return numerator / denominator if denominator > 0 else None

    report["layers"] = [
        {"layer": name, "experts_energy": energy[name], "merging_deviation": merge[name],
         "merging_relative": relative(merge[name], energy[name]),
         "quantization_relative": [relative(q[name], energy[name]) for q in quant],
         "total_relative": [relative(t[name], energy[name]) for t in total]}
        for name in order
    ]
    all_energy = sum(energy.values())
    report["totals"] = {
        "merging_relative": relative(sum(merge.values()), all_energy),
        "quantized": [{"model": str(path), "quantization_relative": relative(sum(q.values()), all_energy),
                       "total_relative": relative(sum(t.values()), all_energy)}
                      for path, q, t in zip(quantized, quant, total)],
    }
    return report


def short_names(paths: list[str]) -> list[str]:
    """The fewest trailing path components that tell ``paths`` apart (``rtn/w4g32n16``, not ``w4g32n16``)."""
    parts = [Path(path).parts for path in paths]
    for count in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-count:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(path) for path in paths]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.get("layers", [])
    figure, (per_layer, totals) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    positions = range(len(layers))

    def series(values):
        return [float("nan") if v is None else v for v in values]

    per_layer.plot(positions, series([layer["merging_relative"] for layer in layers]), "o-", ms=3, label="merging (W_m vs experts)")
    names = short_names(report["quantized"])
    for index, name in enumerate(names):
        per_layer.plot(positions, series([layer["quantization_relative"][index] for layer in layers]), ".-",
                       label=f"quantization ({name} vs W_m)")
    per_layer.set_yscale("log")
    per_layer.set_xlabel("linear layer, forward order")
    per_layer.set_ylabel("deviation / sum_i ||W_i X_i||^2")
    ticks = list(positions)[:: max(1, len(layers) // 24)]
    per_layer.set_xticks(ticks, [layers[i]["layer"].split(".", 2)[-1] if len(layers[i]["layer"]) < 40
                                 else layers[i]["layer"][-38:] for i in ticks], rotation=90, fontsize=6)
    per_layer.legend(fontsize=7, framealpha=0.6)
    per_layer.set_title("per-layer relative deviation")
    labels = ["merged"] + names
    values = [report["totals"]["merging_relative"]] + [q["total_relative"] for q in report["totals"]["quantized"]]
    totals.bar(range(len(labels)), series(values))
    totals.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    totals.set_title("total deviation from the experts")
    figure.suptitle(f"{'/'.join(Path(report['merged']).parts[-3:])} against its {len(report['experts'])} experts",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="the merged model (fp)")
    parser.add_argument("--experts", required=True, nargs="+", type=Path, help="expert checkpoints, one per task")
    parser.add_argument("--calib", required=True, nargs="+", type=Path, help="calibration files, one per task, same order")
    parser.add_argument("--quantized", nargs="*", type=Path, default=[], help="quantized models of the merged model")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, type=Path, help="output directory: diagnose.json, diagnose.png")


def run(args: argparse.Namespace) -> int:
    if len(args.experts) != len(args.calib):
        raise ValueError(f"got {len(args.experts)} experts but {len(args.calib)} calibration files: one per task, same order")
    report = diagnose(args.model, args.experts, args.calib, args.quantized, args.batch_size, args.device)
    report["provenance"] = provenance()
    for finding in report["checks"]:
        print(f"check: {finding['tensor']}: {finding['problem']}: {finding['detail']}")
    for layer in report.get("layers", []):
        merge = "-" if layer["merging_relative"] is None else f"{layer['merging_relative']:.3g}"
        quant = " ".join("-" if q is None else f"{q:.3g}" for q in layer["quantization_relative"])
        print(f"{layer['layer']}\tmerging {merge}" + (f"\tquantization {quant}" if quant else ""))
    if "totals" in report:
        totals = report["totals"]
        print(f"total merging deviation (relative): {totals['merging_relative']:.4g}")
        for entry in totals["quantized"]:
            print(f"{entry['model']}: quantization {entry['quantization_relative']:.4g}, "
                  f"against the experts {entry['total_relative']:.4g}")
    with atomic_output_dir(args.out) as staging:
        atomic_write_json(staging / "diagnose.json", report)
        if "layers" in report:
            plot(report, staging / "diagnose.png")
    if "layers" not in report:
        print(f"error: {args.model} has NaN/Inf tensors (listed above): no deviation is defined", flush=True)
        return 2
    return 0
