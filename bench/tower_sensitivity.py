"""How much round-to-nearest quantization hurts a mini-clip8 tower, and why (not).

For each model directory (the pretrained tower, an expert, a merged model), prints the zero-shot
average accuracy over the suite's tasks in fp and after RTN at each bit width (every encoder
linear, the suite's group size), the weights' relative RTN error ``||Q(W) - W|| / ||W||``, and
the activation outlier ratio of each linear's input: the largest per-channel absmax over the
median per-channel absmax, on 256 test images of the first task. Real CLIP towers have outlier
channels (ratios in the tens), which is what makes 4-bit RTN hurt them; a tower whose ratios sit
near 1 spreads the rounding noise evenly and shrugs it off.

    python bench/tower_sensitivity.py [MODEL_DIR ...] [--suite-dir results/mini-clip8] [--bits 4 3 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from epmq.grid import rtn_quantize
from epmq.suites import mini_clip8
from evals import clip_zeroshot as zs


class RecordingTower(zs.ClipVisionTower):
    """``ClipVisionTower`` that records each encoder linear's per-channel input absmax."""

    def __init__(self, config, state_dict):
        super().__init__(config, state_dict)
        self.channel_absmax: dict[str, torch.Tensor] | None = None

    def _linear(self, x, name):
        if self.channel_absmax is not None:
            self.channel_absmax[name] = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
        return super()._linear(x, name)


def encoder_linears(tower: zs.ClipVisionTower) -> list[str]:
    return [key[: -len(".weight")] for key in tower.w if key.startswith("encoder.layers.") and
            key.endswith(("_proj.weight", "fc1.weight", "fc2.weight"))]


def measure(model_dir: Path, cfg, head, sources: mini_clip8.Sources, bits_list, group_size) -> dict:
    if (model_dir / mini_clip8.HEAD_FILE).exists():  # a pretrained tower carries its own projection
        head = mini_clip8.load_head(model_dir / mini_clip8.HEAD_FILE)
    tower = RecordingTower.from_pretrained(model_dir).eval()
    tasks = list(cfg["tasks"])
    linears = encoder_linears(tower)
    first = mini_clip8.task_split(cfg, tasks[0], "test", sources)
    tower.channel_absmax = {}
    with torch.no_grad():
        tower(mini_clip8.to_pixel_values(first.images[:256], cfg))
    ratios = [float(m.max() / m.median()) for m in tower.channel_absmax.values()]
    tower.channel_absmax = None
    report = {"model": str(model_dir), "outlier_ratio": {"median": round(statistics.median(ratios), 2),
                                                         "max": round(max(ratios), 2)}}

    def average() -> dict:
        return mini_clip8.average_accuracy(mini_clip8.evaluate_tasks(tower, head, cfg, tasks, sources))

    fp = average()
    accuracy = fp["accuracy"]
    report["fp"] = {"accuracy": round(accuracy, 2), "stderr": round(fp["stderr"], 2)}
    originals = {name: tower.w[name + ".weight"].clone() for name in linears}
    for bits in bits_list:
        errors = []
        for name, weight in originals.items():
            quantized = rtn_quantize(weight, bits, group_size).weight
            errors.append(float((quantized - weight).norm() / weight.norm()))
            tower.w[name + ".weight"] = quantized
        rtn_accuracy = average()["accuracy"]
        report[f"rtn{bits}"] = {"accuracy": round(rtn_accuracy, 2), "change": round(rtn_accuracy - accuracy, 2),
                                "weight_rel_error": round(statistics.fmean(errors), 3)}
        tower.w.update({name + ".weight": weight for name, weight in originals.items()})
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
    cfg = mini_clip8.load_config(args.suite_config)
    mini_clip8.set_threads(cfg, args.threads)
    head = mini_clip8.load_head(args.suite_dir / "pretrained" / mini_clip8.HEAD_FILE)
    sources = mini_clip8.Sources(cfg, args.suite_dir / "data")  # read once, shared by every model
    for model_dir in args.models or [args.suite_dir / "pretrained"]:
        started = time.time()
        report = measure(model_dir, cfg, head, sources, args.bits, args.group_size)
        report["seconds"] = round(time.time() - started, 1)
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
