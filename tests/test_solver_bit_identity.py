"""The solver's column loop works on transposed blocks for speed (issue 19); its results must stay
bit-identical to the column-major statement of the algorithm, kept here as the reference.

``column_major_gptq_round`` is the solver's loop as it was before that change (``epmq/solver.py`` at
7dcf598): same arguments, same helpers, columns read and updated in place in ``d_out x d_in``
layout. Every option combination of the solver is compared on codes, scales, zeros and ``g_idx``,
and whole models go through the engine with each loop (GPTQ, GPTQ's llm-compressor variants,
E-PMQ and its unrounded row).
"""

import copy

import pytest
import torch

import baselines.gptq
import epmq.quant.epmq
from epmq.config import method_params
from epmq.engine import CalibrationTask, quantize_model
from epmq.grid import QuantizedWeight, dequantize_codes, fit_scale_zero, group_index, quantize_codes
from epmq.io import LazyCheckpoint
from epmq.catalog import get_method
from epmq.solver import _static_group_grids, gptq_round, inverse_cholesky_upper, zero_dead_columns
from epmq.stats import damped
from epmq.testing.models import image_batches, save_experts, text_batches, tiny_clip_vision, tiny_llama


def column_major_gptq_round(target, hessian, bits, group_size, sym=False, act_order=False, block_size=128,
                            static_groups=False, hessian_factor=None, group_fit="block_start"):
    d_out, d_in = target.shape
    size = d_in if group_size == -1 else group_size
    w, h, dead = zero_dead_columns(target.detach().to(torch.float32), hessian.detach().to(torch.float64))
    static = _static_group_grids(w, bits, size, sym) if static_groups else None
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    reuse = hessian_factor is not None and not dead.any() and not act_order
    u = inverse_cholesky_upper(h, hessian_factor.double() if reuse else None).to(torch.float32)
    n_groups = -(-d_in // size)
    codes = torch.empty_like(w)
    scales = torch.empty(d_out, n_groups, dtype=torch.float32)
    zeros = torch.empty_like(scales)
    for i1 in range(0, d_in, block_size):
        i2 = min(i1 + block_size, d_in)
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        u_block = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if static is not None:
                group = int(perm[column] if perm is not None else column) // size
                scale, zero = static[0][:, group], static[1][:, group]
            elif column % size == 0:
                if group_fit == "block_start":
                    columns = w[:, column : column + size]
                else:
                    end = min(column + size, d_in)
                    if end <= i2:
                        columns = block[:, i : end - i1]
                    else:
                        beyond = w[:, i2:end] - errors[:, :i] @ u[i1:column, i2:end]
                        columns = torch.cat([block[:, i:], beyond], dim=1)
                scale, zero = fit_scale_zero(columns, bits, sym)
                scales[:, column // size], zeros[:, column // size] = scale, zero
            q = quantize_codes(block[:, i], scale, zero, bits)
            codes[:, column] = q
            error = (block[:, i] - dequantize_codes(q, scale, zero)) / u_block[i, i]
            block[:, i:] -= error[:, None] * u_block[i, i:][None, :]
            errors[:, i] = error
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    if static is not None:
        scales, zeros = static
    g_idx = group_index(d_in, group_size, None if static_groups else perm)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes.to(torch.uint8), scales, zeros.to(torch.uint8), g_idx, bits, group_size, sym)


def assert_same_bits(a: QuantizedWeight, b: QuantizedWeight):
    for field in ("codes", "scales", "zeros", "g_idx"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape, field
        assert torch.equal(x, y), field  # exact: no tolerance
    assert a.codes.is_contiguous()


def problem(d_out, d_in, tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=generator)
    x = torch.randn(d_in, tokens, generator=generator) * torch.logspace(-1, 1, d_in)[:, None]
    x[d_in // 3] = 0  # a dead column: no calibration signal
    return w, damped((x @ x.T).double(), 0.01)


OPTIONS = [
    {},
    {"static_groups": True},
    {"act_order": True},
    {"act_order": True, "static_groups": True},
    {"group_fit": "current"},
    {"group_fit": "current", "block_size": 7},
    {"sym": True, "block_size": 50},
    {"block_size": 13, "act_order": True},
]


@pytest.mark.parametrize("shape", [(48, 96, 200), (33, 77, 40), (40, 300, 500), (200, 64, 30)], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("group_size", [32, 20, -1])
def test_solver_matches_the_column_major_loop_bit_for_bit(shape, options, group_size):
    w, h = problem(*shape, seed=shape[1])
    for bits in (4, 3):
        assert_same_bits(gptq_round(w, h, bits, group_size, **options), column_major_gptq_round(w, h, bits, group_size, **options))


def test_solver_matches_with_a_precomputed_factor():
    w, h = problem(64, 160, 300, seed=1)
    h = h.clone()
    h[5, 5] += 1.0  # no dead column left: the factor is used
    factor = torch.linalg.cholesky(h)
    assert_same_bits(gptq_round(w, h, 4, 32, hessian_factor=factor), column_major_gptq_round(w, h, 4, 32, hessian_factor=factor))


def replacements(build, batches, method, params, tmp_path):
    base = build()
    experts = save_experts(base, tmp_path, 2)
    tasks = [CalibrationTask(f"t{i}", batches(2, seed=i), LazyCheckpoint(path)) for i, path in enumerate(experts)]
    model = copy.deepcopy(base)
    result = quantize_model(model, get_method(method, method_params("quantize", bits=4, group_size=32, **params)), tasks)
    return result, model.state_dict()


@pytest.mark.parametrize("build, batches", [(tiny_llama, text_batches), (tiny_clip_vision, image_batches)], ids=["llama", "clip"])
@pytest.mark.parametrize("method, params", [
    ("gptq", {}),
    ("gptq", {"static_groups": True, "true_sequential": False}),
    ("epmq", {}),
    ("epmq_fp", {}),
], ids=["gptq", "gptq-llmcompressor-variants", "epmq", "epmq_fp"])
def test_engine_output_is_identical_with_the_column_major_loop(build, batches, method, params, tmp_path, monkeypatch):
    fast, fast_state = replacements(build, batches, method, params, tmp_path / "fast")
    monkeypatch.setattr(baselines.gptq, "gptq_round", column_major_gptq_round)
    monkeypatch.setattr(epmq.quant.epmq, "gptq_round", column_major_gptq_round)
    slow, slow_state = replacements(build, batches, method, params, tmp_path / "slow")
    assert fast.replacements.keys() == slow.replacements.keys()
    for name in fast.replacements:
        a, b = fast.replacements[name].replacement, slow.replacements[name].replacement
        if isinstance(a, QuantizedWeight):
            assert_same_bits(a, b)
        else:
            assert torch.equal(a, b), name
    assert all(torch.equal(fast_state[key], slow_state[key]) for key in fast_state)
    for x, y in zip(fast.records, slow.records):
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}
