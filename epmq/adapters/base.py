"""What the calibration engine needs to know about a model family, and nothing more.

An adapter says which stacks of blocks a model has (one for encoders and decoder-only LMs, two for
T5's encoder and decoder), how to run one calibration batch through the whole model, and how a
block's output feeds the next block. Which linears a block holds, their forward order and which of
them share an input are discovered generically by running the block once (:func:`linear_groups`),
so adding a family is a few lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Stack:
    """A sequence of transformer blocks run one after another (e.g. ``vision_model.encoder.layers``)."""

    name: str
    prefix: str  # module path of the ModuleList, e.g. "model.layers"
    blocks: nn.ModuleList


@dataclass(frozen=True)
class AwqGroup:
    """An AWQ scaling group: linears sharing one input, and the module that produces that input.

    Scaling the linears' input columns by ``s`` is undone exactly by dividing the output channels
    of ``previous`` (a norm's weight and bias, or a linear's rows and bias) by ``s``. ``inspect`` is
    the module whose output the scale search's loss measures (llm-awq's ``module2inspect``: the
    attention for q/k/v, the MLP for gate/up); ``None`` is the group's single linear itself.
    """

    previous: str
    linears: tuple[str, ...]
    inspect: str | None = None

    @property
    def inspected(self) -> str:
        if self.inspect is None and len(self.linears) != 1:
            raise ValueError(f"AWQ group {self.linears} has several linears: name the module it inspects")
        return self.linears[0] if self.inspect is None else self.inspect


class ModelAdapter:
    """Base adapter: override :meth:`stacks`; the rest has generic defaults."""

    #: HF ``config.model_type`` values this adapter serves.
    model_types: tuple[str, ...] = ()
    #: name suffixes of linears whose AWQ clip search is skipped (queries and keys, as in llm-awq)
    awq_no_clip: tuple[str, ...] = ()
    #: how ``python -m epmq export`` stores codes: ``pack-quantized`` (int32-packed, what vLLM
    #: serves) unless transformers cannot load the family from it
    compressed_tensors_format: str = "pack-quantized"

    def stacks(self, model: nn.Module) -> list[Stack]:
        raise NotImplementedError

    def run_model(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Run one calibration batch through the whole model (outputs are discarded)."""
        model(**batch)

    def block_output(self, output) -> torch.Tensor:
        """The hidden states a block returns (HF blocks return a tensor or a tuple led by it)."""
        return output[0] if isinstance(output, (tuple, list)) else output

    def next_block_inputs(self, output, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Arguments besides the hidden states for the next block (T5 threads its position biases)."""
        return args, kwargs

    def input_mask(self, stack: Stack, linear_name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Boolean (batch x tokens) mask of tokens that count in the statistics of ``linear_name``'s input.

        ``None`` counts every token (images; unpadded text).
        """
        return None



    def awq_groups(self, block: nn.Module) -> list[AwqGroup]:
        """AWQ's exactly foldable scaling groups of one block, in forward order."""
        raise NotImplementedError(f"{type(self).__name__} declares no AWQ scaling groups")

    def awq_activation_groups(self, block: nn.Module) -> list[AwqGroup]:
        """Groups whose ``previous`` is a non-homogeneous activation module: foldable only by
        wrapping it in a scaled activation (AWQ's ``scale_activation``)."""
        return []


def module_path(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model``."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside a block, by name relative to the block."""
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def linear_groups(block: nn.Module, run_block: Callable[[], object]) -> list[list[str]]:
    """Linears of ``block`` in forward order, grouped by identical input tensor.

    ``run_block`` runs the block once on a sample input. Linears that receive the very same input
    tensor (q/k/v after a norm, gate/up in a gated MLP, T5 cross-attention k/v) form one group:
    they share one Hessian. Linears never called are returned last, each in a group of its own.
    """
    linears = block_linears(block)
    calls: list[tuple[str, int]] = []
    handles = []
    keep_alive = []  # hold inputs so their ids stay unique during the pass

    def hook(name):
        def record(module, args):
            keep_alive.append(args[0])
            calls.append((name, id(args[0])))

        return record

    for name, module in linears.items():
        handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            run_block()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    by_input: dict[int, list[str]] = {}
    seen: set[str] = set()
    for name, input_id in calls:
        if name in seen:
            continue
        seen.add(name)
        if input_id in by_input:
            by_input[input_id].append(name)
        else:
            by_input[input_id] = [name]
            groups.append(by_input[input_id])
    groups.extend([name] for name in linears if name not in seen)
    return groups


ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(adapter_class: type[ModelAdapter]) -> type[ModelAdapter]:
    instance = adapter_class()
    for model_type in adapter_class.model_types:
        ADAPTERS[model_type] = instance
    return adapter_class


def supported_families() -> str:
    """The supported families, by the ``config.model_type`` values that select them."""
    return ", ".join(sorted(ADAPTERS))


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter registered for ``model.config.model_type``."""
    return adapter_for_type(getattr(getattr(model, "config", None), "model_type", None))


def adapter_for_type(model_type: str | None) -> ModelAdapter:
    """The adapter registered for an HF ``config.model_type``; one line naming the supported ones if none."""
    import epmq.adapters  # noqa: F401  (registers the built-in families)

    if model_type not in ADAPTERS:
        raise ValueError(f"model family {model_type!r} has no adapter; supported: {supported_families()}")
    return ADAPTERS[model_type]
