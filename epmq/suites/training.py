"""The one training loop of the offline suites, with its optimizer and schedules.

Every pretraining, alignment, probe and fine-tuning run of ``epmq/suites`` is ``train_steps``: per
batch, the caller's loss, then ``zero_grad`` / ``backward`` / optional gradient-norm clipping /
``step`` / schedule step / the caller's ``after_step`` (e.g. clamping a logit scale). What differs
between suites (how a batch is drawn and scored, which parameters decay) is the caller's, passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from epmq.progress import progress


def decay_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 decays: Callable[[str, torch.Tensor], bool] = lambda name, p: p.ndim >= 2) -> list[dict]:
    """AdamW parameter groups: trainable matrices decay by ``weight_decay``, the rest (biases,
    norms, scales; whatever ``decays`` rejects) do not."""
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(params, spec: dict) -> torch.optim.AdamW:
    """AdamW with the spec's ``lr``, ``betas``, ``eps`` and ``weight_decay`` (groups may override it)."""
    return torch.optim.AdamW(params, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"],
                             weight_decay=spec["weight_decay"])


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def linear_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train_steps(loss_of: Callable[[object], torch.Tensor], batches: Iterable, optimizer: torch.optim.Optimizer,
                *, schedule: Callable[[int], float] | None = None, clip_params: Sequence[torch.Tensor] = (),
                grad_clip: float | None = None, after_step: Callable[[int, torch.Tensor], None] | None = None,
                label: str = "training", total: int | None = None) -> list[float]:
    """Run one optimizer step per batch; the per-step losses.

    ``schedule`` is a learning-rate factor of the step (``LambdaLR``); with ``grad_clip`` the gradient
    norm of ``clip_params`` is clipped to it before each step."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule) if schedule is not None else None
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    losses = []
    for step, batch in progress(enumerate(batches), label, total=total, unit="step"):
        loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(clip_params), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step(step, loss)
        losses.append(loss.item())
    return losses
