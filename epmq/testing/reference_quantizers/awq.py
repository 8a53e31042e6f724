"""llm-compressor's AWQ (``AWQModifier`` + ``QuantizationModifier``) on a copy of a model, read back.

llm-compressor 0.14 AWQ (modifiers/transform/awq/base.py) vs. AutoAWQ / llm-awq
-------------------------------------------------------------------------------
* **Mappings for LlamaForCausalLM** (``default_mappings``, awq/mappings.py:39-53, registry
  :394): ``input_layernorm -> [q_proj, k_proj, v_proj]``; ``v_proj -> [o_proj]``;
  ``post_attention_layernorm -> [gate_proj, up_proj]``; ``up_proj -> [down_proj]``. The
  ``v_proj -> o_proj`` mapping is skipped when shapes differ, i.e. with GQA
  (``num_key_value_heads < num_attention_heads``; base.py:984-1013). Smoothing multiplies the
  balance layers' input columns by ``s`` and divides the smooth layer by ``s`` (RMSNorm weight,
  or the *output rows* of v_proj / up_proj) (base.py:548-586). Loss module ("parent") is the
  lowest common ancestor of the balance layers: ``self_attn`` for q/k/v (o_proj kept fp),
  ``mlp`` for gate/up (down_proj fp), the layer itself for o_proj and down_proj (base.py:354-356,
  1016-1038) -- as AutoAWQ's ``module2inspect``.
* **Scale search.** ``x_mean`` = per-channel mean of ``|x|`` over all calibration tokens
  (base.py:419-448, 640); ``w_mean`` = mean over output rows of ``|W|`` normalised by its
  per-group absmax (``+1e-6``), over all balance layers concatenated (base.py:907-973);
  ``s = (x_mean**r / (w_mean**(1-r) + 1e-4)).clamp(min=1e-4)``, ``s /= sqrt(s.max() * s.min())``
  (base.py:672-681); loss = MSE of the parent output with ``Q(W*s)/s`` vs. the fp output
  (base.py:711-715, 764-800); quantizer during the search: ``memoryless_minmax`` on the scheme's
  args (base.py:645-697). **duo scaling default ``True``**, **``n_grid=20``** (base.py:150-151):
  grid = ``[(r=0, no duo)]`` (identity) + ``r = i / 18`` for ``i = 0..18`` with duo (base.py:802-836),
  i.e. 20 points including r = 1.0; AutoAWQ uses ``r = i / 20``, ``i = 0..19`` (no identity point,
  no r = 1). ``duo_scaling="both"`` / ``False`` are also available.
* **No clip search.** There is no ``auto_clip`` / ``apply_clip`` step (AutoAWQ and llm-awq search
  a per-group max-value shrink ratio for all linears except q/k); after smoothing, the
  QuantizationModifier does plain min-max RTN (quantization/base.py:83-94). Also unlike AutoAWQ
  (which does not force 0 into the asym range), compressed-tensors widens [min, max] to include 0.
* **Propagation.** AWQ also uses the sequential pipeline, but the propagation pass runs with
  quantization disabled (pipelines/sequential/pipeline.py:115-117, 162-178), so layer ``l`` sees
  the outputs of the *smoothed fp* layers ``< l`` (= fp outputs up to rounding), like AutoAWQ.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from epmq.testing.reference_quantizers.oneshot import (
    config_groups,
    llmcompressor_version,
    require_llmcompressor,
    run_oneshot,
)
from epmq.testing.reference_quantizers.readback import ReferenceResult, read_back


def llmcompressor_awq(
    model,
    calib_input_ids: torch.Tensor,
    *,
    bits: int,
    group_size: int | None,
    sym: bool,
) -> torch.nn.Module:
    """llm-compressor AWQ (+ min-max RTN); returns the smoothed model with dequantized linears."""
    return run_llmcompressor_awq(
        model, calib_input_ids, bits=bits, group_size=group_size, sym=sym
    ).model


def run_llmcompressor_awq(
    model,
    calib_input_ids: torch.Tensor,
    *,
    bits: int,
    group_size: int | None,
    sym: bool,
    duo_scaling: bool | str = True,
    n_grid: int = 20,
    observer: str = "memoryless_minmax",
    ignore: tuple[str, ...] = ("lm_head",),
    batch_size: int = 1,
    sequential_targets: list[str] | None = None,
    pipeline: str = "independent",
    dtype: torch.dtype | None = None,
    num_threads: int | None = 1,
) -> ReferenceResult:
    """llm-compressor ``AWQModifier`` + ``QuantizationModifier`` via ``oneshot`` on a copy.

    Mappings are llm-compressor's defaults for the architecture (for Llama: norm->qkv, v->o,
    norm->gate/up, up->down). ``result.model`` is the smoothed model with dequantized linears;
    ``result.awq_scales`` the chosen smoothing scales per smooth layer.
    """
    require_llmcompressor()
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    config = dict(
        method="awq",
        llmcompressor_version=llmcompressor_version(),
        bits=bits,
        group_size=group_size,
        sym=sym,
        duo_scaling=duo_scaling,
        n_grid=n_grid,
        observer=observer,
        ignore=list(ignore),
        batch_size=batch_size,
        pipeline=pipeline,
        sequential_targets=sequential_targets,
        n_samples=int(calib_input_ids.shape[0]),
        seq_len=int(calib_input_ids.shape[1]),
    )
    recipe = [
        AWQModifier(duo_scaling=duo_scaling, n_grid=n_grid),
        QuantizationModifier(
            config_groups=config_groups(bits, group_size, sym, observer), ignore=list(ignore)
        ),
    ]

    awq_scales: dict[str, torch.Tensor] = {}
    awq_mappings: dict[str, list[str]] = {}
    orig_best = AWQModifier._compute_best_scale

    def _best_and_record(self, mapping, *args, **kwargs):
        s = orig_best(self, mapping, *args, **kwargs)
        awq_scales[mapping.smooth_name] = s.detach().float().cpu().clone()
        awq_mappings[mapping.smooth_name] = list(mapping.balance_names)
        return s

    with contextlib.ExitStack() as stack:
        # CPU-only torch cannot pin memory (no accelerator); pinning only speeds up H2D copies.
        stack.enter_context(
            mock.patch.object(IntermediatesCache, "pin_memory", lambda self, *a, **k: None)
        )
        stack.enter_context(mock.patch.object(AWQModifier, "_compute_best_scale", _best_and_record))
        original, out, seconds = run_oneshot(
            model, calib_input_ids, recipe, batch_size, sequential_targets, pipeline, dtype,
            num_threads,
        )
    res = read_back(original, out, expect_on_grid=False)
    res.awq_scales = awq_scales
    res.awq_mappings = awq_mappings
    res.config = config
    res.seconds = seconds
    return res
