"""Adding a quantization method or a merge operator is one definition plus one registration (for a
merge operator also its parameters' entry in epmq/schemas/methods.schema.yaml): the CLI offers it,
the workflow's wildcard constraints and method lists include it, and it runs as a stage."""

import argparse
import json
import re

import pytest
import torch

from epmq.cli import main
from epmq.config import methods_schema
from epmq.grid import rtn_quantize
from epmq.merge import MERGERS, register_merge
from epmq.merge import add_arguments as merge_arguments
from epmq.quant.base import METHODS, LayerResult, QuantMethod, register_method
from epmq.catalog import method_classes
from epmq.quantize import add_arguments as quantize_arguments
from epmq.workflow import (
    alpha_methods,
    calibration_free_methods,
    expert_methods,
    merge_wildcard,
    method_wildcard,
)
from epmq.testing.models import tiny_llama


def choices(add_arguments, flag: str) -> list[str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return next(action.choices for action in parser._actions if flag in action.option_strings)


@pytest.fixture
def toy_method():
    """A method as a new module would define it: one class, one registration."""

    @register_method("toy_rtn")
    class ToyRTN(QuantMethod):
        label = "w/ toy RTN"
        needs_calibration = False
        collects_statistics = False
        takes_alpha = True

        def quantize(self, name, weight, stats):
            return LayerResult(rtn_quantize(weight, self.params["bits"], self.params["group_size"], self.params["sym"]))

    yield ToyRTN
    del METHODS["toy_rtn"]


@pytest.fixture
def toy_merge():
    """An operator as a new module would define it: one function, one registration, and its
    parameters (here none) in the methods schema, where every operator's defaults live."""

    @register_merge("toy_first_expert")
    def prepare(inputs, params, device):
        return lambda key, pretrained, experts: experts[0]

    operators = methods_schema()["properties"]["merge"]["properties"]
    operators["toy_first_expert"] = {"type": "object", "additionalProperties": False, "default": {}, "properties": {}}
    yield "toy_first_expert"
    del operators["toy_first_expert"]
    del MERGERS["toy_first_expert"]


def test_the_workflow_lists_what_the_methods_declare():
    assert alpha_methods() == ["epmq", "epmq_fp"]
    assert calibration_free_methods() == ["rtn"]
    assert expert_methods() == ["epmq", "epmq_fp"]
    assert all(method.label for method in method_classes().values())
    # the constraint written by hand before the registry drove it matches the same path components
    by_hand = r"(rtn|gptq|awq|(epmq|epmq_fp)-a[0-9.e+-]+)"
    for component in ["rtn", "gptq", "awq", "epmq-a0.01", "epmq_fp-a10", "epmq-a1e-05", "epmq", "gptq-a1", "awq2", ""]:
        assert bool(re.fullmatch(method_wildcard(), component)) == bool(re.fullmatch(by_hand, component)), component


def test_a_registered_method_reaches_the_cli_and_the_workflow(toy_method):
    assert "toy_rtn" in choices(quantize_arguments, "--method")
    assert re.fullmatch(method_wildcard(), "toy_rtn-a0.5")
    assert not re.fullmatch(method_wildcard(), "toy_rtn")  # it declares alpha: its path carries it
    assert "toy_rtn" in alpha_methods() and "toy_rtn" in calibration_free_methods()
    assert "toy_rtn" not in expert_methods()


def test_a_registered_method_runs_as_a_stage(toy_method, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "model")
    out = tmp_path / "quantized"
    assert main(["quantize", "--model", str(tmp_path / "model"), "--method", "toy_rtn", "--group-size", "32",
                 "--out", str(out)]) == 0
    record = json.loads((out / "quantization.json").read_text())
    assert record["method"] == "toy_rtn"
    assert (out / "model.safetensors").is_file()


def test_a_registered_merge_operator_reaches_the_cli_and_the_workflow(toy_merge):
    assert toy_merge in choices(merge_arguments, "--method")
    assert re.fullmatch(merge_wildcard(), toy_merge)
    assert re.fullmatch(merge_wildcard(), "ties") and not re.fullmatch(merge_wildcard(), "ties2")


def test_a_registered_merge_operator_runs_as_a_stage(toy_merge, tmp_path):
    from safetensors.torch import load_file

    for name, seed in (("pretrained", 0), ("first", 1), ("second", 2)):
        tiny_llama(seed).save_pretrained(tmp_path / name)
    out = tmp_path / "merged"
    assert main(["merge", "--method", toy_merge, "--pretrained", str(tmp_path / "pretrained"),
                 "--experts", str(tmp_path / "first"), str(tmp_path / "second"), "--out", str(out)]) == 0
    assert json.loads((out / "merge.json").read_text())["method"] == toy_merge
    merged, first = load_file(out / "model.safetensors"), load_file(tmp_path / "first" / "model.safetensors")
    assert merged.keys() == first.keys() and all(torch.equal(merged[key], first[key]) for key in first)
