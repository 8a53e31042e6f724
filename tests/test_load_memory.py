"""Issue 13, item 1: a quantized checkpoint loads in its own dtype, in place, within 1.3x the model's size."""

import importlib.util
from pathlib import Path

import pytest
import torch

from epmq.checkpoint import load_model
from epmq.io import CheckpointError, LazyCheckpoint

BENCH = Path(__file__).resolve().parents[1] / "bench" / "load_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("load_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


def test_loads_in_the_saved_dtype_and_on_request_in_another(bench, tmp_path):
    path = bench.write_quantized_llama(tmp_path / "q", hidden=64, intermediate=160, layers=2, vocab=128,
                                       dtype="bfloat16", group_size=32)
    loaded = load_model(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    as_float = load_model(path, dtype=torch.float32)
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}
    for key, value in loaded.state_dict().items():
        assert torch.equal(as_float.state_dict()[key], value.float()), key


def test_read_into_checks_the_shape_and_converts_the_dtype(bench, tmp_path):
    path = bench.write_quantized_llama(tmp_path / "q", hidden=64, intermediate=160, layers=1, vocab=128,
                                       dtype="bfloat16", group_size=32)
    checkpoint = LazyCheckpoint(path)
    key = "model.embed_tokens.weight"
    as_float = checkpoint.read_into(key, torch.empty(128, 64))
    assert torch.equal(as_float, checkpoint.get(key).float())
    with pytest.raises(CheckpointError, match="embed_tokens.weight.*shape"):
        checkpoint.read_into(key, torch.empty(64, 128))


@pytest.mark.slow
def test_peak_memory_of_load_model_is_at_most_1_3x_the_model(bench, tmp_path):
    # ~90 M parameters in bfloat16 (the loader before issue 13 peaked at 4.0x on this shape family).
    path = bench.write_quantized_llama(tmp_path / "q", hidden=1024, intermediate=2816, layers=2, vocab=32000,
                                       dtype="bfloat16")
    result = bench.measure_in_subprocess(path)
    assert result["dtype"] == "bfloat16"
    assert result["ratio"] <= 1.3, result
