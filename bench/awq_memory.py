"""AWQ's memory against the size of the calibration set (issue 13, item 2).

Quantizes a small random Llama (hidden 256, MLP 1024, 2 layers) with AWQ on ``n`` and ``4 n``
calibration sequences of 128 tokens, each run in a fresh process, and prints the peak memory AWQ's
own search adds over what the engine already holds: per block, the peak resident set size during
``prepare_block`` (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the resident
size when it starts, the maximum over blocks. The engine's cache of block inputs (which grows with
the calibration set for every method) is in the starting size, not in the figure.

    python bench/awq_memory.py                       # this checkout
    python bench/awq_memory.py --code /path/to/main  # another checkout's epmq/baselines (before)

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(samples: int, batch: int, code: Path) -> dict:
    """One run in this process: AWQ's peak extra memory (MiB) over its blocks, and the run's time."""
    sys.path.insert(0, str(code))
    sys.path.insert(1, str(ROOT))
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from baselines.awq import AWQ
    from epmq.config import method_params
    from epmq.engine import CalibrationTask, quantize_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (samples, 128), generator=torch.Generator().manual_seed(1))
    task = CalibrationTask("calib", [{"input_ids": ids[i : i + batch]} for i in range(0, samples, batch)])
    peaks = []
    prepare = AWQ.prepare_block

    def measured(self, context):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        start = _status_kib("VmRSS")
        prepare(self, context)
        peaks.append((_status_kib("VmHWM") - start) / 1024)

    AWQ.prepare_block = measured
    method = AWQ(method_params("quantize", bits=4, group_size=128))
    began = time.perf_counter()
    quantize_model(model, method, [task])
    return {"samples": samples, "awq_peak_extra_mib": round(max(peaks), 1), "seconds": round(time.perf_counter() - began, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences of the 1x run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose epmq/ and baselines/ are measured")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size here
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.code.resolve())))
        return
    results = []
    for samples in (args.samples, 4 * args.samples):
        # A fixed mmap threshold makes glibc map every large tensor on its own and unmap it when
        # freed, so the resident size follows the live tensors instead of the heap's history.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, __file__, "--one", str(samples), "--batch", str(args.batch),
                              "--code", str(args.code)], capture_output=True, text=True, check=True, env=env)
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    for result in results:
        print(f"{result['samples']:4d} samples x 128 tokens: AWQ adds at most {result['awq_peak_extra_mib']:.1f} MiB "
              f"over the engine's cache ({result['seconds']:.1f} s)")
    ratio = results[1]["awq_peak_extra_mib"] / max(results[0]["awq_peak_extra_mib"], 1e-9)
    print(f"4x / 1x: {ratio:.2f} (code: {args.code})")


if __name__ == "__main__":
    main()
