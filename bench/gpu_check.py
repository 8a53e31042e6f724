"""The same small pipeline on the CPU and on a GPU: the quantized codes and accuracies must agree.

Pipeline (a random Llama, ``--experts`` perturbed copies as experts, seeded calibration tokens):
merge (task arithmetic and TIES) -> GPTQ, E-PMQ and AWQ on the CPU-merged model -> evaluation
(top-1 agreement of each quantized model's next-token predictions with the merged fp model's on
held-out tokens). Each stage runs once with the model on the CPU and once on ``--device``.

Checks, per method: at least 99% of the codes identical and the others one grid step apart,
quantized results handed back on the host (issue 13, item 3), accuracies within
``--accuracy-tolerance`` points; merges: the merged weights within float32 rounding. Prints each
stage's time on both devices and its peak GPU memory. Without CUDA it says so and exits 0.

    python bench/gpu_check.py                 # on a machine with a GPU
    python bench/gpu_check.py --device cpu    # the checks themselves, CPU against CPU
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("gptq", "epmq", "awq")
MERGES = ("task_arithmetic", "ties")
MIB = 1 << 20


def build(hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.05)
    return model


def perturbed(state: dict, count: int, scale: float) -> list[dict]:
    """``count`` experts: each floating tensor plus its own seeded noise."""
    experts = []
    for index in range(count):
        generator = torch.Generator().manual_seed(100 + index)
        experts.append({key: value + scale * torch.randn(value.shape, generator=generator) if value.is_floating_point()
                        else value.clone() for key, value in state.items()})
    return experts


class Stage:
    """Wall time and peak GPU memory of one stage on one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MIB
        else:
            self.peak_mib = None
        self.seconds = time.perf_counter() - self.start


def run_pipeline(device: torch.device, model, experts_sd, expert_files, calib, eval_ids, reference) -> dict:
    """Every stage on ``device``: merged state per merge, codes and accuracy per method, stage figures."""
    from epmq.config import method_params
    from epmq.engine import CalibrationTask, quantize_model
    from epmq.io import LazyCheckpoint
    from epmq.merge.registry import merge_state_dicts
    from epmq.catalog import get_method

    out = {"merged": {}, "codes": {}, "accuracy": {}, "stages": {}, "on_host": {}}
    pretrained_sd = {key: value.to(device) for key, value in model.state_dict().items()}
    experts_on_device = [{key: value.to(device) for key, value in expert.items()} for expert in experts_sd]
    for merge in MERGES:
        with Stage(device) as stage:
            merged = merge_state_dicts(merge, pretrained_sd, experts_on_device, {"scaling": 0.3})
        out["merged"][merge] = {key: value.cpu() for key, value in merged.items()}
        out["stages"][f"merge {merge}"] = stage
    del pretrained_sd, experts_on_device
    tasks = [CalibrationTask(f"task{i}", [{"input_ids": ids}], LazyCheckpoint(file))
             for i, (ids, file) in enumerate(zip(calib, expert_files))]
    for name in METHODS:
        quantized = copy.deepcopy(model).to(device)
        with Stage(device) as stage:
            result = quantize_model(quantized, get_method(name, method_params("quantize", bits=4, group_size=32)), tasks)
        out["stages"][f"quantize {name}"] = stage
        out["codes"][name] = {layer: r.replacement.codes for layer, r in result.replacements.items()}
        out["on_host"][name] = all(r.replacement.codes.device.type == "cpu" for r in result.replacements.values())
        with Stage(device) as stage, torch.no_grad():
            predictions = quantized(eval_ids.to(device)).logits.argmax(dim=-1).cpu()
        out["stages"][f"evaluate {name}"] = stage
        out["accuracy"][name] = 100.0 * float((predictions == reference).float().mean())
        del quantized
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences per task")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--accuracy-tolerance", type=float, default=1.0, help="percentage points")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: nothing to compare, no check run.")
        return 0
    model = build(args.hidden, args.layers, args.vocab)
    # The same merged model enters quantization on both devices (the merges are compared on their own).
    from epmq.merge.registry import merge_state_dicts
    from safetensors.torch import save_file

    experts_sd = perturbed(model.state_dict(), args.experts, 0.01)
    model.load_state_dict(merge_state_dicts("task_arithmetic", model.state_dict(), experts_sd, {"scaling": 0.3}))
    generator = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, args.vocab, (args.samples, args.length), generator=generator) for _ in experts_sd]
    eval_ids = torch.randint(0, args.vocab, (32, args.length), generator=generator)
    with torch.no_grad():
        reference = model(eval_ids).logits.argmax(dim=-1)
    with tempfile.TemporaryDirectory() as tmp:
        expert_files = []
        for index, expert in enumerate(experts_sd):
            expert_files.append(Path(tmp) / f"expert{index}.safetensors")
            save_file({k: v.contiguous() for k, v in expert.items() if k != "lm_head.weight"}, str(expert_files[-1]))
        host, other = (run_pipeline(torch.device(d), model, experts_sd, expert_files, calib, eval_ids, reference)
                       for d in ("cpu", args.device))
    failures = []
    print(f"{'stage':<22} {'cpu s':>8} {args.device + ' s':>9} {'peak GPU MiB':>13}")
    for name, stage in host["stages"].items():
        twin = other["stages"][name]
        peak = f"{twin.peak_mib:.1f}" if twin.peak_mib is not None else "-"
        print(f"{name:<22} {stage.seconds:>8.2f} {twin.seconds:>9.2f} {peak:>13}")
    for merge in MERGES:
        worst = max(float((host["merged"][merge][k].float() - other["merged"][merge][k].float()).abs().max())
                    for k in host["merged"][merge])
        print(f"merge {merge}: max |cpu - {args.device}| = {worst:.2e}")
        if worst > 1e-5:
            failures.append(f"merge {merge} differs by {worst:.2e}")
    for name in METHODS:
        codes_cpu, codes_dev = host["codes"][name], other["codes"][name]
        equal = sum(int((codes_cpu[k] == codes_dev[k]).sum()) for k in codes_cpu)
        total = sum(codes_cpu[k].numel() for k in codes_cpu)
        steps = max(int((codes_cpu[k].int() - codes_dev[k].int()).abs().max()) for k in codes_cpu)
        gap = abs(host["accuracy"][name] - other["accuracy"][name])
        print(f"{name}: codes identical {100 * equal / total:.3f}%, largest difference {steps} step(s); "
              f"accuracy cpu {host['accuracy'][name]:.2f}% vs {args.device} {other['accuracy'][name]:.2f}%; "
              f"results on the host: {other['on_host'][name]}")
        if equal < 0.99 * total or steps > 1:
            failures.append(f"{name}: {100 * equal / total:.3f}% identical codes, largest difference {steps}")
        if gap > args.accuracy_tolerance:
            failures.append(f"{name}: accuracies differ by {gap:.2f} points")
        if not other["on_host"][name]:
            failures.append(f"{name}: quantized codes left on {args.device}")
    print("OK" if not failures else "FAILED: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
