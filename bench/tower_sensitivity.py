"""How much round-to-nearest quantization hurts a mini-clip8 or mini-dino tower, and why (not).

For each model directory (the pretrained tower, an expert, a merged model), prints the zero-shot
average accuracy over the suite's tasks in fp and after RTN at each bit width (every encoder
linear, the suite's group size), the weights' relative RTN error ``||Q(W) - W|| / ||W||``, and
the activation outlier ratio of each linear's input: the largest per-channel absmax over the
median per-channel absmax, on 256 test images of the first task. Real CLIP towers have outlier
channels (ratios in the tens), which is what makes 4-bit RTN hurt them; a tower whose ratios sit
near 1 spreads the rounding noise evenly and shrugs it off.

For a mini-dino tower (a transformers ``Dinov2Model``; ``--suite-config`` of builder mini-dino) it
also prints the residual stream's outlier ratio (each block's output, same statistic) and, with
each RTN accuracy, the paired standard error of the change (the same test images, before and after).

    python bench/tower_sensitivity.py [MODEL_DIR ...] [--suite-dir results/mini-clip8] [--bits 4 3 2] [--threads N]
    python bench/tower_sensitivity.py --suite-config epmq/suites/mini-dino.yaml --suite-dir results/mini-dino
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import math

import torch

from epmq.checkpoint import load_model
from epmq.grid import rtn_quantize
from epmq.suites.base import builder_of
from epmq.suites.common import set_threads
from epmq.suites.mini_clip8 import MiniClip8
from epmq.suites.mini_clip8.data import Sources, task_split, to_pixel_values
from epmq.suites.mini_clip8.evaluation import average_accuracy, evaluate_tasks, rounded
from epmq.suites.mini_clip8.heads import HEAD_FILE, load_head
from evals import clip_zeroshot as zs


def encoder_linears(tower: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The encoder's linears of a plain-torch ``CLIPVisionModel`` (``epmq.models``), by module name."""
    return {name: module for name, module in tower.named_modules()
            if name.startswith("encoder.layers.") and isinstance(module, torch.nn.Linear)}


def measure(model_dir: Path, cfg, head, sources: Sources, bits_list, group_size) -> dict:
    if (model_dir / HEAD_FILE).exists():  # a pretrained tower carries its own projection
        head = load_head(model_dir / HEAD_FILE)
    tower = load_model(model_dir, plain_torch=True).eval()
    tasks = list(cfg["tasks"])
    linears = encoder_linears(tower)
    first = task_split(cfg, tasks[0], "test", sources)
    channel_absmax: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            channel_absmax[name] = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
        return hook

    handles = [linear.register_forward_pre_hook(record(name)) for name, linear in linears.items()]
    with torch.no_grad():
        tower(to_pixel_values(first.images[:256], cfg))
    for handle in handles:
        handle.remove()
    ratios = [float(m.max() / m.median()) for m in channel_absmax.values()]
    report = {"model": str(model_dir), "outlier_ratio": {"median": round(statistics.median(ratios), 2),
                                                         "max": round(max(ratios), 2)}}

    def average() -> dict:
        return average_accuracy(rounded(evaluate_tasks(zs.hf_pooled_encoder(tower), head, cfg, tasks, sources),
                                        MiniClip8.record_digits))

    fp = average()
    accuracy = fp["accuracy"]
    report["fp"] = {"accuracy": round(accuracy, 2), "stderr": round(fp["stderr"], 2)}
    originals = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    for bits in bits_list:
        errors = []
        with torch.no_grad():
            for name, weight in originals.items():
                quantized = rtn_quantize(weight, bits, group_size).weight
                errors.append(float((quantized - weight).norm() / weight.norm()))
                linears[name].weight.copy_(quantized)
        rtn_accuracy = average()["accuracy"]
        report[f"rtn{bits}"] = {"accuracy": round(rtn_accuracy, 2), "change": round(rtn_accuracy - accuracy, 2),
                                "weight_rel_error": round(statistics.fmean(errors), 3)}
        with torch.no_grad():
            for name, weight in originals.items():
                linears[name].weight.copy_(weight)
    return report


def channel_outlier_ratio(x: torch.Tensor) -> float:
    """Largest per-channel absmax over the median per-channel absmax of activations [..., channels]."""
    absmax = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
    return float(absmax.max() / absmax.median())


