"""AWQ's scale search keeps each group's quantized candidates across calibration batches
(``awq.search_cache_mib``): the same weights as recomputing them per batch, so the same model."""

import copy

import pytest
import torch

from baselines.awq import candidate_scales, kept_candidates
from epmq.adapters import adapter_for
from epmq.config import method_params
from epmq.engine import CalibrationTask, quantize_model
from epmq.catalog import get_method
from epmq.testing.models import image_batches, text_batches, tiny_clip_vision, tiny_llama

FAMILIES = {"clip": (tiny_clip_vision, lambda: image_batches(3)), "llama": (tiny_llama, lambda: text_batches(3))}


def quantized(model, batches, budget_mib):
    params = method_params("quantize", bits=3, group_size=32, awq={"search_cache_mib": budget_mib})
    result = quantize_model(model, get_method("awq", params), [CalibrationTask("t", batches)])
    return model.state_dict(), [{k: v for k, v in r.items() if k != "seconds"} for r in result.records]


def first_block_groups(model):
    adapter = adapter_for(model)
    block = adapter.stacks(model)[0].blocks[0]
    return block, adapter.awq_groups(block)


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_candidates_give_the_same_model_as_recomputing_them(family):
    build, batches = FAMILIES[family]
    model, calibration = build(), batches()
    block, groups = first_block_groups(model)
    one_group_mib = 20 * sum(block.get_submodule(n).weight.numel() * 4 for n in groups[0].linears) / 2**20
    # nothing kept, only the first group kept, everything kept
    states = [quantized(copy.deepcopy(model), calibration, budget) for budget in (0, one_group_mib, 512)]
    for state, records in states[1:]:
        assert records == states[0][1]
        for key, tensor in states[0][0].items():
            assert torch.equal(state[key], tensor), key


def test_kept_candidates_stop_at_the_budget():
    model = tiny_clip_vision()
    block, groups = first_block_groups(model)
    params = method_params("quantize", bits=4, group_size=32)
    scales = [[candidate_scales(torch.rand(block.get_submodule(g.linears[0]).in_features) + 0.1, None, r / 4)
               for r in range(4)] for g in groups]
    sizes = [4 * sum(block.get_submodule(n).weight.numel() * 4 for n in g.linears) for g in groups]
    budget_mib = (sizes[0] + 1) / 2**20  # the first group fits, the others do not
    kept = kept_candidates(block, groups, scales, params, {**params["awq"], "search_cache_mib": budget_mib})
    assert kept[0] is not None and len(kept[0]) == 4 and len(kept[0][0]) == len(groups[0].linears)
    assert kept[1:] == [None] * (len(groups) - 1)
    assert kept_candidates(block, groups, scales, params, {**params["awq"], "search_cache_mib": 0}) == [None] * len(groups)
