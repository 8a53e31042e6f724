"""bench/paper_shapes.py reads the SLURM profile's requests as the first attempt gets them."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "paper_shapes.py"


@pytest.fixture(scope="module")
def paper_shapes():
    spec = importlib.util.spec_from_file_location("paper_shapes", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_shapes"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_attempt_scaled_requests_are_read_at_the_first_attempt(paper_shapes):
    assert paper_shapes.first_attempt("64000 * attempt") == 64000
    assert paper_shapes.first_attempt(8000) == 8000
    with pytest.raises(SystemExit, match="neither a number"):
        paper_shapes.first_attempt("64000 + attempt")


def test_every_measured_rule_has_a_numeric_memory_request(paper_shapes):
    requests = paper_shapes.profile_requests()
    assert set(requests) == {"merge", "quantize", "evaluate"}
    for request in requests.values():
        assert isinstance(request["mem_mb"], int) and request["mem_mb"] > 0
