"""Layer statistics that turn GPTQ and E-PMQ into one rounding problem (paper §4.2-4.3 and Appendix C).

For a linear layer with merged weight ``W_m``, expert weights ``W_i`` and task inputs ``X_i``
(d_in x n_i), the E-PMQ objective (paper eq. 12)

    sum_i ||Q X_i - W_i X_i||_F^2 + lam ||Q - W_m||_F^2

equals ``tr((Q - W*) H (Q - W*)^T) + c`` with

    H_i = X_i X_i^T,  H_q = sum_i H_i                      (eq. 14)
    lam = alpha / d_in * sum_i ||X_i||_F^2 = alpha * mean(diag H_q)    (eq. 13)
    H   = H_q + lam I,  R = sum_i W_i H_i + lam W_m        (eq. 15)
    W*  = R H^-1                                           (eq. 20)
    c   = sum_i tr(W_i H_i W_i^T) + lam ||W_m||^2 - tr(W* H W*^T)

so the rounding solver only needs ``(W*, H)``. Each task's contribution is folded into ``R`` as soon
as its Hessian is complete (:class:`TaskStatistics`), so memory holds two Hessians and one
``R`` per layer whatever the number of experts K.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from epmq.solver import NotPositiveDefiniteError, quadratic_objective

log = logging.getLogger(__name__)


def damped(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """GPTQ's damping: ``H + percdamp * mean(diag H) I`` (IST-DASLab gptq.py ``fasterquant``, ``percdamp``)."""
    return hessian + percdamp * torch.diagonal(hessian).mean() * torch.eye(
        hessian.shape[0], dtype=hessian.dtype, device=hessian.device
    )


def anchor_strength(hessian_sum: torch.Tensor, alpha: float) -> float:
    """``lam = alpha / d_in * sum_i ||X_i||_F^2 = alpha * mean(diag H_q)`` (paper eq. 13)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return float(alpha * torch.diagonal(hessian_sum).double().mean())


def solve_right(rhs: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rhs @ H^-1, L)`` for symmetric positive definite ``H = L L^T``, in float64 via Cholesky."""
    factor, info = torch.linalg.cholesky_ex(hessian.double())
    if int(info) != 0:
        raise NotPositiveDefiniteError(f"Hessian is not positive definite (leading minor {int(info)})")
    return torch.cholesky_solve(rhs.double().T.contiguous(), factor).T, factor


