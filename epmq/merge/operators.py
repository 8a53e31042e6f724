"""The merge operators as pure tensor functions, one state-dict tensor at a time.

Semantics follow tanganke/fusion_bench (``simple_average``, ``task_arithmetic``, ``ties_merging``
with ``ties_merging_utils``, ``wudi``) and the merging operator ``M`` of the paper's eq. 4 (§5.1). Every function
takes the pretrained tensor ``W_0`` and/or the experts' tensors ``W_i`` (or their task vectors
``tau_i = W_i - W_0``, stacked along a leading task dimension) and returns float tensors in the
computation dtype; callers cast back to the checkpoint's dtype.

Arithmetic runs in float32 (float64 tensors stay float64): bf16/fp16 checkpoints are merged
without rounding in between, and the streaming and in-memory paths run the very same
functions on the very same tensors, so their results agree bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from epmq.progress import progress


def computation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def task_vectors(pretrained: Tensor, experts: Sequence[Tensor]) -> Tensor:
    """``tau_i = W_i - W_0`` for every expert, stacked: shape ``(K, *pretrained.shape)``."""
    dtype = computation_dtype(pretrained.dtype)
    base = pretrained.to(dtype)
    vectors = torch.empty((len(experts), *pretrained.shape), dtype=dtype, device=pretrained.device)
    for vector, expert in zip(vectors, experts):
        torch.sub(expert.to(dtype), base, out=vector)
    return vectors


def task_vector_sum(pretrained: Tensor, experts: Sequence[Tensor]) -> Tensor:
    """``sum_i tau_i``, accumulated expert by expert (no K-fold stack)."""
    base = pretrained.to(computation_dtype(pretrained.dtype))
    total = torch.zeros_like(base)
    for expert in experts:
        total += expert.to(base.dtype) - base
    return total


# --- simple averaging and task arithmetic -------------------------------------------------------


def simple_average(experts: Sequence[Tensor]) -> Tensor:
    """Simple averaging (Wortsman et al. 2022, "model soups"): ``W_m = mean_i W_i``."""
    total = experts[0].to(computation_dtype(experts[0].dtype), copy=True)
    for expert in experts[1:]:
        total += expert
    return total / len(experts)


def task_arithmetic(pretrained: Tensor, experts: Sequence[Tensor], scaling: float) -> Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023): ``W_m = W_0 + scaling * sum_i tau_i``."""
    return pretrained.to(computation_dtype(pretrained.dtype)) + scaling * task_vector_sum(pretrained, experts)


# --- TIES (Yadav et al., NeurIPS 2023) -----------------------------------------------------------


def ties_kth_rank(count: int, top_k: float) -> int:
    """1-based rank, among a task's ``count`` magnitudes sorted ascending, of its trimming threshold.

    FusionBench's ``topk_values_mask``: the threshold is the ``(count - int(count * top_k))``-th
    smallest ``|tau_i|`` over all of the task's entries, and every entry at or above it is kept (so
    ties at the threshold are all kept). A rank below 1 (``top_k = 1``) keeps everything; FusionBench
    would fail there, we use threshold 0.
    """
    return count - int(count * top_k)


def ties_magnitudes_(task_vectors: Tensor) -> Tensor:
    """``|tau_i|`` in float32, the values TIES thresholds are chosen from; overwrites its argument."""
    return task_vectors.abs_().to(torch.float32)


def ties_magnitudes(task_vectors: Tensor) -> Tensor:
    return ties_magnitudes_(task_vectors.clone())


def ties_trim_(task_vectors: Tensor, thresholds: Tensor) -> Tensor:
    """Trim step, in place: zero the entries of task ``i`` with ``|tau_i| < thresholds[i]``."""
    for vector, threshold in zip(task_vectors, thresholds.to(task_vectors.device, torch.float32)):
        vector.masked_fill_(ties_magnitudes(vector) < threshold, 0.0)
    return task_vectors


def ties_trim(task_vectors: Tensor, thresholds: Tensor) -> Tensor:
    """Trim step: keep the entries of task ``i`` with ``|tau_i| >= thresholds[i]``, zero the rest."""
    return ties_trim_(task_vectors.clone(), thresholds)


def ties_elected_sign(trimmed: Tensor) -> Tensor:
    """Elect step, before zero resolution: ``sign(sum_i trimmed tau_i)``, entrywise (may be 0)."""
    return torch.sign(trimmed.sum(dim=0))


def ties_disjoint_merge(trimmed: Tensor, sign: Tensor, merge_func: str) -> Tensor:
    """Disjoint merge: aggregate only the entries whose sign agrees with the elected ``sign``.

    ``sum`` is FusionBench's default; ``mean`` (the TIES paper) divides by the number of agreeing
    entries. An entry whose sign is 0 keeps nothing (FusionBench would keep the negative entries,
    an artefact of ``where(sign > 0, v > 0, v < 0)``; it only arises when the whole model's
    elected signs sum to exactly 0).
    """
    if merge_func not in ("sum", "mean"):
        raise ValueError(f"unknown TIES merge_func {merge_func!r} (expected 'sum' or 'mean')")
    total = torch.zeros_like(sign)
    agreeing = torch.zeros_like(sign)
    for vector in trimmed:  # task by task: temporaries of one tensor, not K
        agrees = vector * sign > 0
        total += torch.where(agrees, vector, 0.0)
        agreeing += agrees
    return total if merge_func == "sum" else total / agreeing.clamp(min=1)


