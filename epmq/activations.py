"""Scaled activations: ``act(x) / s`` per channel, the module AWQ's ``scale_activation`` inserts.

llm-awq (``qmodule.ScaledActivation``) wraps a non-homogeneous activation (GELU, quick_gelu) this
way so that the linear after it can take AWQ's input scale ``s``: the composed function is unchanged
and ``s`` is stored with the model. A quantized checkpoint then holds ``<activation>.scales``;
:func:`wrap_scaled_activations` rebuilds the wrappers before the state is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

SCALES = "scales"


class ScaledActivation(nn.Module):
    """``act(x) / scales`` along the last dimension."""

    def __init__(self, act: nn.Module, scales: torch.Tensor):
        super().__init__()
        self.act = act
        self.scales = nn.Parameter(scales.detach().clone(), requires_grad=False)

    def forward(self, x):
        return self.act(x) / self.scales.to(x.dtype)


def wrap_scaled_activations(model: nn.Module, keys: Iterable[str], shapes: dict[str, tuple]) -> None:
    """Wrap every module that a state key ``<path>.scales`` names but the model lacks (an activation
    the checkpoint stores scaled) in a :class:`ScaledActivation` of the stored shape."""
    expected = set(model.state_dict())
    for key in keys:
        path, _, name = key.rpartition(".")
        if name != SCALES or key in expected or not path:
            continue
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        activation = getattr(parent, attribute, None)
        if isinstance(activation, nn.Module) and not any(True for _ in activation.parameters()):
            setattr(parent, attribute, ScaledActivation(activation, torch.ones(shapes[key])))
