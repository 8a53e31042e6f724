"""AWQ with and without its candidate cache on a built suite: time of each, and whether the models are equal.

    python bench/awq_search_cache.py [--suite-dir results/mini-clip8] [--merge ties] [--set awq.search_samples=512]

Runs ``python -m epmq quantize --method awq`` on the suite's merged model and calibration sets twice
*at the same time*, once with ``awq.search_cache_mib=0`` (every candidate re-quantized per batch,
as before the cache) and once with the default, so both see the same machine load; prints each
one's quantization seconds (``quantization.json``), whether the two ``model.safetensors`` hold the
same tensors, and last ``cached/recomputed time ratio: R``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def same_tensors(a: Path, b: Path) -> bool:
    first, second = safe_open(str(a), "pt"), safe_open(str(b), "pt")
    return set(first.keys()) == set(second.keys()) and all(
        torch.equal(first.get_tensor(key), second.get_tensor(key)) for key in first.keys()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite-dir", type=Path, default=ROOT / "results" / "mini-clip8")
    parser.add_argument("--merge", default="ties")
    parser.add_argument("--samples", default="n256-s0", help="calibration folder under calib/")
    parser.add_argument("--set", action="append", default=[], help="quantize overrides, as the suite's config sets them")
    args = parser.parse_args(argv)
    calib = sorted((args.suite_dir / "calib" / args.samples).glob("*.safetensors"))
    model = args.suite_dir / "merged" / args.merge
    if not calib or not model.is_dir():
        print(f"error: no merged model {model} or calibration sets in {args.suite_dir / 'calib' / args.samples}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="awq-cache-") as tmp:
        runs = {}
        for name, budget in (("recomputed", "0"), ("cached", None)):
            overrides = [*args.set, *([f"awq.search_cache_mib={budget}"] if budget else [])]
            command = [sys.executable, "-m", "epmq", "quantize", "--model", str(model), "--method", "awq", "--bits", "4",
                       "--group-size", "128", "--threads", "1", *[f"--set={o}" for o in overrides],
                       "--calib", *map(str, calib), "--out", f"{tmp}/{name}"]
            runs[name] = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = {}
        for name, process in runs.items():
            _, stderr = process.communicate()
            if process.returncode:
                print(f"error: the {name} run failed: {stderr.strip().splitlines()[-1]}", file=sys.stderr)
                return 1
            seconds[name] = json.loads(Path(f"{tmp}/{name}/quantization.json").read_text())["seconds"]
            print(f"{name}: {seconds[name]:.1f} s")
        same = same_tensors(Path(tmp) / "cached" / "model.safetensors", Path(tmp) / "recomputed" / "model.safetensors")
        print(f"same tensors: {same}")
    print(f"cached/recomputed time ratio: {seconds['cached'] / seconds['recomputed']:.3f}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