def measure_hf(model_dir: Path, cfg, head, sources: Sources, bits_list, group_size) -> dict:
    """``measure`` for a transformers tower of mini-dino (hooks record the linears' inputs)."""
    from epmq.adapters import adapter_for, block_linears
    from epmq.suites.mini_dino.tower import to_pixel_values as dino_pixel_values

    model = load_model(model_dir).eval()
    adapter = adapter_for(model)
    linears = {f"{stack.prefix}.{i}.{name}": module for stack in adapter.stacks(model)
               for i, block in enumerate(stack.blocks) for name, module in block_linears(block).items()}
    tasks = list(cfg["tasks"])
    first = task_split(cfg, tasks[0], "test", sources)
    ratios: dict[str, float] = {}
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: ratios.__setitem__(name, channel_outlier_ratio(args[0])))
               for name, module in linears.items()]
    with torch.no_grad():
        hidden = model(pixel_values=dino_pixel_values(first.images[:256], cfg), output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    residual = [channel_outlier_ratio(h) for h in hidden[1:]]
    worst = max(ratios, key=ratios.get)
    report = {"model": str(model_dir),
              "outlier_ratio": {"median": round(statistics.median(ratios.values()), 2), "max": round(ratios[worst], 2),
                                "max_at": worst},
              "residual_outlier_ratio": {"median": round(statistics.median(residual), 2), "max": round(max(residual), 2)}}
    splits = {task: task_split(cfg, task, "test", sources) for task in tasks}

    def correct() -> dict[str, torch.Tensor]:
        out = {}
        for task, split in splits.items():
            with torch.inference_mode():
                preds = zs.predict(zs.hf_pooled_encoder(model), dino_pixel_values(split.images, cfg),
                                   head["visual_projection.weight"], head[f"heads.{task}"], head["logit_scale"],
                                   cfg["eval"]["batch_size"])
            out[task] = (preds == split.labels).double()
        return out

    fp = correct()
    accuracy = 100 * statistics.fmean(float(c.mean()) for c in fp.values())
    report["fp"] = {"accuracy": round(accuracy, 2),
                    "stderr": round(100 * zs.average_stderr([zs.binomial_stderr(float(c.mean()), len(c)) for c in fp.values()]), 2)}
    originals = {name: module.weight.detach().clone() for name, module in linears.items()}
    for bits in bits_list:
        errors = []
        with torch.no_grad():
            for name, module in linears.items():
                quantized = rtn_quantize(originals[name], bits, group_size).weight
                errors.append(float((quantized - originals[name]).norm() / originals[name].norm()))
                module.weight.copy_(quantized)
        after = correct()
        change = 100 * statistics.fmean(float((after[t] - fp[t]).mean()) for t in tasks)
        paired = 100 * math.sqrt(sum(float((after[t] - fp[t]).var()) / len(fp[t]) for t in tasks)) / len(tasks)
        report[f"rtn{bits}"] = {"accuracy": round(accuracy + change, 2), "change": round(change, 2),
                                "paired_stderr": round(paired, 2), "weight_rel_error": round(statistics.fmean(errors), 3)}
        with torch.no_grad():
            for name, module in linears.items():
                module.weight.copy_(originals[name])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", type=Path, help="model directories (default: the pretrained tower)")
    parser.add_argument("--suite-dir", type=Path, default=Path("results/mini-clip8"))
    parser.add_argument("--suite-config", default=None, help="suite YAML (default: the packaged mini-clip8.yaml)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    args = parser.parse_args()
    dino = args.suite_config is not None and builder_of(args.suite_config) == "mini-dino"
    if dino:
        from epmq.suites.mini_dino import MiniDino

        cfg = MiniDino.load_config(args.suite_config)
    else:
        cfg = MiniClip8.load_config(args.suite_config)
    set_threads(cfg, args.threads)
    head = load_head(args.suite_dir / "pretrained" / HEAD_FILE)
    sources = Sources(cfg, args.suite_dir / "data")  # read once, shared by every model
    for model_dir in args.models or [args.suite_dir / "pretrained"]:
        started = time.time()
        report = (measure_hf if dino else measure)(model_dir, cfg, head, sources, args.bits, args.group_size)
        report["seconds"] = round(time.time() - started, 1)
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
