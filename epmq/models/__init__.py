"""Plain-torch stand-ins for transformers model classes, used where start-up time matters.

Each class has its transformers counterpart's module names and state dict and reproduces its
forward bit for bit, so checkpoints, adapters and results are unchanged; ``load_model(...,
plain_torch=True)`` picks one by the checkpoint's ``config.json``.
"""

from __future__ import annotations

from torch import nn

from epmq.models.clip_vision import ClipVisionModel

PLAIN_MODELS: tuple[type[nn.Module], ...] = (ClipVisionModel,)


def plain_model_class(config: dict) -> type[nn.Module] | None:
    """The plain-torch class that reproduces the model of ``config`` (a ``config.json``), or None."""
    return next((cls for cls in PLAIN_MODELS if cls.supports(config)), None)
