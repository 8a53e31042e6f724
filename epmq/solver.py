"""One rounding solver for every quadratic layer objective: GPTQ's sequential rounding.

Minimises ``tr((Q - T) H (Q - T)^T)`` over weights ``Q`` on the b-bit grid (``epmq.grid``), column
by column, spreading each column's rounding error onto the columns not yet rounded through the
upper Cholesky factor of ``H^-1`` (Frantar et al., 2023, Algorithm 1; IST-DASLab/gptq ``gptq.py``).

GPTQ and E-PMQ are the same call with different statistics (paper §4.3 and Appendix C: eqs. 8, 21, 22):

* GPTQ:  ``T = W_m``,                   ``H = H_q + percdamp * mean(diag H_q) I``
* E-PMQ: ``T = W* = R H^-1`` (eq. 20),  ``H = H_q + lam I`` (eq. 15)

The solver adds no damping itself; a Hessian that is not positive definite is an error
(:class:`NotPositiveDefiniteError`), and callers decide how to damp.

A group's scale and zero are fitted, by default, on the group's columns as they were when the
``block_size``-column block started, as the reference does (IST-DASLab/gptq ``gptq.py`` calls
``find_params`` on ``W``, which receives the block's error updates only when the block ends; AutoGPTQ
and GPTQModel do the same). ``group_fit="current"`` fits them instead on the error-updated columns
(including the updates made earlier inside the same block), the stated algorithm read literally;
the two agree when groups start at block starts (group size a multiple of ``block_size``) and
differ for group 32. The one remaining difference from the reference: the Cholesky factorisations
run in float64.
"""

from __future__ import annotations

import torch

from epmq.grid import (
    QuantizedWeight,
    dequantize_codes,
    fit_scale_zero,
    group_index,
    quantize_codes,
)


#: where a group's scale and zero are fitted: the reference's columns at block start, or the current ones
GROUP_FITS = ("block_start", "current")


class NotPositiveDefiniteError(ValueError):
    """The Hessian handed to the solver has no Cholesky factorisation."""


def quadratic_objective(
    weight: torch.Tensor, target: torch.Tensor, hessian: torch.Tensor, dtype: torch.dtype = torch.float64
) -> float:
    """``tr((Q - T) H (Q - T)^T)``, computed in ``dtype`` (float32 suffices for logging)."""
    diff = weight.to(dtype) - target.to(dtype)
    return float(((diff @ hessian.to(dtype)) * diff).sum(dtype=torch.float64))


