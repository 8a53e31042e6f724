"""The registry of merge operators and the in-memory merge of state dicts.

A merge operator is registered under its config name (``epmq/schemas/methods.schema.yaml``,
section ``merge``) as a *preparation* function: given the inputs and the validated parameters it
computes whatever whole-model quantities the operator needs (only TIES has any: its per-task
magnitude thresholds and the majority sign) and returns the per-tensor rule. The same rule runs
in memory (:func:`merge_state_dicts`, ``MERGERS[name](pretrained, experts, **params)``) and
streaming from safetensors (:func:`epmq.merge.streaming.merge_checkpoints`); the two paths
differ only in how they read tensors and select TIES's thresholds.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from epmq.config import method_params
from epmq.merge import operators
from epmq.progress import progress

log = logging.getLogger("epmq.merge")

# (key, pretrained tensor, expert tensors) -> merged tensor in the computation dtype
TensorRule = Callable[[str, Tensor, Sequence[Tensor]], Tensor]


class MergeError(ValueError):
    """Inputs that cannot be merged, or a merge result that is not finite; the message says which tensor."""


class MergeInputs(ABC):
    """The pretrained model and K experts, read one tensor at a time and checked as they are read.

    Subclasses say where tensors come from; construction checks that every expert has exactly
    the pretrained model's keys, shapes and dtypes (naming the first offending tensor).
    """

    pretrained_name: str
    expert_names: list[str]
    keys: list[str]  # in the pretrained checkpoint's order

    @abstractmethod
    def shape(self, key: str) -> tuple[int, ...]: ...

    @abstractmethod
    def is_floating(self, key: str) -> bool: ...

    @abstractmethod
    def _read(self, key: str, source: int | None) -> Tensor:
        """Tensor ``key`` of the pretrained model (``source=None``) or of expert ``source``."""

    @abstractmethod
    def kth_smallest(self, rows_of: Callable[[Tensor, list[Tensor]], Tensor], k: int) -> Tensor:
        """k-th smallest of each row of ``cat([rows_of(*load(key)) for floating keys], dim=1)``."""

    @property
    def floating_keys(self) -> list[str]:
        return [key for key in self.keys if self.is_floating(key)]

    def load_pretrained(self, key: str) -> Tensor:
        return self._checked(key, None)

    def load(self, key: str) -> tuple[Tensor, list[Tensor]]:
        """The pretrained tensor and every expert's tensor ``key``; floating ones must be finite."""
        return self._checked(key, None), [self._checked(key, source) for source in range(len(self.expert_names))]

    def _checked(self, key: str, source: int | None) -> Tensor:
        tensor = self._read(key, source)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            name = self.pretrained_name if source is None else self.expert_names[source]
            raise MergeError(f"tensor {key!r} of {name} contains NaN or Inf")
        return tensor

    def iterate(self, keys: Sequence[str], task: str) -> Iterator[str]:
        """``keys``, showing progress (:func:`epmq.progress.progress`)."""
        yield from progress(keys, task, unit="tensor")


