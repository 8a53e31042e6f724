"""E-PMQ's cost over GPTQ: time on one ViT-B/32 fc2 layer, and peak memory versus the number of experts.

Part 1 (time). One 768 x 3072 linear (CLIP ViT-B/32's fc2), 8 experts stored as safetensors
files, 12,800 calibration tokens per task (256 images x 50 tokens, the paper's B/32 setting). Each
method is timed from calibration inputs to quantized weight through the engine's own code path
(per-task Hessian accumulation in batches, expert folding read lazily from disk for E-PMQ,
statistics, rounding); the forward passes that produce the inputs are the same for both methods
and are not part of either time. Methods alternate over ``--repeats`` rounds; the best time of
each is compared. Both wall time and the process's CPU time are measured: with one thread (the
default) CPU time is the work done, unaffected by other processes on a shared machine, and it is
the ratio printed last; pass ``--threads N`` to time a multi-threaded run (wall time then).

Part 2 (memory). Peak resident memory of ``python -m epmq quantize --method epmq`` on a small
CLIPVisionModel with K = 2 and K = 8 experts, each in a fresh process, with the same total number
of calibration images, so that the difference isolates the experts.

The last line printed is ``epmq/gptq time ratio: R``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from epmq.config import method_params
from epmq.io import LazyCheckpoint
from epmq.catalog import get_method

LAYER = "encoder.layers.11.mlp.fc2"


def make_task_inputs(k: int, tokens: int, d_in: int, seed: int) -> list[torch.Tensor]:
    """Per-task activations with their own channel scales (fc2 inputs are post-GELU, skewed)."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(k):
        scales = torch.rand(d_in, generator=g) ** 3 * 2 + 0.05
        inputs.append(torch.nn.functional.gelu(torch.randn(tokens, d_in, generator=g)) * scales)
    return inputs


def time_method(name: str, weight, inputs, experts, batch_tokens: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) from calibration inputs to the quantized weight."""
    method = get_method(name, method_params("quantize"))
    start, cpu_start = time.perf_counter(), time.process_time()
    stats = method.statistics([LAYER], weight.shape[1], weight.device)
    for task_inputs, expert in zip(inputs, experts):
        for i in range(0, task_inputs.shape[0], batch_tokens):
            stats.add_batch(task_inputs[i : i + batch_tokens])
        stats.end_task({LAYER: expert.get(f"{LAYER}.weight")} if method.needs_experts else None)
    method.quantize(LAYER, weight, stats)
    return time.perf_counter() - start, time.process_time() - cpu_start


def timing(args) -> float:
    d_out, d_in = 768, 3072
    g = torch.Generator().manual_seed(0)
    base = torch.randn(d_out, d_in, generator=g) * 0.02
    with tempfile.TemporaryDirectory() as tmp:
        experts = []
        for i in range(args.experts):
            path = Path(tmp) / f"expert{i}.safetensors"
            save_file({f"{LAYER}.weight": base + 0.002 * torch.randn(d_out, d_in, generator=g)}, str(path))
            experts.append(LazyCheckpoint(path))
        merged = base + 0.3 * sum(e.get(f"{LAYER}.weight") - base for e in experts)
        inputs = make_task_inputs(args.experts, args.tokens, d_in, seed=1)
        print(f"layer {d_out}x{d_in}, {args.experts} experts, {args.tokens} tokens per task, "
              f"{torch.get_num_threads()} threads, best of {args.repeats}")
        times = {"gptq": [], "epmq": []}
        for round_ in range(args.repeats):
            for name in ("gptq", "epmq"):
                times[name].append(time_method(name, merged, inputs, experts, args.batch_tokens))
                wall, cpu = times[name][-1]
                print(f"  round {round_ + 1}: {name:5s} wall {wall:.2f} s, cpu {cpu:.2f} s")
    wall = {name: min(t[0] for t in values) for name, values in times.items()}
    cpu = {name: min(t[1] for t in values) for name, values in times.items()}
    print(f"best wall: gptq {wall['gptq']:.2f} s, epmq {wall['epmq']:.2f} s, ratio {wall['epmq'] / wall['gptq']:.3f}")
    print(f"best cpu:  gptq {cpu['gptq']:.2f} s, epmq {cpu['epmq']:.2f} s, ratio {cpu['epmq'] / cpu['gptq']:.3f}")
    measure = cpu if torch.get_num_threads() == 1 else wall
    return measure["epmq"] / measure["gptq"]


def memory_child(k: int, directory: Path, total_images: int) -> None:
    """Quantize a small CLIP tower with K experts via the CLI; print this process's peak RSS."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from epmq.cli import main

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                              image_size=32, patch_size=4)
    model_dir = directory / "merged"
    if not model_dir.exists():
        CLIPVisionModel(config).save_pretrained(model_dir)
    merged = CLIPVisionModel.from_pretrained(model_dir)
    experts, calib = [], []
    for i in range(k):
        expert_dir = directory / f"expert{i}"
        if not expert_dir.exists():
            state = {n: p + 0.01 * torch.randn_like(p) for n, p in merged.state_dict().items()}
            expert_dir.mkdir()
            save_file({n: t.contiguous() for n, t in state.items()}, str(expert_dir / "model.safetensors"))
        experts.append(str(expert_dir))
        calib_file = directory / f"calib{k}_{i}.safetensors"
        save_file({"pixel_values": torch.randn(total_images // k, 3, 32, 32)}, str(calib_file))
        calib.append(str(calib_file))
    del merged
    status = main(["--log-level", "WARNING", "quantize", "--model", str(model_dir), "--method", "epmq",
                   "--out", str(directory / f"q{k}"), "--experts", *experts, "--calib", *calib])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"k": k, "status": status, "peak_rss_mib": round(peak_mib, 1)}))


def memory(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        peaks = {}
        for k in (2, 8):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(k), tmp, "--total-images", str(args.total_images)],
                capture_output=True, text=True, check=True,
            )
            record = json.loads(out.stdout.strip().splitlines()[-1])
            if record["status"] != 0:
                raise RuntimeError(f"quantize failed for K={k}: {out.stderr[-2000:]}")
            peaks[k] = record["peak_rss_mib"]
            print(f"peak RSS, E-PMQ on a 4-block CLIP tower (hidden 384), K={k} experts, "
                  f"{args.total_images} calibration images in total: {peaks[k]:.0f} MiB")
        print(f"peak memory ratio K=8 / K=2: {peaks[8] / peaks[2]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=12800, help="calibration tokens per task")
    parser.add_argument("--batch-tokens", type=int, default=800, help="tokens per calibration batch (16 images)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--total-images", type=int, default=64)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is the measure)")
    parser.add_argument("--memory-child", nargs=2, metavar=("K", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(int(args.memory_child[0]), Path(args.memory_child[1]), args.total_images)
        return
    if not args.skip_memory:
        memory(args)
    ratio = timing(args)
    print(f"epmq/gptq time ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
