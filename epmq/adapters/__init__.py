"""Model-family adapters; importing this package registers the built-in ones."""

from epmq.adapters import bert, clip, decoder, dinov2, t5  # noqa: F401
from epmq.adapters.base import (
    ADAPTERS,
    AwqGroup,
    ModelAdapter,
    Stack,
    adapter_for,
    adapter_for_type,
    block_linears,
    linear_groups,
)

__all__ = ["ADAPTERS", "AwqGroup", "ModelAdapter", "Stack", "adapter_for", "adapter_for_type", "block_linears", "linear_groups"]
