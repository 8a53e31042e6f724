"""The interface of quantization methods and their registry.

A method turns a linear layer's merged weight plus the statistics the engine collected for it into
a replacement weight. GPTQ and E-PMQ share the statistics (:class:`TaskStatistics`) and the
rounding solver; they differ only in the ``(target, Hessian)`` they hand to it.

A method registers itself where it is defined (``@register_method(name)`` on its class) and
declares what the workflow needs to know of it (:class:`QuantMethod`'s class attributes);
:mod:`epmq.catalog` imports every module that registers one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from epmq.grid import QuantizedWeight
from epmq.stats import TaskStatistics

#: name -> class of every method registered so far (:mod:`epmq.catalog` imports them all)
METHODS: dict[str, type[QuantMethod]] = {}


def register_method(name: str):
    """Class decorator: register a :class:`QuantMethod` subclass under ``name`` (its config and CLI name)."""

    def decorate(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


@dataclass
class LayerResult:
    """A method's answer for one linear: the new weight (on the grid, or fp) and log fields."""

    replacement: QuantizedWeight | torch.Tensor
    record: dict = field(default_factory=dict)

    @property
    def weight(self) -> torch.Tensor:
        return self.replacement.weight if isinstance(self.replacement, QuantizedWeight) else self.replacement

    def to(self, device) -> LayerResult:
        """The same result with its replacement on ``device``."""
        return LayerResult(self.replacement.to(device), self.record)


class QuantMethod:
    """Base class: subclasses set the flags and implement :meth:`quantize`.

    The flags are what the engine and the workflow (``rules/common.smk``) know of a method.
    """

    name: str = ""
    #: row label in the rendered tables
    label: str = ""
    needs_calibration: bool = True
    #: collect per-group Hessians (GPTQ, E-PMQ); AWQ searches on the block instead
    collects_statistics: bool = True
    needs_experts: bool = False
    #: takes the anchor strength ``alpha`` (E-PMQ's eq. 13): its path component and row carry it
    takes_alpha: bool = False
    #: later blocks see the outputs of quantized blocks (GPTQ drivers) rather than of fp blocks (AWQ)
    quantized_inputs: bool = True

    def __init__(self, params: dict):
        self.params = params

    def statistics(self, names: list[str], d_in: int, device) -> TaskStatistics:
        dtype = getattr(torch, self.params["hessian_dtype"])
        return TaskStatistics(names, d_in, fold_experts=self.needs_experts, dtype=dtype, device=device)

    def prepare_block(self, context) -> None:
        """Hook before a block's linears are quantized (AWQ rescales here); default: nothing.

        ``context`` is an :class:`epmq.engine.BlockContext`.
        """

    def quantize(self, name: str, weight: torch.Tensor, stats: TaskStatistics | None) -> LayerResult:
        raise NotImplementedError

    def describe(self) -> dict:
        """Parameters recorded in ``quantization.json``."""
        keys = ("bits", "group_size", "sym", "act_order", "static_groups", "group_fit", "true_sequential", "block_size",
                "percdamp", "hessian_dtype")
        return {key: self.params[key] for key in keys}