@dataclass
class EpmqProblem:
    """The rounding problem of one layer plus what the log and the tests need."""

    target: torch.Tensor  # W*, float64
    hessian: torch.Tensor  # H_q + lam I (+ fallback damping), float64
    lam: float
    fallback_damping: float  # 0 unless H_q + lam I was not positive definite
    constant: float  # c in objective = tr((Q - W*) H (Q - W*)^T) + c
    factor: torch.Tensor  # lower Cholesky factor of ``hessian``: the solver reuses it

    def objective(self, weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> float:
        """The E-PMQ objective (eq. 12) of ``weight``, reconstructed from the statistics.

        The quadratic part runs in ``dtype`` (float32 suffices for logging); the constant is float64.
        """
        return quadratic_objective(weight, self.target, self.hessian, dtype) + self.constant


def fold_expert(expert: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Task i's share of ``R`` and ``c``: ``(W_i H_i, tr(W_i H_i W_i^T))``.

    The product runs in the Hessian's dtype (float32 by default, TF32 off); the trace is summed in
    float64.
    """
    if not torch.isfinite(expert).all():
        raise ValueError("expert weight contains NaN or Inf")
    expert = expert.to(device=hessian.device, dtype=hessian.dtype)
    product = expert @ hessian
    return product, float((product * expert).sum(dtype=torch.float64))


def epmq_problem(
    merged: torch.Tensor,
    rhs: torch.Tensor,
    expert_energy: float,
    hessian_sum: torch.Tensor,
    alpha: float,
    percdamp: float,
) -> EpmqProblem:
    """``(W*, H)`` of eqs. 15 and 20 from ``R_experts = sum_i W_i H_i`` and ``H_q``.

    Damps by ``percdamp * mean(diag H_q)`` (added to ``H`` and, as an anchor, to ``R``) only if
    ``H_q + lam I`` is not positive definite, and logs it.
    """
    lam = anchor_strength(hessian_sum, alpha)
    eye = torch.eye(hessian_sum.shape[0], dtype=torch.float64, device=hessian_sum.device)
    merged = merged.to(hessian_sum.device).double()
    hessian = hessian_sum.double() + lam * eye
    rhs = rhs.double() + lam * merged
    fallback = 0.0
    try:
        target, factor = solve_right(rhs, hessian)
    except NotPositiveDefiniteError:
        fallback = percdamp * float(torch.diagonal(hessian_sum).double().mean()) or percdamp
        log.warning("H_q + lam I is not positive definite (alpha=%g, lam=%g); adding damping %g * I", alpha, lam, fallback)
        hessian = hessian + fallback * eye
        rhs = rhs + fallback * merged
        target, factor = solve_right(rhs, hessian)
    anchor_energy = (lam + fallback) * float((merged**2).sum())
    constant = expert_energy + anchor_energy - float(((target @ hessian) * target).sum())
    # The solver works in float32 downstream: an anchor this strong leaves nothing representable.
    if not (math.isfinite(constant) and lam * torch.finfo(torch.float32).eps < torch.finfo(torch.float32).max
            and torch.isfinite(target).all()):
        raise ValueError(f"alpha={alpha:g} gives lam = alpha * mean(diag H_q) = {lam:g}: the E-PMQ system overflows")
    return EpmqProblem(target, hessian, lam, fallback, constant, factor)


class TaskStatistics:
    """Calibration statistics of linears sharing one input, folded one task at a time.

    ``hessian_sum`` is ``H_q = sum_i H_i`` (eq. 14, float64). With ``fold_experts``, each finished
    task is folded into ``rhs[name] += W_i H_i`` and ``expert_energy[name] += tr(W_i H_i W_i^T)``
    (eq. 15 without the anchor, and the constant ``c``) for every linear of the group, so memory
    holds two Hessians and one ``R`` per linear whatever the number of tasks. A task's Hessian is
    either summed from its inputs (:meth:`add_batch` per batch, then :meth:`end_task`; the engine)
    or given whole (:meth:`add_task`). It and ``rhs`` are kept in ``dtype``.
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

    def add_task(self, hessian: torch.Tensor, expert_weights: dict[str, torch.Tensor] | None) -> None:
        """Fold one whole task: its Hessian ``H_i = X_i X_i^T`` (and, with ``fold_experts``, its expert weights)."""
        if hessian.shape != self._task_hessian.shape:
            raise ValueError(f"task Hessian must be {tuple(self._task_hessian.shape)}, got {tuple(hessian.shape)}")
        self._task_hessian.copy_(hessian)
        self.end_task(expert_weights)

    def end_task(self, expert_weights: dict[str, torch.Tensor] | None) -> None:
        """Close the current task: fold its Hessian (and, for E-PMQ, its expert weights)."""
        if not torch.isfinite(self._task_hessian).all():
            raise ValueError(f"calibration inputs of {self.names} contain NaN or Inf")
        if self.fold_experts:
            if expert_weights is None:
                raise ValueError("this method needs expert weights for every calibration task")
            for name in self.names:
                expert, d_in = expert_weights[name], self._task_hessian.shape[0]
                if expert.dim() != 2 or expert.shape[1] != d_in or (name in self.rhs and expert.shape != self.rhs[name].shape):
                    raise ValueError(f"expert weight of {name} has shape {tuple(expert.shape)}: not 2-D with {d_in} "
                                     "columns, or not the shape of the earlier tasks' experts")
                product, energy = fold_expert(expert, self._task_hessian)
                self.rhs[name] = self.rhs[name] + product if name in self.rhs else product
                self.expert_energy[name] += energy
        self.hessian_sum += self._task_hessian.double()
        self.task_tokens.append(self.tokens - sum(self.task_tokens))
        self._task_hessian.zero_()

    def problem(self, name: str, merged: torch.Tensor, alpha: float, percdamp: float) -> EpmqProblem:
        """E-PMQ's rounding problem ``(W*, H)`` of linear ``name`` with merged weight ``merged``."""
        if not self.task_tokens:
            raise ValueError("E-PMQ needs at least one task's statistics")
        if tuple(merged.shape) != tuple(self.rhs[name].shape):
            raise ValueError(f"merged weight of {name} has shape {tuple(merged.shape)}, experts {tuple(self.rhs[name].shape)}")
        return epmq_problem(merged, self.rhs[name], self.expert_energy[name], self.hessian_sum, alpha, percdamp)


#: the name of the one linear of :func:`epmq_target`
LAYER = "weight"


def epmq_target(
    merged: torch.Tensor,
    experts: list[torch.Tensor],
    hessians: list[torch.Tensor],
    alpha: float,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W*, H_q + lam I)`` from the merged weight, K expert weights and K task Hessians ``X_i X_i^T``.

    Paper eqs. 13-15 and 20. With ``alpha = 0`` and a singular ``H_q``, GPTQ damping
    ``percdamp * mean(diag H_q)`` is added (to ``H`` and, as an anchor, to ``R``) and logged.
    """
    if len(experts) != len(hessians):
        raise ValueError(f"got {len(experts)} expert weights but {len(hessians)} Hessians")
    if not experts:
        raise ValueError("E-PMQ needs at least one expert")
    stats = TaskStatistics([LAYER], merged.shape[-1], fold_experts=True, dtype=hessians[0].dtype, device=hessians[0].device)
    for expert, hessian in zip(experts, hessians):
        stats.add_task(hessian, {LAYER: expert})
    problem = stats.problem(LAYER, merged, alpha, percdamp)
    return problem.target, problem.hessian
