"""What one llm-compressor run left in its model, read back: :class:`ReferenceResult`.

Reading the result back: after ``oneshot`` every quantized linear carries ``weight_scale``
(``[out, in // group_size]``, weight dtype) and ``weight_zero_point`` (same shape, ``int8``; zeros
when symmetric), status FROZEN; there is **no** ``weight_g_idx`` in 0.14 (see "Act order" in :mod:`.gptq`),
and no packing (no ``save_compressed``). GPTQ writes the fake-quantized weight into ``weight``
itself (gptq/helpers.py:121-147). AWQ + QuantizationModifier leave the smoothed *fp* weight in
``weight``; quantization is only applied on the fly in the wrapped forward
(compressed_tensors/quantization/lifecycle/forward.py:203-246 ``set_forward_quantized``). So we
dequantize explicitly, in compressed-tensors' signed convention: with
``qmin, qmax = -2**(b-1), 2**(b-1)-1`` and per-column ``s, z`` (``g = col // group_size``, or
``weight_g_idx[col]`` if a future version stores one)::

    q = clamp(round(w / s + z), qmin, qmax);   w_deq = (q - z) * s

(compressed_tensors/quantization/lifecycle/forward_helpers.py:168-199 ``_quantize_dequantize``). For
GPTQ we check that this reproduces the stored weight. ``ReferenceResult`` reports the codes and
zero points in the usual *unsigned* convention (``codes = q - qmin`` in ``[0, 2**b-1]``,
``zero_points = z - qmin``; for sym, zero point ``2**(b-1)`` as in IST-DASLab GPTQ).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ReferenceResult:
    """Everything read back from one llm-compressor run.

    All per-layer dicts are keyed by the linear's module name (``model.layers.0.mlp.up_proj``).

    weights:      dequantized weight, float32, original shape ``[out, in]``.
    model:        plain copy of the input model (no llm-compressor hooks or extra parameters)
                  holding ``weights`` and, for AWQ, the rescaled RMSNorm / smooth-layer weights.
    fp_weights:   float32 weight each linear had right before quantization: the original
                  weight for GPTQ, the AWQ-smoothed fp weight for AWQ (so loading ``fp_weights``
                  into ``model`` gives a model computing the fp function up to rounding).
    scales:       ``[out, n_groups]`` float32 (n_groups = 1 for channel-wise).
    zero_points:  ``[out, n_groups]`` float32 holding integers, unsigned convention
                  (``2**(bits-1)`` for symmetric).
    codes:        ``[out, in]`` uint8 integer codes in ``[0, 2**bits - 1]``;
                  ``weights == (codes - zero_points[:, g]) * scales[:, g]``, ``g = g_idx``.
    g_idx:        ``[in]`` long, group of each input column (``arange(in) // group_size``).
    awq_scales:   AWQ only: smooth-layer name -> per-channel smoothing scale ``s`` (balance
                  layers' columns were multiplied by ``s``, the smooth layer divided by it).
    awq_mappings: AWQ only: smooth-layer name -> balance-layer names that were smoothed.
    rtn_fallback: GPTQ only: modules whose Hessian was not positive definite after damping
                  and that llm-compressor quantized by plain RTN instead.
    config:       the knobs passed to llm-compressor (for logs / reports).
    seconds:      wall time of the ``oneshot`` call.
    """

    weights: dict[str, torch.Tensor]
    model: torch.nn.Module
    fp_weights: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    zero_points: dict[str, torch.Tensor]
    codes: dict[str, torch.Tensor]
    g_idx: dict[str, torch.Tensor]
    awq_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    awq_mappings: dict[str, list[str]] = field(default_factory=dict)
    rtn_fallback: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

def _quantized_linears(model):
    for name, m in model.named_modules():
        if (
            hasattr(m, "weight_scale")
            and getattr(getattr(m, "quantization_scheme", None), "weights", None) is not None
        ):
            yield name, m


@torch.no_grad()
def _dequantize_module(m):
    """(dequantized fp32 weight, unsigned codes, scale, unsigned zero, g_idx, fp32 input weight)."""
    args = m.quantization_scheme.weights
    if args.type != "int":
        raise NotImplementedError(f"only int weight quantization is read back, got {args.type}")
    w = m.weight.detach().float().cpu()
    rows, cols = w.shape
    scale = m.weight_scale.detach().float().cpu()
    zp = getattr(m, "weight_zero_point", None)
    zp = torch.zeros_like(scale) if zp is None or args.symmetric else zp.detach().float().cpu()
    scale = scale.reshape(rows, -1)
    zp = zp.reshape(rows, -1)
    g_idx = getattr(m, "weight_g_idx", None)
    if g_idx is not None and bool((g_idx >= 0).all()):
        g_idx = g_idx.detach().long().cpu()
    elif args.strategy in ("group", "tensor_group"):
        g_idx = torch.arange(cols) // args.group_size
    elif args.strategy == "channel":
        g_idx = torch.zeros(cols, dtype=torch.long)
    elif args.strategy == "tensor":
        scale, zp = scale.reshape(1, 1).expand(rows, 1), zp.reshape(1, 1).expand(rows, 1)
        g_idx = torch.zeros(cols, dtype=torch.long)
    else:
        raise NotImplementedError(f"strategy {args.strategy} is not read back")
    qmin, qmax = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1
    s_col, z_col = scale[:, g_idx], zp[:, g_idx]
    q = torch.clamp(torch.round(w / s_col + z_col), qmin, qmax)
    deq = (q - z_col) * s_col
    codes = (q - qmin).to(torch.uint8)
    return deq, codes, scale.contiguous(), (zp - qmin).contiguous(), g_idx, w


@torch.no_grad()
def read_back(original, out, *, expect_on_grid: bool) -> ReferenceResult:
    weights, fp_weights, scales, zeros, codes, gidx = {}, {}, {}, {}, {}, {}
    orig_modules = dict(original.named_modules())
    for name, m in _quantized_linears(out):
        deq, q, s, z, g, w = _dequantize_module(m)
        if expect_on_grid:
            # GPTQ stores the fake-quantized weight itself; re-quantizing must reproduce it.
            eps = torch.finfo(m.weight.dtype).eps if m.weight.is_floating_point() else 0.0
            tol = 1e-4 * s[:, g] + 2 * eps * w.abs() + 1e-7
            bad = (deq - w).abs() > tol
            if bool(bad.any()):
                raise RuntimeError(
                    f"{name}: stored GPTQ weight is off the llm-compressor grid "
                    f"({int(bad.sum())} entries); the read-back convention has changed"
                )
        weights[name], codes[name], scales[name], zeros[name], gidx[name] = deq, q, s, z, g
        # GPTQ overwrote ``weight`` with its quantized value: the pre-quantization weight is the
        # original one. AWQ leaves the smoothed fp weight in ``weight``.
        fp_weights[name] = orig_modules[name].weight.detach().float().cpu().clone() if expect_on_grid else w
    if not weights:
        raise RuntimeError("llm-compressor quantized no linear layer")

    # A clean model: the caller's module tree (no hooks, no qparams) with the new tensors.
    clean = copy.deepcopy(original)
    clean_sd = clean.state_dict()
    out_sd = out.state_dict()
    new_sd = {}
    for key, ref in clean_sd.items():
        if key not in out_sd:
            raise RuntimeError(f"parameter {key} missing from llm-compressor's output model")
        mod = key.rsplit(".", 1)[0]
        val = weights[mod] if key.endswith(".weight") and mod in weights else out_sd[key]
        new_sd[key] = val.detach().to(device=ref.device, dtype=ref.dtype)
    clean.load_state_dict(new_sd, strict=True)
    clean.eval()
    return ReferenceResult(
        weights=weights,
        model=clean,
        fp_weights=fp_weights,
        scales=scales,
        zero_points=zeros,
        codes=codes,
        g_idx=gidx,
    )
