"""The interface of quantization methods and their registry.

A method turns a linear layer's merged weight plus the statistics the engine collected for it into
a replacement weight. GPTQ and E-PMQ share the statistics (:class:`GroupStatistics`) and the
rounding solver; they differ only in the ``(target, Hessian)`` they hand to it.

A method registers itself where it is defined (``@register_method(name)`` on its class) and
declares what the workflow needs to know of it (:class:`QuantMethod`'s class attributes);
:mod:`epmq.quant.catalog` imports every module that registers one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from epmq.grid import QuantizedWeight
from epmq.stats import fold_expert

#: name -> class of every method registered so far (:mod:`epmq.quant.catalog` imports them all)
METHODS: dict[str, type[QuantMethod]] = {}


def register_method(name: str):
    """Class decorator: register a :class:`QuantMethod` subclass under ``name`` (its config and CLI name)."""

    def decorate(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


class GroupStatistics:
    """Calibration statistics of linears sharing one input, per task and summed.

    ``hessian_sum`` is ``H_q = sum_i X_i X_i^T`` (float64). With ``fold_experts``, each finished task
    is folded into ``rhs[name] += W_i H_i`` and ``expert_energy[name] += tr(W_i H_i W_i^T)`` for every
    linear of the group, so memory does not grow with the number of tasks.
    """

    def __init__(self, names: list[str], d_in: int, *, fold_experts: bool, dtype: torch.dtype, device):
        self.names = names
        self.fold_experts = fold_experts
        self.dtype = dtype
        self.hessian_sum = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        self._task_hessian = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.tokens = 0
        self.task_tokens: list[int] = []
        self.rhs: dict[str, torch.Tensor] = {}
        self.expert_energy: dict[str, float] = {name: 0.0 for name in names}

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Add tokens (n x d_in) of the current task."""
        x = inputs.to(self.dtype)
        self._task_hessian.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def end_task(self, expert_weights: dict[str, torch.Tensor] | None) -> None:
        """Close the current task: fold its Hessian (and, for E-PMQ, its expert weights)."""
        if not torch.isfinite(self._task_hessian).all():
            raise ValueError(f"calibration inputs of {self.names} contain NaN or Inf")
        if self.fold_experts:
            if expert_weights is None:
                raise ValueError("this method needs expert weights for every calibration task")
            for name in self.names:
                product, energy = fold_expert(expert_weights[name], self._task_hessian)
                self.rhs[name] = self.rhs[name] + product if name in self.rhs else product
                self.expert_energy[name] += energy
        self.hessian_sum += self._task_hessian.double()
        self.task_tokens.append(self.tokens - sum(self.task_tokens))
        self._task_hessian.zero_()


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

    def statistics(self, names: list[str], d_in: int, device) -> GroupStatistics:
        dtype = getattr(torch, self.params["hessian_dtype"])
        return GroupStatistics(names, d_in, fold_experts=self.needs_experts, dtype=dtype, device=device)

    def prepare_block(self, context) -> None:
        """Hook before a block's linears are quantized (AWQ rescales here); default: nothing.

        ``context`` is an :class:`epmq.engine.BlockContext`.
        """

    def quantize(self, name: str, weight: torch.Tensor, stats: GroupStatistics | None) -> LayerResult:
        raise NotImplementedError

    def describe(self) -> dict:
        """Parameters recorded in ``quantization.json``."""
        keys = ("bits", "group_size", "sym", "act_order", "static_groups", "group_fit", "true_sequential", "block_size",
                "percdamp", "hessian_dtype")
        return {key: self.params[key] for key in keys}