def check_consistent(
    keys: Sequence[str],
    spec: Callable[[str], tuple[tuple[int, ...], str]],
    experts: Sequence[tuple[str, Sequence[str], Callable[[str], tuple[tuple[int, ...], str]]]],
    *,
    cast_floating: bool = False,
) -> dict[str, dict[str, int]]:
    """Refuse experts whose keys, shapes or dtypes differ from the pretrained model's.

    ``spec(key)`` gives ``(shape, dtype)`` of a pretrained tensor; each expert is
    ``(name, keys, spec)``. The message names the expert and the first offending tensor (in the
    pretrained order; extra tensors in sorted order). With ``cast_floating``, a floating expert
    tensor of another floating dtype is accepted (the caller casts it to the pretrained dtype);
    returns what would be cast: ``{expert name: {"F32->BF16": number of tensors}}``.
    """
    casts: dict[str, dict[str, int]] = {}
    if not experts:
        raise MergeError("at least one expert is needed")
    key_set = set(keys)
    for name, expert_keys, expert_spec in experts:
        expert_key_set = set(expert_keys)
        missing = [key for key in keys if key not in expert_key_set]
        if missing:
            raise MergeError(f"{name} lacks tensor {missing[0]!r} of the pretrained model ({len(missing)} missing)")
        extra = sorted(expert_key_set - key_set)
        if extra:
            raise MergeError(f"{name} has tensor {extra[0]!r} that the pretrained model lacks ({len(extra)} extra)")
        for key in keys:
            (shape, dtype), (expert_shape, expert_dtype) = spec(key), expert_spec(key)
            if expert_shape != shape:
                raise MergeError(f"tensor {key!r} of {name} has shape {list(expert_shape)}, pretrained {list(shape)}")
            if expert_dtype != dtype:
                if cast_floating and _is_floating_name(dtype) and _is_floating_name(expert_dtype):
                    change = casts.setdefault(name, {})
                    change[f"{expert_dtype}->{dtype}"] = change.get(f"{expert_dtype}->{dtype}", 0) + 1
                    continue
                hint = " (an explicit cast: `epmq merge --cast-experts`, `cast_experts: true` in the workflow config)"
                raise MergeError(f"tensor {key!r} of {name} has dtype {expert_dtype}, pretrained {dtype}"
                                 + (hint if _is_floating_name(dtype) and _is_floating_name(expert_dtype) else ""))
    return casts


def _is_floating_name(dtype: str) -> bool:
    """Whether a dtype name (torch ``torch.float32`` or safetensors ``F32``) is a floating type."""
    return dtype.startswith(("torch.float", "torch.bfloat", "F", "BF"))


class StateDictInputs(MergeInputs):
    """Inputs held in memory as state dicts (name -> tensor)."""

    def __init__(self, pretrained: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]]):
        self.pretrained_name = "the pretrained state dict"
        self.expert_names = [f"expert {position}" for position in range(len(experts))]
        self.keys = list(pretrained)
        self._pretrained, self._experts = pretrained, list(experts)

        def spec_of(state_dict):
            return lambda key: (tuple(state_dict[key].shape), str(state_dict[key].dtype))

        described = [(name, list(expert), spec_of(expert)) for name, expert in zip(self.expert_names, experts)]
        check_consistent(self.keys, spec_of(pretrained), described)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._pretrained[key].shape)

    def is_floating(self, key: str) -> bool:
        return self._pretrained[key].is_floating_point()

    def _read(self, key: str, source: int | None) -> Tensor:
        return self._pretrained[key] if source is None else self._experts[source][key]

    def kth_smallest(self, rows_of, k):
        # FusionBench's definition, held whole: kthvalue over the flattened concatenation.
        rows = torch.cat([rows_of(*self.load(key)) for key in self.floating_keys], dim=1)
        return torch.kthvalue(rows, k, dim=1).values


@dataclass(frozen=True)
class Merger:
    """A registered merge operator: ``Merger(pretrained, experts, **params)`` merges state dicts."""

    name: str
    prepare: Callable[[MergeInputs, dict, torch.device | str | None], TensorRule]

    def __call__(
        self,
        pretrained: Mapping[str, Tensor],
        experts: Sequence[Mapping[str, Tensor]],
        *,
        device: torch.device | str | None = None,
        **params,
    ) -> dict[str, Tensor]:
        return merge_state_dicts(self.name, pretrained, experts, params, device=device)


MERGERS: dict[str, Merger] = {}


def register_merge(name: str):
    """Decorator: register a preparation function ``prepare(inputs, params, device) -> TensorRule`` as
    merge operator ``name`` (its parameters: section ``merge.<name>`` of the methods schema)."""

    def decorate(prepare):
        MERGERS[name] = Merger(name, prepare)
        return prepare

    return decorate


@register_merge("simple_average")
def _prepare_simple_average(inputs: MergeInputs, params: dict, device) -> TensorRule:
    return lambda key, pretrained, experts: operators.simple_average(experts)


@register_merge("task_arithmetic")
def _prepare_task_arithmetic(inputs: MergeInputs, params: dict, device) -> TensorRule:
    return lambda key, pretrained, experts: operators.task_arithmetic(pretrained, experts, params["scaling"])


