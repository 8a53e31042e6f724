"""Model-family adapters; importing this package registers the built-in ones."""

from epmq.adapters import clip, llama  # noqa: F401
from epmq.adapters.base import ADAPTERS, ModelAdapter, Stack, adapter_for, block_linears, linear_groups

__all__ = ["ADAPTERS", "ModelAdapter", "Stack", "adapter_for", "block_linears", "linear_groups"]
