"""Layer statistics that turn GPTQ and E-PMQ into one rounding problem (method.md section 2).

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
as its Hessian is complete (:class:`EpmqAccumulator`), so memory holds two Hessians and one
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
    """GPTQ's damping: ``H + percdamp * mean(diag H) I`` (method.md section 3, step 3)."""
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


class EpmqAccumulator:
    """Folds task statistics ``(W_i, H_i)`` one task at a time into ``H_q``, ``R`` and ``c``."""

    def __init__(self, merged: torch.Tensor):
        if merged.dim() != 2:
            raise ValueError(f"merged weight must be 2-D, got shape {tuple(merged.shape)}")
        self.merged = merged.detach()
        d_out, d_in = merged.shape
        self.hessian_sum = torch.zeros(d_in, d_in, dtype=torch.float64, device=merged.device)
        self.rhs = torch.zeros(d_out, d_in, dtype=torch.float64, device=merged.device)
        self.expert_energy = 0.0
        self.tasks = 0

    def add_task(self, expert: torch.Tensor, hessian: torch.Tensor) -> None:
        if expert.shape != self.merged.shape:
            raise ValueError(f"expert weight has shape {tuple(expert.shape)}, merged has {tuple(self.merged.shape)}")
        d_in = self.merged.shape[1]
        if hessian.shape != (d_in, d_in):
            raise ValueError(f"task Hessian must be {d_in} x {d_in}, got {tuple(hessian.shape)}")
        product, energy = fold_expert(expert, hessian)
        self.rhs += product.double()
        self.expert_energy += energy
        self.hessian_sum += hessian.double()
        self.tasks += 1

    def problem(self, alpha: float, percdamp: float) -> EpmqProblem:
        if self.tasks == 0:
            raise ValueError("E-PMQ needs at least one task's statistics")
        return epmq_problem(self.merged, self.rhs, self.expert_energy, self.hessian_sum, alpha, percdamp)


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
    accumulator = EpmqAccumulator(merged)
    for expert, hessian in zip(experts, hessians):
        accumulator.add_task(expert, hessian)
    problem = accumulator.problem(alpha, percdamp)
    return problem.target, problem.hessian
