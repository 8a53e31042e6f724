import itertools

import pytest
import torch

from epmq.grid import fit_scale_zero, quantize_codes, rtn_quantize
from epmq.solver import NotPositiveDefiniteError, gptq_round, quadratic_objective
from epmq.stats import damped


def ill_conditioned_inputs(d_in, n, generator=None):
    """Tokens whose channel scales span three orders of magnitude, with correlated channels."""
    scales = torch.logspace(-1.5, 1.5, d_in)
    mixing = torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=generator) / d_in**0.5
    return mixing @ (torch.randn(d_in, n, generator=generator) * scales[:, None])


def reference_gptq(w, h, bits, group_size, block_size=128):
    """Transcription of IST-DASLab/gptq's fasterquant loop (no act-order), for comparison."""
    w = w.clone().double()
    d = w.shape[1]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True)
    q_all = torch.zeros_like(w)
    if group_size == -1:
        scale, zero = fit_scale_zero(w, bits, False)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype)
        for i in range(i2 - i1):
            if group_size != -1 and (i1 + i) % group_size == 0:
                scale, zero = fit_scale_zero(w[:, i1 + i : i1 + i + group_size], bits, False)
            q = scale * (quantize_codes(w1[:, i], scale, zero, bits) - zero)
            q_all[:, i1 + i] = q
            e = (w1[:, i] - q) / u[i1 + i, i1 + i]
            w1[:, i:] -= e[:, None] * u[i1 + i, i1 + i : i2][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q_all


@pytest.mark.parametrize("group_size", [128, -1])
def test_matches_reference_gptq_when_groups_start_at_block_starts(group_size):
    # With groups aligned to blocks the reference fits each group on fully updated columns too,
    # so both must produce the same weights (up to float32 vs float64 arithmetic).
    w = torch.randn(16, 256) * 0.1
    x = ill_conditioned_inputs(256, 1024)
    h = damped(x @ x.T, 0.01)
    ours = gptq_round(w, h, 4, group_size).weight.double()
    ref = reference_gptq(w, h, 4, group_size)
    mismatched = (ours - ref).abs() > 1e-4
    assert mismatched.float().mean() < 0.01  # rare ties at a rounding boundary may flip


def test_identity_hessian_reduces_to_rtn():
    w = torch.randn(8, 64)
    assert torch.equal(gptq_round(w, torch.eye(64), 4, 32).weight, rtn_quantize(w, 4, 32).weight)


@pytest.mark.parametrize("bits,group_size,act_order", itertools.product([2, 3, 4, 8], [32, 128, -1], [False, True]))
def test_output_lies_on_the_grid(bits, group_size, act_order):
    d_in = 200  # not a multiple of any group size
    w = torch.randn(12, d_in)
    x = ill_conditioned_inputs(d_in, 400)
    q = gptq_round(w, damped(x @ x.T, 0.01), bits, group_size, act_order=act_order)
    assert q.weight.shape == w.shape and torch.isfinite(q.weight).all()
    maxq = 2**bits - 1
    codes = q.codes.long()
    assert codes.min() >= 0 and codes.max() <= maxq
    for group in q.g_idx.unique():
        columns = q.g_idx == group
        values = q.weight[:, columns]
        scale, zero = q.scales[:, group][:, None], q.zeros[:, group][:, None].float()
        assert torch.equal(values, scale * (codes[:, columns].float() - zero))
        for row in values:
            assert row.unique().numel() <= 2**bits


def test_gptq_beats_rtn_on_output_error_and_8_bits_is_near_lossless():
    wins = 0
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(32, 256, generator=g) * 0.05
        x = ill_conditioned_inputs(256, 2048, g)
        h = x @ x.T
        gptq = gptq_round(w, damped(h, 0.01), 4, 128).weight
        rtn = rtn_quantize(w, 4, 128).weight
        wins += quadratic_objective(gptq, w, h) < quadratic_objective(rtn, w, h)
    assert wins == 10
    w = torch.randn(32, 256) * 0.05
    x = ill_conditioned_inputs(256, 2048)
    q8 = gptq_round(w, damped(x @ x.T, 0.01), 8, 128).weight
    assert ((q8 - w) @ x).norm() / (w @ x).norm() < 0.01


def test_act_order_helps_on_skewed_hessians():
    w = torch.randn(32, 256) * 0.05
    x = ill_conditioned_inputs(256, 2048)
    h = damped(x @ x.T, 0.01)
    plain = quadratic_objective(gptq_round(w, h, 3, -1).weight, w, h)
    ordered = quadratic_objective(gptq_round(w, h, 3, -1, act_order=True).weight, w, h)
    assert ordered < plain


def test_dead_columns_are_zeroed_and_finite():
    w = torch.randn(8, 64)
    x = torch.randn(64, 300)
    x[[3, 17], :] = 0
    q = gptq_round(w, x @ x.T, 4, 32)  # undamped: only the dead-column rule keeps H invertible
    assert torch.isfinite(q.weight).all()
    assert torch.equal(q.weight[:, [3, 17]], torch.zeros(8, 2))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="d_in=4"):
        gptq_round(torch.randn(2, 4), torch.eye(3), 4, 2)
    with pytest.raises(ValueError, match="NaN"):
        gptq_round(torch.full((2, 4), float("nan")), torch.eye(4), 4, 2)
    with pytest.raises(NotPositiveDefiniteError):
        gptq_round(torch.randn(2, 4), -torch.eye(4), 4, 2)


@pytest.mark.parametrize("act_order", [False, True])
def test_static_groups_fit_each_group_once_on_the_target(act_order):
    w = torch.randn(8, 96)
    x = ill_conditioned_inputs(96, 400)
    q = gptq_round(w, damped(x @ x.T, 0.01), 4, 32, act_order=act_order, static_groups=True)
    rtn = rtn_quantize(w, 4, 32)
    assert torch.equal(q.g_idx, torch.arange(96) // 32)  # groups stay consecutive under act-order
    assert torch.equal(q.scales, rtn.scales) and torch.equal(q.zeros, rtn.zeros)
    assert torch.equal(gptq_round(w, torch.eye(96), 4, 32, static_groups=True).weight, rtn.weight)


def test_a_precomputed_hessian_factor_gives_the_same_result():
    w = torch.randn(8, 96)
    x = ill_conditioned_inputs(96, 400)
    h = damped(x @ x.T, 0.01).double()
    factor = torch.linalg.cholesky(h)
    assert torch.equal(gptq_round(w, h, 4, 32, hessian_factor=factor).weight, gptq_round(w, h, 4, 32).weight)
