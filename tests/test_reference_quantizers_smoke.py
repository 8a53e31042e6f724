"""Smoke test of epmq/testing/reference_quantizers/: llm-compressor GPTQ / AWQ on a tiny Llama, CPU.

Checks that the read-back weights are on a 4-bit grid per (row, group), that the caller's model
is untouched, that the quantized models stay close to the fp model (and beat plain min-max RTN
on the calibration data), and that the AWQ smoothing we read back is function-preserving.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("llmcompressor")
pytest.importorskip("compressed_tensors")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from epmq.testing.reference_quantizers.awq import run_llmcompressor_awq  # noqa: E402
from epmq.testing.reference_quantizers.gptq import run_llmcompressor_gptq  # noqa: E402

pytestmark = pytest.mark.reference

BITS, GROUP, SYM, DAMP = 4, 32, False, 0.01
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                # a few large weight outliers
                idx = torch.randint(0, p.numel(), (max(1, p.numel() // 1000),), generator=g)
                p.view(-1)[idx] *= 10.0
            else:  # RMSNorm weights
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        # activation outlier channels (what AWQ is for): large embedding / norm channels
        model.model.embed_tokens.weight[:, :3] *= 8.0
        for layer in model.model.layers:
            layer.input_layernorm.weight[5:8] *= 6.0
            layer.post_attention_layernorm.weight[9:12] *= 6.0
    return model


def _calib(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(seed))


def _rtn_model(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Plain per-group asymmetric min-max RTN of the same linears (our own, independent code)."""
    out = copy.deepcopy(model)
    maxq = 2**BITS - 1
    with torch.no_grad():
        for name, m in out.named_modules():
            if name.endswith(LINEARS):
                w = m.weight.reshape(m.weight.shape[0], -1, GROUP)
                lo = w.amin(-1, keepdim=True).clamp(max=0)
                hi = w.amax(-1, keepdim=True).clamp(min=0)
                s = (hi - lo) / maxq
                z = torch.round(-lo / s)
                q = torch.clamp(torch.round(w / s) + z, 0, maxq)
                m.weight.copy_(((q - z) * s).reshape_as(m.weight))
    return out


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits.float()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _check_on_grid(res, original):
    names = {f"model.layers.{i}.{lin}" for i in range(2) for lin in LINEARS}
    assert set(res.weights) == names  # lm_head is not quantized
    ref_modules = dict(original.named_modules())
    for name, w in res.weights.items():
        assert w.dtype == torch.float32
        assert w.shape == ref_modules[name].weight.shape
        assert torch.isfinite(w).all()
        rows, cols = w.shape
        groups = w.reshape(rows, cols // GROUP, GROUP).sort(dim=-1).values
        distinct = 1 + (groups.diff(dim=-1) != 0).sum(-1)  # distinct values per (row, group)
        assert int(distinct.max()) <= 2**BITS, (name, int(distinct.max()))
        # the codes / scales / zero points we report reproduce the weight exactly
        s, z, q, g = res.scales[name], res.zero_points[name], res.codes[name], res.g_idx[name]
        assert s.shape == (rows, cols // GROUP) and z.shape == s.shape
        assert int(q.max()) <= 2**BITS - 1
        assert torch.equal(g, torch.arange(cols) // GROUP)
        assert torch.allclose((q.float() - z[:, g]) * s[:, g], w, rtol=0, atol=1e-6)
        assert (z == z.round()).all() and (z >= 0).all() and (z <= 2**BITS - 1).all()
    # dequantized weights are what the returned clean model holds
    mods = dict(res.model.named_modules())
    for name, w in res.weights.items():
        assert torch.equal(mods[name].weight.detach(), w)
        assert not hasattr(mods[name], "weight_scale")



@pytest.fixture(scope="module")
def setup():
    model = _tiny_llama()
    ids = _calib()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp = _logits(model, ids)
    rtn = _logits(_rtn_model(model), ids)
    return model, ids, state, fp, rtn


def _assert_untouched(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(hasattr(m, "weight_scale") for m in model.modules())


def test_gptq_smoke(setup):
    model, ids, state, fp, rtn = setup
    res = run_llmcompressor_gptq(
        model, ids, bits=BITS, group_size=GROUP, sym=SYM, act_order=False, dampening_frac=DAMP
    )
    _assert_untouched(model, state)
    _check_on_grid(res, model)
    assert res.rtn_fallback == []
    assert res.config["actorder"] is None and res.config["dampening_frac"] == DAMP
    # GPTQ only changes the quantized linears
    orig_sd = model.state_dict()
    for k, v in res.model.state_dict().items():
        if k.rsplit(".", 1)[0] not in res.weights:
            assert torch.equal(v, orig_sd[k]), k
    # fp_weights are the original weights
    mods = dict(model.named_modules())
    for name, w in res.fp_weights.items():
        assert torch.equal(w, mods[name].weight.detach().float())
    err_gptq, err_rtn = _rel(_logits(res.model, ids), fp), _rel(rtn, fp)
    print(f"GPTQ: {res.seconds:.2f}s  rel logit err gptq={err_gptq:.4f} rtn={err_rtn:.4f}")
    assert err_gptq < 0.35
    assert err_gptq < err_rtn


def test_gptq_act_order_smoke(setup):
    model, ids, state, fp, rtn = setup
    res = run_llmcompressor_gptq(
        model, ids, bits=BITS, group_size=GROUP, sym=True, act_order=True, dampening_frac=DAMP
    )
    _assert_untouched(model, state)
    _check_on_grid(res, model)
    assert res.config["actorder"] == "weight"
    # symmetric: zero point is 2**(bits-1) everywhere
    assert all(bool((z == 2 ** (BITS - 1)).all()) for z in res.zero_points.values())
    err = _rel(_logits(res.model, ids), fp)
    print(f"GPTQ act-order sym: {res.seconds:.2f}s  rel logit err={err:.4f}")
    assert err < 0.35


def test_awq_smoke(setup):
    model, ids, state, fp, rtn = setup
    res = run_llmcompressor_awq(model, ids, bits=BITS, group_size=GROUP, sym=SYM)
    _assert_untouched(model, state)
    _check_on_grid(res, model)
    # mappings for Llama (MHA, so v_proj -> o_proj applies)
    expected = {}
    for i in range(2):
        p = f"model.layers.{i}"
        expected[f"{p}.input_layernorm"] = [f"{p}.self_attn.{x}_proj" for x in "qkv"]
        expected[f"{p}.self_attn.v_proj"] = [f"{p}.self_attn.o_proj"]
        expected[f"{p}.post_attention_layernorm"] = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
        expected[f"{p}.mlp.up_proj"] = [f"{p}.mlp.down_proj"]
    assert res.awq_mappings == expected
    assert set(res.awq_scales) == set(expected)
    # the smoothing was folded into the norms: new norm = old norm / s
    orig_sd = model.state_dict()
    new_sd = res.model.state_dict()
    for i in range(2):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{i}.{norm}"
            torch.testing.assert_close(
                new_sd[key + ".weight"], orig_sd[key + ".weight"] / res.awq_scales[key],
                rtol=1e-5, atol=1e-7,
            )
    assert torch.equal(new_sd["model.norm.weight"], orig_sd["model.norm.weight"])
    assert torch.equal(new_sd["lm_head.weight"], orig_sd["lm_head.weight"])
    # smoothed fp weights + modified norms compute the fp function (what AWQ changed is all here)
    smoothed = copy.deepcopy(res.model)
    mods = dict(smoothed.named_modules())
    with torch.no_grad():
        for name, w in res.fp_weights.items():
            mods[name].weight.copy_(w)
    assert _rel(_logits(smoothed, ids), fp) < 1e-4
    err_awq, err_rtn = _rel(_logits(res.model, ids), fp), _rel(rtn, fp)
    print(f"AWQ: {res.seconds:.2f}s  rel logit err awq={err_awq:.4f} rtn={err_rtn:.4f}")
    assert err_awq < 0.35
    assert err_awq < err_rtn


def test_gptq_from_directory_matches_object(setup, tmp_path):
    model, ids, state, fp, rtn = setup
    model.save_pretrained(tmp_path)
    kw = dict(bits=BITS, group_size=GROUP, sym=SYM, act_order=False, dampening_frac=DAMP)
    from_dir = run_llmcompressor_gptq(str(tmp_path), ids, **kw)
    from_obj = run_llmcompressor_gptq(model, ids, **kw)
    assert set(from_dir.weights) == set(from_obj.weights)
    for name in from_obj.weights:  # deterministic on CPU
        assert torch.equal(from_dir.weights[name], from_obj.weights[name]), name