@register_merge("ties")
def _prepare_ties(inputs: MergeInputs, params: dict, device) -> TensorRule:
    """TIES's whole-model quantities: per-task global thresholds, then the majority sign.

    Every floating tensor takes part (FusionBench flattens the whole state dict); integer buffers
    are copied from the pretrained model and never counted.
    """
    floating = inputs.floating_keys
    count = sum(torch.Size(inputs.shape(key)).numel() for key in floating)
    rank = operators.ties_kth_rank(count, params["top_k"])
    if rank < 1:
        thresholds = torch.zeros(len(inputs.expert_names), dtype=torch.float32)
    else:
        log.info("TIES: selecting the top %g of |tau| per task over %d entries", params["top_k"], count)

        def magnitudes(pretrained: Tensor, experts: list[Tensor]) -> Tensor:
            # task_vectors returns a fresh buffer: overwrite it rather than hold a second K-fold copy
            return operators.ties_magnitudes_(operators.task_vectors(pretrained, experts)).flatten(1)

        thresholds = inputs.kth_smallest(magnitudes, rank)
    elected_total = 0
    for key in inputs.iterate(floating, "TIES: electing signs"):
        trimmed = operators.ties_trim_(operators.task_vectors(*inputs.load(key)), thresholds)
        elected_total += int(operators.ties_elected_sign(trimmed).sum(dtype=torch.int64))  # exact count
    majority_sign = float((elected_total > 0) - (elected_total < 0))
    log.info("TIES: thresholds %s, majority sign %+g", [f"{value:.3g}" for value in thresholds.tolist()], majority_sign)
    return lambda key, pretrained, experts: operators.ties(
        pretrained, experts, thresholds, majority_sign, params["scaling"], params["merge_func"]
    )


@register_merge("wudi")
def _prepare_wudi(inputs: MergeInputs, params: dict, device) -> TensorRule:
    """WUDI: Adam on the interference loss for the optimised tensors, the mean task vector elsewhere."""
    optimised = operators.WUDI_TENSORS[params["tensors"]]

    def rule(key: str, pretrained: Tensor, experts: Sequence[Tensor]) -> Tensor:
        if not optimised(key, pretrained.shape):
            return pretrained.to(operators.computation_dtype(pretrained.dtype)) + operators.mean_task_vector(
                pretrained, experts
            )
        vectors = operators.task_vectors(pretrained, experts)
        # Deterministic: initialised at the sum of task vectors, full-batch Adam draws no random numbers.
        merged, losses = operators.wudi_task_vector(vectors.to(device or vectors.device), params["steps"], params["lr"])
        if losses:
            log.debug("WUDI %s: loss %.4g -> %.4g over %d steps", key, losses[0], losses[-1], len(losses))
        return pretrained.to(vectors.dtype) + merged.to(vectors.device)

    return rule


def merged_tensor(rule: TensorRule, inputs: MergeInputs, key: str) -> Tensor:
    """Tensor ``key`` of the merged model, in the pretrained dtype; integer buffers are copied."""
    if not inputs.is_floating(key):
        return inputs.load_pretrained(key).clone()
    pretrained, experts = inputs.load(key)
    merged = rule(key, pretrained, experts).to(pretrained.dtype)
    if not bool(torch.isfinite(merged).all()):
        raise MergeError(f"the merge produced NaN or Inf in tensor {key!r} (dtype {pretrained.dtype})")
    return merged


def merge_state_dicts(
    method: str,
    pretrained: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    params: Mapping | None = None,
    *,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Merge in memory with operator ``method``; ``params`` are validated and completed from the schema.

    ``device`` is where WUDI optimises (default: where the tensors are); every other operator
    runs where the tensors are.
    """
    if method not in MERGERS:
        raise MergeError(f"unknown merge method {method!r} (known: {', '.join(MERGERS)})")
    params = method_params("merge", method, **dict(params or {}))
    inputs = StateDictInputs(pretrained, experts)
    rule = MERGERS[method].prepare(inputs, params, device)
    return {key: merged_tensor(rule, inputs, key) for key in inputs.keys}
