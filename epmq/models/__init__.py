"""Plain-torch stand-ins for transformers model classes, used where start-up time matters.

Each class has its transformers counterpart's module names and state dict and reproduces its
forward bit for bit, so checkpoints, adapters and results are unchanged; ``load_model(...,
plain_torch=True)`` picks one by the checkpoint's ``config.json``.
"""

from __future__ import annotations

import torch
from torch import nn

from epmq.models.clip_vision import ClipVisionModel

PLAIN_MODELS: tuple[type[nn.Module], ...] = (ClipVisionModel,)


def plain_model_class(config: dict) -> type[nn.Module] | None:
    """The plain-torch class that reproduces the model of ``config`` (a ``config.json``), or None."""
    return next((cls for cls in PLAIN_MODELS if cls.supports(config)), None)


def allocate(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give a model built on the meta device uninitialised CPU parameters of ``dtype``, in place
    (``Module.to_empty`` would do it through torch's reference ops, importing ``torch.fx``: 0.3 s)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=dtype), requires_grad=param.requires_grad))
    return model

