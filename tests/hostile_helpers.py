"""What the hostile-input tests share (``tests/test_hostile_*.py``): the refusal check, tiny
models and calibration files, and the ``w`` work folder fixture."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epmq.cli import main
from epmq.testing.models import tiny_clip_vision, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128  # tiny_llama's vocabulary


# ------------------------------------------------------------------------------------ helpers --
def tree_hashes(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under ``paths`` (files or folders)."""
    hashes = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            hashes[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return hashes


def run_cli(*argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``python -m epmq ARGV`` run in-process (argparse errors included)."""
    capsys.readouterr()
    try:
        code = main([str(item) for item in argv])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def refused(argv, *, inputs, out, match, capsys) -> str:
    """Run a stage that must refuse: exit 2, one line matching ``match``, inputs untouched,
    nothing new beside ``out``. Returns the error line."""
    out = Path(out)
    parent = out.parent if out.parent.exists() else None
    before_inputs = tree_hashes(*inputs)
    before_parent = sorted(os.listdir(parent)) if parent else None
    before_out = tree_hashes(out) if out.exists() else None
    code, err = run_cli(*argv, capsys=capsys)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert __import__("re").search(match, lines[0]), lines[0]
    assert tree_hashes(*inputs) == before_inputs, "an input changed"
    if parent:
        assert sorted(os.listdir(parent)) == before_parent, f"left behind: {set(os.listdir(parent)) - set(before_parent)}"
    assert (tree_hashes(out) if out.exists() else None) == before_out, "the existing output changed"
    return lines[0]


def perturbed_copy(source: Path, destination: Path, seed: int) -> Path:
    shutil.copytree(source, destination)
    state = load_file(str(source / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    save_file({key: value + 0.01 * torch.randn(value.shape, generator=generator) for key, value in state.items()},
              str(destination / "model.safetensors"))
    return destination


def text_calibration(path: Path, samples: int = 8, length: int = 16, **replace) -> Path:
    ids = torch.randint(0, VOCAB, (samples, length), generator=torch.Generator().manual_seed(1))
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tensors.update(replace)
    save_file({key: value for key, value in tensors.items() if value is not None}, str(path))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny Llama (pretrained, two experts, their merge, an RTN checkpoint), two calibration
    files and a tiny CLIP vision tower with image calibration: built once, copied per test."""
    root = tmp_path_factory.mktemp("built")
    tiny_llama().save_pretrained(root / "base")
    perturbed_copy(root / "base", root / "e0", 0)
    perturbed_copy(root / "base", root / "e1", 1)
    text_calibration(root / "c0.safetensors")
    text_calibration(root / "c1.safetensors")
    assert main(["merge", "--method", "task_arithmetic", "--pretrained", str(root / "base"), "--experts",
                 str(root / "e0"), str(root / "e1"), "--out", str(root / "merged")]) == 0
    assert main(["quantize", "--model", str(root / "merged"), "--method", "rtn", "--group-size", "32",
                 "--out", str(root / "q")]) == 0
    tiny_clip_vision().save_pretrained(root / "clip")
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    save_file({"pixel_values": pixels}, str(root / "img.safetensors"))
    return root


@pytest.fixture
def w(built, tmp_path, monkeypatch):
    """A fresh copy of the built world, the current directory inside it."""
    world = tmp_path / "w"
    shutil.copytree(built, world)
    monkeypatch.chdir(world)
    return world


def quantize_args(w, *extra, method="gptq", calib=("c0.safetensors", "c1.safetensors"), out="out"):
    return ["quantize", "--model", w / "merged", "--method", method, "--group-size", "32",
            "--calib", *[w / c for c in calib], "--out", w / out, *extra]


MERGE = ["merge", "--method", "task_arithmetic"]
