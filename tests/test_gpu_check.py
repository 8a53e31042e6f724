"""bench/gpu_check.py: without CUDA it says so and succeeds; its comparison runs CPU against CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA: the check would run")
def test_without_cuda_it_says_so_and_exits_0():
    out = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "CUDA is not available" in out.stdout


@pytest.mark.slow
def test_cpu_against_cpu_agrees():
    out = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--hidden", "128", "--samples", "4"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "codes identical 100.000%" in out.stdout and out.stdout.strip().endswith("OK")
