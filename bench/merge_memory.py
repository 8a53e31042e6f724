"""Peak memory of the streaming merge with K = 2 vs K = 8 experts: it should not grow with K models.

Builds a small random LlamaForCausalLM (about 93 MB of float32 weights), K random perturbations
of it as experts, and runs ``python -m epmq merge`` in a fresh subprocess per (method, K),
reading that child's peak resident set size from ``os.wait4``. A child that only imports the
merge stage gives the baseline (interpreter, torch, transformers) that every run pays. The
models are built in a child too: a child's peak RSS counts the parent's pages it was forked
with, so the measuring parent stays small (it never imports torch).

Expected: peak - baseline is about one output shard (here the whole model, 93 MB) plus a few
copies of the K experts' largest tensor (here an MLP weight of 2.8 MB), so K = 8 costs a few
largest-tensor copies per extra expert more than K = 2, far from the 6 extra models (560 MB)
that loading them would cost. The allocator's retention makes single runs vary by a few tens of MB.

    python bench/merge_memory.py [--methods ties task_arithmetic ...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
MAX_EXPERTS = 8
# WUDI's memory does not depend on its number of steps; 300 CPU steps would only cost time.
METHOD_PARAMS = {"wudi": ["--param", "steps=2"]}
# One intra-op thread: on a small shared machine, spinning OpenMP threads only add wall time.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def build_models(root: Path) -> None:
    """Write the pretrained model and the experts under ``root``; print their sizes as JSON."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024,  # a small vocabulary: no one tensor dwarfs the others
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=7,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    pretrained = root / "pretrained"
    LlamaForCausalLM(config).save_pretrained(pretrained)
    weights = load_file(pretrained / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for position in range(MAX_EXPERTS):
        expert = root / f"expert{position}"
        expert.mkdir()
        shutil.copy(pretrained / "config.json", expert / "config.json")
        perturbed = {key: value + 1e-3 * torch.randn(value.shape, generator=generator)
                     for key, value in weights.items()}
        save_file(perturbed, expert / "model.safetensors", metadata={"format": "pt"})
    sizes = [value.numel() * value.element_size() for value in weights.values()]
    print(json.dumps({"model_bytes": sum(sizes), "largest_bytes": max(sizes)}))


def peak_rss(command: list[str]) -> tuple[int, float]:
    """Run ``command``; return its peak resident set size in bytes and its wall time."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=CHILD_ENV)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {child.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["simple_average", "task_arithmetic", "ties", "wudi"])
    parser.add_argument("--workdir", type=Path, help="where to build the models (default: a temporary directory)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the model-building child
    args = parser.parse_args()
    if args.build:
        build_models(args.build)
        return

    root = Path(tempfile.mkdtemp(prefix="merge_memory-", dir=args.workdir))
    try:
        built = subprocess.run(
            [sys.executable, __file__, "--build", str(root)], env=CHILD_ENV, check=True, capture_output=True, text=True
        )
        sizes = json.loads(built.stdout.splitlines()[-1])
        model_bytes, largest_bytes = sizes["model_bytes"], sizes["largest_bytes"]
        pretrained, experts = root / "pretrained", [root / f"expert{i}" for i in range(MAX_EXPERTS)]
        print(f"model: {model_bytes / MIB:.1f} MiB float32, largest tensor {largest_bytes / MIB:.1f} MiB")
        baseline, _ = peak_rss([sys.executable, "-c", "import epmq.merge, transformers"])
        print(f"baseline (python + torch + transformers + epmq.merge): {baseline / MIB:.0f} MiB")
        print(f"{'method':<16} {'K':>2} {'peak MiB':>9} {'- baseline':>11} {'seconds':>8}")
        for method in args.methods:
            peaks = {}
            for count in (2, 8):
                out = root / f"merged-{method}-{count}"
                command = [sys.executable, "-m", "epmq", "--log-level", "WARNING", "merge", "--method", method,
                           "--pretrained", str(pretrained), "--experts", *map(str, experts[:count]),
                           "--out", str(out), "--device", "cpu", *METHOD_PARAMS.get(method, [])]
                peak, seconds = peak_rss(command)
                shutil.rmtree(out)
                peaks[count] = peak
                print(f"{method:<16} {count:>2} {peak / MIB:>9.0f} {(peak - baseline) / MIB:>11.0f} {seconds:>8.1f}")
            extra = peaks[8] - peaks[2]
            print(
                f"{method:<16} K8/K2 peak ratio {peaks[8] / peaks[2]:.2f} "
                f"({(peaks[8] - baseline) / (peaks[2] - baseline):.2f} above baseline); K=8 - K=2 = {extra / MIB:.0f} MiB"
                f" = {extra / largest_bytes:.1f} largest tensors = {extra / model_bytes:.2f} models"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