def inverse_cholesky_upper(hessian: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), computed in float64.

    ``factor`` is the lower Cholesky factor of ``H`` when the caller already has it.
    """
    if factor is None:
        factor, info = torch.linalg.cholesky_ex(hessian.double())
        if int(info) != 0:
            raise NotPositiveDefiniteError(
                f"Hessian is not positive definite (leading minor {int(info)} of {hessian.shape[0]}); add damping"
            )
    inverse = torch.cholesky_inverse(factor)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0:
        raise NotPositiveDefiniteError("inverse Hessian lost positive definiteness numerically; add damping")
    return upper


def gptq_round(
    target: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = False,
    act_order: bool = False,
    block_size: int = 128,
    static_groups: bool = False,
    hessian_factor: torch.Tensor | None = None,
    group_fit: str = "block_start",
) -> QuantizedWeight:
    """Round ``target`` (d_out x d_in) onto the grid minimising ``tr((Q - T) H (Q - T)^T)``.

    Columns whose Hessian diagonal is zero ("dead": no calibration signal) are set to zero, as in
    GPTQ. With ``act_order`` columns are processed by descending ``diag(H)``, and groups are formed
    in that order (recorded in ``g_idx``). ``static_groups`` instead fits every group once, up front,
    on the target's consecutive columns (the reference's ``--static-groups``, and what llm-compressor
    does); act-order then only changes the processing order. Returns a :class:`QuantizedWeight`
    whose ``.weight`` is the dequantized result in the target's column order. ``hessian_factor``
    (the lower Cholesky factor of ``hessian``, if the caller computed it) saves one factorisation;
    it is ignored when dead columns or act-order change the Hessian. ``group_fit`` is
    ``"block_start"`` (the reference) or ``"current"`` (see the module docstring).
    """
    if target.dim() != 2:
        raise ValueError(f"target must be 2-D (d_out x d_in), got shape {tuple(target.shape)}")
    d_out, d_in = target.shape
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"hessian must be {d_in} x {d_in} for a target with d_in={d_in}, got {tuple(hessian.shape)}")
    if not torch.isfinite(target).all() or not torch.isfinite(hessian).all():
        raise ValueError("target and hessian must be finite (found NaN or Inf)")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    size = d_in if group_size == -1 else group_size
    if size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    if group_fit not in GROUP_FITS:
        raise ValueError(f"group_fit must be one of {GROUP_FITS}, got {group_fit!r}")

    w, h, dead = zero_dead_columns(target.detach().to(torch.float32), hessian.detach().to(torch.float64))
    static = _static_group_grids(w, bits, size, sym) if static_groups else None
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    reuse = hessian_factor is not None and not dead.any() and not act_order
    u = inverse_cholesky_upper(h, hessian_factor.double() if reuse else None).to(torch.float32)

    n_groups = -(-d_in // size)
    # The loop reads and updates one column at a time: it works on transposed copies of each block
    # (and of the static grids), whose rows are the columns, contiguous in memory. Every element
    # goes through the same arithmetic as in the column-major statement of the algorithm.
    codes = torch.empty(d_in, d_out, dtype=w.dtype, device=w.device)
    scales = torch.empty(d_out, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    static_rows = (static[0].T.contiguous(), static[1].T.contiguous()) if static is not None else None
    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        block = w[:, i1:i2].T.contiguous()
        errors = torch.zeros_like(block)
        u_block = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if static_rows is not None:
                group = int(perm[column] if perm is not None else column) // size
                scale, zero = static_rows[0][group], static_rows[1][group]
            elif column % size == 0:
                if group_fit == "block_start":  # w gets this block's updates only when the block ends
                    columns = w[:, column : column + size]
                else:
                    columns = _current_group(w, block, errors, u, i1, i2, i, size)
                scale, zero = fit_scale_zero(columns, bits, sym)
                scales[:, column // size], zeros[:, column // size] = scale, zero
            current = block[i]
            q = quantize_codes(current, scale, zero, bits)
            codes[column] = q
            error = torch.div(current - dequantize_codes(q, scale, zero), u_block[i, i], out=errors[i])
            block[i:] -= u_block[i, i:, None] * error
        w[:, i2:] -= errors.T.contiguous() @ u[i1:i2, i2:]

    if static is not None:
        scales, zeros = static
    g_idx = group_index(d_in, group_size, None if static_groups else perm)
    codes = codes.T if perm is None else codes.T[:, torch.argsort(perm)]
    return QuantizedWeight(
        codes.to(torch.uint8, memory_format=torch.contiguous_format), scales, zeros.to(torch.uint8), g_idx.to(w.device), bits, group_size, sym
    )


def zero_dead_columns(target: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's dead columns: where ``diag(H) == 0`` (no calibration signal) set ``H_jj = 1`` and
    zero the target's column ``j``. Returns copies ``(target, hessian, dead mask)``.

    The reference does this on the undamped Hessian, before damping (whose ``mean(diag H)`` then
    counts the 1s); callers that damp must call it first.
    """
    w, h = target.clone(), hessian.clone()
    dead = torch.diagonal(h) == 0
    if dead.any():
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    return w, h, dead


def _static_group_grids(w, bits, size, sym):
    """Scale and zero of every group of consecutive columns, fitted on the unmodified target."""
    grids = [fit_scale_zero(w[:, start : start + size], bits, sym) for start in range(0, w.shape[1], size)]
    return torch.stack([g[0] for g in grids], dim=1), torch.stack([g[1] for g in grids], dim=1)


def _current_group(w, block, errors, u, i1, i2, i, size):
    """The error-updated columns of the group starting at block column ``i`` (d_out x columns).

    ``block`` and ``errors`` hold the block's columns as rows. Columns inside the block are read
    from ``block`` (updated column by column); columns past the block still owe the block's pending
    lazy update, which is applied here to a copy.
    """
    end = min(i1 + i + size, w.shape[1])
    if end <= i2:
        return block[i : end - i1].T
    pending = errors.T.contiguous()[:, :i]
    beyond = w[:, i2:end] - pending @ u[i1 : i1 + i, i2:end]
    return torch.cat([block[i:].T, beyond], dim=1)