def ties(
    pretrained: Tensor,
    experts: Sequence[Tensor],
    thresholds: Tensor,
    majority_sign: float,
    scaling: float,
    merge_func: str,
) -> Tensor:
    """TIES-merging of one tensor: trim, elect sign, disjoint merge, ``W_m = W_0 + scaling * merged``.

    ``thresholds`` (one per task) and ``majority_sign`` are whole-model quantities: the global
    top-k magnitude threshold of each task, and ``sign(sum of elected signs over all entries)``,
    which replaces elected signs that are exactly 0 (FusionBench's ``resolve_zero_signs``).
    """
    trimmed = ties_trim_(task_vectors(pretrained, experts), thresholds)
    elected = ties_elected_sign(trimmed)
    sign = torch.where(elected == 0, majority_sign, elected)
    merged = ties_disjoint_merge(trimmed, sign, merge_func)
    return pretrained.to(merged.dtype) + scaling * merged


# --- WUDI (Cheng et al., ICML 2025, "Whoever started the interference should end it") -----------

# Module names of lookup tables stored as 2-D ``weight``s: embeddings, and bias tables such as
# T5's ``relative_attention_bias`` (a real bias is 1-D, so a 2-D "...bias" module is a table).
_LOOKUP_TABLE = re.compile(r"embed|bias$", re.IGNORECASE)


def is_block_weight(key: str, shape: Sequence[int]) -> bool:
    """Whether WUDI optimises this tensor: a 2-D weight of a linear map inside a repeated block.

    Rule (no model names): the tensor is 2-D, some component of its dotted key is a layer index
    (all digits: ``encoder.layers.3.`` in CLIP, ``model.layers.3.`` in Llama, ``encoder.layer.3.``
    in BERT, ``encoder.block.3.`` in T5), and no component names a lookup table (contains
    ``embed``, or ends in ``bias`` like T5's ``relative_attention_bias``). Embeddings, position
    tables, poolers, projections and heads outside the blocks are excluded; callers pass
    floating tensors only. This matches the WUDI authors' ViT script, which optimises the
    attention and MLP weights of the residual blocks (``tensors: block_weights``; FusionBench,
    the default, optimises every 2-D tensor: :func:`is_2d`).
    """
    components = key.split(".")
    return (
        len(shape) == 2
        and any(component.isdigit() for component in components)
        and not any(_LOOKUP_TABLE.search(component) for component in components[:-1])
    )


def is_2d(key: str, shape: Sequence[int]) -> bool:
    """Whether WUDI optimises this tensor under FusionBench's rule: every 2-D tensor (its
    ``exclude_keys`` is empty), embeddings and heads included."""
    return len(shape) == 2


#: ``tensors`` parameter of WUDI -> which tensors it optimises (the rest take the mean task vector)
WUDI_TENSORS = {"all_2d": is_2d, "block_weights": is_block_weight}


def wudi_loss(merged: Tensor, task_vectors: Tensor) -> Tensor:
    """WUDI's interference loss ``sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2``.

    Tasks with a zero task vector contribute nothing (their numerator is identically 0).
    """
    norms = task_vectors.flatten(1).square().sum(dim=1)
    active = norms > 0
    interference = (merged - task_vectors[active]) @ task_vectors[active].transpose(1, 2)
    return (interference.square().sum(dim=(1, 2)) / norms[active]).sum()


def wudi_task_vector(task_vectors: Tensor, steps: int, lr: float) -> tuple[Tensor, list[float]]:
    """Minimise :func:`wudi_loss` over ``tau_m`` from ``sum_i tau_i`` with ``steps`` full-batch Adam steps.

    ``task_vectors`` has shape ``(K, d_out, d_in)``. Returns the merged task vector (no scaling is
    applied: ``W_m = W_0 + tau_m``) and the loss before each step. The gradient is formed in closed
    form, ``2 sum_i (tau_m - tau_i) G_i / ||tau_i||^2`` with ``G_i = tau_i^T tau_i``, which is what
    autograd gives for the authors' loss; the Gram form is used when ``d_in < d_out`` because
    it costs ``d_out d_in^2`` per task instead of ``2 d_out^2 d_in``. Tasks are visited one at a
    time, so the temporaries are a few tensors whatever K.
    """
    merged = task_vectors.sum(dim=0)
    norms = torch.linalg.vector_norm(task_vectors.flatten(1), dim=1).square()
    active = (norms > 0).nonzero().flatten().tolist()
    if steps == 0 or not active:
        return merged, []
    vectors = [task_vectors[task] for task in active]
    weights = [1.0 / float(norms[task]) for task in active]
    grams = [vector.T @ vector for vector in vectors] if vectors[0].shape[1] < vectors[0].shape[0] else None
    parameter = torch.nn.Parameter(merged)
    optimizer = torch.optim.Adam([parameter], lr=lr, weight_decay=0.0)
    losses = []
    for _ in progress(range(steps), "WUDI steps", unit="step"):
        current = parameter.detach()
        gradient = torch.zeros_like(current)
        loss = current.new_zeros(())
        for task, (vector, weight) in enumerate(zip(vectors, weights)):
            disturbance = current - vector
            if grams is not None:
                half_gradient = disturbance @ grams[task]
                loss += weight * torch.vdot(disturbance.flatten(), half_gradient.flatten())
            else:
                interference = disturbance @ vector.T
                loss += weight * torch.vdot(interference.flatten(), interference.flatten())
                half_gradient = interference @ vector
            gradient.add_(half_gradient, alpha=2 * weight)
        losses.append(float(loss))
        parameter.grad = gradient
        optimizer.step()
    return parameter.detach(), losses


def mean_task_vector(pretrained: Tensor, experts: Sequence[Tensor]) -> Tensor:
    """``mean_i tau_i``: what WUDI gives every tensor it does not optimise."""
    return task_vector_sum(pretrained, experts) / len(experts)
