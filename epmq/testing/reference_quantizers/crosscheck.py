"""The setting tests/test_reference_crosscheck.py and bench/reference_errors.py share, and our side of it."""

from __future__ import annotations

import copy

import torch

from epmq.catalog import get_method
from epmq.config import method_params
from epmq.engine import quantize_model
from epmq.testing.models import input_gram

#: bits, group size and damping of tests/test_reference_crosscheck.py and bench/reference_errors.py
BITS, GROUP, DAMP = 4, 32, 0.01


def relative_output_errors(model, tasks, weights, input_scales=None, output_scales=None):
    """``||(W_eff - W) X|| / ||W X||`` per layer, ``W_eff = diag(s_out) Q diag(1/s_in)``."""
    errors = {}
    for name, weight in weights.items():
        gram = input_gram(model, name, tasks)
        reference = model.get_submodule(name).weight.detach().double()
        s_in = (input_scales or {}).get(name, torch.ones(reference.shape[1])).double()
        s_out = (output_scales or {}).get(name, torch.ones(reference.shape[0])).double()
        diff = s_out[:, None] * weight.double() / s_in[None, :] - reference
        errors[name] = float(((diff @ gram) * diff).sum() / ((reference @ gram) * reference).sum()) ** 0.5
    return errors


def ours(model, tasks, **params):
    copy_ = copy.deepcopy(model)
    method = get_method("gptq", method_params("quantize", bits=BITS, group_size=GROUP, percdamp=DAMP, **params))
    return {name: layer.weight for name, layer in quantize_model(copy_, method, tasks).replacements.items()}
