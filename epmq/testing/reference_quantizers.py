"""Run llm-compressor's GPTQ and AWQ offline on CPU and read back dequantized weights.

Imported by the tests and the bench scripts (``pip install -e '.[reference]'``) for
cross-checking our own GPTQ / AWQ against the maintained reference implementation
``llmcompressor==0.14.0.1`` (with ``compressed-tensors==0.19``). Everything runs on CPU with
no network: the model is passed as an object (or loaded from a local directory), and the
calibration data is a fixed ``LongTensor [n_samples, seq_len]`` of token ids wrapped in a
``torch.utils.data.DataLoader`` (``oneshot`` returns a DataLoader unchanged, so no dataset,
tokenizer or hub access is involved).

API
---
``llmcompressor_gptq(model, calib_input_ids, *, bits, group_size, sym, act_order,
dampening_frac, block_size=128) -> dict[str, Tensor]``
    Dequantized float32 weight (original shape) of every quantized linear, keyed by module
    name (``"model.layers.0.self_attn.q_proj"``...). ``lm_head`` is not quantized.

``llmcompressor_awq(model, calib_input_ids, *, bits, group_size, sym) -> nn.Module``
    A plain copy of the model (no llm-compressor hooks / extra parameters) holding the AWQ
    result: the RMSNorm weights and linears that AWQ rescaled, with every quantized linear
    replaced by its dequantized weight. Compare its outputs with the fp model end to end.

``run_llmcompressor_gptq(...)`` / ``run_llmcompressor_awq(...)`` take the same arguments (plus
a few expert knobs) and return a :class:`ReferenceResult` with everything: dequantized
weights, the clean model, the raw scales / zero points / integer codes, the pre-quantization
weights (for AWQ: the smoothed fp weights), the AWQ smoothing scales per mapping, the
llm-compressor config that was used, modules that fell back to RTN, and the wall time.

Neither function modifies the caller's model (the work happens on a deep copy). Both raise
``ImportError`` when llmcompressor is missing (tests use ``pytest.importorskip``).

Exact configuration used
------------------------
Weight scheme (same for GPTQ and AWQ), one config group targeting ``Linear``, ``ignore=["lm_head"]``::

    QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size,
        dynamic=False, observer="memoryless_minmax"))      # strategy="channel" if group_size is None/-1

This equals the preset ``"W4A16"`` (sym) / ``"W4A16_ASYM"`` (asym) with ``group_size`` changed
(presets: compressed_tensors/quantization/quant_scheme.py:104-131 ``_int_wnam`` -> W4A16 is
int4, group 128, **symmetric=True**; :314-323 ``W4A16_ASYM`` is the asymmetric preset).

GPTQ recipe: ``GPTQModifier(config_groups=..., ignore=["lm_head"], block_size=block_size,
dampening_frac=dampening_frac, actorder="weight" if act_order else None)``. Note that
``GPTQModifier.actorder`` *defaults to static* (gptq/base.py:132, :154-157), so ``None`` must be
passed explicitly to disable it.

AWQ recipe (the non-deprecated form; ``llmcompressor.modifiers.awq.AWQModifier`` is a shim
that builds exactly this pair, modifiers/awq/__init__.py:58-83)::

    [AWQModifier(duo_scaling=True, n_grid=20),          # mappings=None -> inferred for Llama
     QuantizationModifier(config_groups=..., ignore=["lm_head"])]

``oneshot(model=<copy>, dataset=<DataLoader>, recipe=..., processor=<dummy>,
pipeline="independent", sequential_targets=None)``; the DataLoader yields
``{"input_ids": [batch_size, L], "attention_mask": ones}`` in the given order (no shuffle;
``num_calibration_samples`` / ``max_seq_length`` are ignored for a DataLoader). The
"independent" pipeline (oneshot's default) runs each modifier with its inferred pipeline:
"sequential" for GPTQModifier and AWQModifier (they require calibration data), "datafree" for
the weight-only QuantizationModifier (pipelines/registry.py:57-61). ``sequential_targets=None``
means one subgraph per ``LlamaDecoderLayer`` (HF ``_no_split_modules``). ``GPTQModifier`` has
no ``offload_hessians`` in 0.14 (pydantic rejects it as an extra input; only SparseGPT keeps it):
Hessians are fp32 per module on the execution device; ``batched_quantization="auto"`` batches
nothing on CPU (gptq/helpers.py:231-232).

Reading the result back: after ``oneshot`` every quantized linear carries ``weight_scale``
(``[out, in // group_size]``, weight dtype) and ``weight_zero_point`` (same shape, ``int8``; zeros
when symmetric), status FROZEN; there is **no** ``weight_g_idx`` in 0.14 (see act order below),
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

llm-compressor 0.14 GPTQ vs. the original IST-DASLab GPTQ
---------------------------------------------------------
(paths relative to site-packages; ``gptq/`` = ``llmcompressor/modifiers/gptq/``)

* **Observer: min-max.** The default weight observer is ``memoryless_minmax``
  (modifiers/quantization/calibration.py:65-67; ``"mse"`` is mapped to ``memoryless_mse``,
  :77-83, selectable via ``weight_observer=``). Min/max per (row, group)
  (observers/min_max.py:70-74), then compressed_tensors/quantization/utils/helpers.py:51-138
  ``calculate_qparams``: the range is widened to include 0 (:71-72); **sym**: ``scale = absmax /
  ((qmax - qmin) / 2)`` = absmax / 7.5 for 4 bit, zero point 0, codes in [-8, 7] (:80-88);
  **asym**: ``scale = (max - min) / (qmax - qmin)``, ``zp = round(clamp(qmin - min / scale))``
  (:97-99, 129-132) -- the same grid as GPTQ's ``Quantizer`` (unsigned zero = zp + 8). Differences:
  a zero range gets ``scale = eps`` (:114-127) instead of GPTQ's ``[-1, 1]``; and for sym
  groups that are all >= 0, GPTQ keeps ``xmin = 0`` (scale = max/15, zero 8, values above 7/15
  max are clipped) while compressed-tensors always uses absmax / 7.5.
* **Group params are static: computed once, up front, on the original (pre-GPTQ) weights.**
  ``on_sequential_epoch_end`` calls ``observe(modules, "weight")`` on the unmodified weights and
  only then ``compress_modules`` (gptq/base.py:231-238); ``quantize_weight`` receives the fixed
  ``scale``/``zero_point`` (gptq/base.py:313, 328-348) and the per-column loop only gathers them
  (gptq/helpers.py:343-423, gptq/gptq_quantize.py:155-183). Scales are **not** refit on the
  error-updated columns at each group start (IST-DASLab default ``static_groups=False`` does
  refit: ``find_params(W[:, i:i+groupsize])`` when ``i % groupsize == 0``). llm-compressor thus
  equals IST-DASLab GPTQ with ``static_groups=True``: on a random 64x256 layer with a fixed H
  (group 32, 4 bit, damp 0.01, block 128), ``gptq_quantize.quantize_weight`` and a transcription
  of IST-DASLab ``fasterquant(static_groups=True)`` agreed *bit-exactly* for {asym, sym} x
  {no act order, act order}; IST-DASLab's dynamic groups gave a slightly different result.
* **Act order.** ``ActivationOrdering`` is {``weight`` (alias ``static``), ``group`` (alias
  ``dynamic``)}; ``group``/``dynamic``/``True`` are *removed* and raise
  (compressed_tensors/quantization/quant_args.py:137-161, :271-288; gptq/helpers.py:249-253).
  ``weight``: columns are processed in ``argsort(diag(H), descending)`` order
  (gptq/helpers.py:237-280) but groups stay contiguous in the *original* column order: ``g_idx =
  arange(cols) // group_size`` gathered by the permutation (gptq/gptq_quantize.py:75-89), and
  the result is un-permuted (:125-130). No ``g_idx`` is stored (the format is the same as without
  act order). This is IST-DASLab ``act_order=True, static_groups=True``; IST-DASLab's
  ``act_order`` without static groups (groups over the permuted order, needs ``g_idx``) has no
  counterpart in 0.14.
* **Hessian.** ``H = 2 * sum_x x x^T / n_seq`` in fp32, with ``n_seq`` counting *sequences*
  (the batch dim), not tokens (gptq/helpers.py:40-76, :101) -- identical to IST-DASLab's running
  ``2 / nsamples`` accumulation. The scale of H cancels anyway.
* **Damping.** ``H += dampening_frac * mean(diag(H)) * I`` (gptq/helpers.py:307-308, :324-325),
  default ``dampening_frac=0.01`` (gptq/base.py:131) -- same as IST-DASLab ``percdamp``. Dead
  columns (``diag(H) == 0``) get ``H_ii = 1`` and ``W[:, i] = 0`` (:296-300). Then
  ``Hinv = chol(chol_inverse(chol(H)), upper)`` (:309-314). If the Cholesky fails the module
  silently falls back to RTN with identity ``Hinv`` (:315-321; warning at gptq/base.py:391-412;
  reported in ``ReferenceResult.rtn_fallback``).
* **Block size.** Lazy-batch blocks of ``block_size=128`` columns (gptq/base.py:130;
  gptq/gptq_quantize.py:95-123), per-column update inside a block (:167-183) -- same as IST-DASLab.
  Rounding is ``torch.round`` (half to even) in both.
* **Sequential pipeline.** One subgraph per decoder layer (pipelines/sequential/pipeline.py:136-178):
  (1) run all calibration batches through the layer with quantization disabled, accumulating the
  Hessians of *all* its linears from that single pass (so o_proj / MLP inputs come from the
  unquantized q/k/v of the same layer -- IST-DASLab's default, i.e. without ``--true-sequential``);
  (2) quantize every linear of the layer; (3) re-run the layer with the quantized weights and
  feed *those* outputs to the next layer (``propagate_error=True``, the default). So layer ``l``
  is calibrated on inputs produced by the already-quantized layers ``< l``, as in IST-DASLab's
  ``llama_sequential``. Layer order inside a layer is irrelevant (Hessians are fixed by step 1).

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

Caveats
-------
* ``IntermediatesCache.pin_memory`` (pipelines/cache.py:124-165) calls ``Tensor.pin_memory()``,
  which raises ``RuntimeError: Cannot access accelerator device when none is available`` on a
  CPU-only torch build; ``AWQModifier._apply_smoothing`` pins the cached parent-module kwargs
  before each grid search (awq/base.py:503-507). Pinning is only a host->device transfer
  optimisation, so while our AWQ call runs (and only then) we patch it to a no-op with
  ``unittest.mock.patch.object``. GPTQ does not pin.
* ``oneshot`` needs ``AutoConfig.from_pretrained(model.config.name_or_path)`` to work
  (entrypoints/oneshot.py:275-287 ``validate_model``), so the working copy's ``_name_or_path`` is pointed
  at a temporary directory holding its ``config.json``; it also needs *some* processor object
  when a dataset is given (else it tries to load a tokenizer), so a dummy object is passed -- a
  DataLoader is never tokenized.
* ``Oneshot.__init__`` sets ``TOKENIZERS_PARALLELISM=false`` in ``os.environ`` if unset (global).
  llm-compressor logs (loguru) "No accelerator available! Compressing model on CPU instead" and
  prints tqdm bars; these are harmless.
* Threads: on the shared 2-core CPU, torch's default 2 OpenMP threads made these many tiny
  ops 15-20x slower whenever other processes were busy (AWQ 44 s vs 2.5 s, GPTQ 7-14 s vs 0.9 s on
  the smoke model), so both calls default to ``num_threads=1`` (``torch.set_num_threads``,
  restored on exit); pass ``num_threads=None`` to keep the global setting for larger models.
* Group size must divide every quantized layer's in_features (llm-compressor raises otherwise).
* Calibration runs in the model's dtype (GPTQ itself works in fp32); pass an fp32 model to
  compare with our fp32 implementation.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch

from epmq.config import method_params
from epmq.engine import quantize_model
from epmq.catalog import get_method
from epmq.testing.models import input_gram

__all__ = [
    "ReferenceResult",
    "llmcompressor_available",
    "llmcompressor_gptq",
    "llmcompressor_awq",
    "run_llmcompressor_gptq",
    "run_llmcompressor_awq",
    "weight_quant_args",
    "BITS",
    "GROUP",
    "DAMP",
    "ours",
    "relative_output_errors",
]


def llmcompressor_available() -> bool:
    try:
        _require_llmcompressor()
    except ImportError:
        return False
    return True


def _require_llmcompressor():
    try:
        import compressed_tensors  # noqa: F401
        import llmcompressor  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        raise ImportError(
            "llmcompressor (and compressed-tensors) are required for the reference quantizers; "
            "install the 'reference' extra: pip install 'epmq[reference]' (llmcompressor==0.14.0.1)"
        ) from e


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


# --------------------------------------------------------------------------------------------
# public API


def llmcompressor_gptq(
    model,
    calib_input_ids: torch.Tensor,
    *,
    bits: int,
    group_size: int | None,
    sym: bool,
    act_order: bool | str,
    dampening_frac: float,
    block_size: int = 128,
) -> dict[str, torch.Tensor]:
    """llm-compressor GPTQ; returns ``{linear name: dequantized float32 weight}``."""
    return run_llmcompressor_gptq(
        model,
        calib_input_ids,
        bits=bits,
        group_size=group_size,
        sym=sym,
        act_order=act_order,
        dampening_frac=dampening_frac,
        block_size=block_size,
    ).weights


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


def weight_quant_args(bits: int, group_size: int | None, sym: bool, observer: str = "memoryless_minmax"):
    """The compressed-tensors ``QuantizationArgs`` used for the weights."""
    _require_llmcompressor()
    from compressed_tensors.quantization import QuantizationArgs

    channel = group_size is None or group_size <= 0
    return QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=sym,
        strategy="channel" if channel else "group",
        group_size=None if channel else int(group_size),
        dynamic=False,
        observer=observer,
    )


def run_llmcompressor_gptq(
    model,
    calib_input_ids: torch.Tensor,
    *,
    bits: int,
    group_size: int | None,
    sym: bool,
    act_order: bool | str,
    dampening_frac: float,
    block_size: int = 128,
    observer: str = "memoryless_minmax",
    ignore: tuple[str, ...] = ("lm_head",),
    batch_size: int = 1,
    sequential_targets: list[str] | None = None,
    pipeline: str = "independent",
    dtype: torch.dtype | None = None,
    num_threads: int | None = 1,
) -> ReferenceResult:
    """llm-compressor ``GPTQModifier`` via ``oneshot`` on a deep copy of ``model``.

    model: a ``PreTrainedModel`` (e.g. ``LlamaForCausalLM``) or a local directory with one.
    calib_input_ids: LongTensor ``[n_samples, seq_len]``; every token is used (mask of ones).
    act_order: ``False``/``None`` -> no act order; ``True`` (or ``"weight"``/``"static"``) ->
        llm-compressor's "weight" act order (permuted processing, original-order groups).
    observer: ``"memoryless_minmax"`` (default, GPTQ's min-max grid) or ``"memoryless_mse"``.
    sequential_targets: module class names forming the sequential subgraphs (default: decoder
        layer); e.g. ``["Linear"]`` is *not* IST-DASLab's true-sequential.
    num_threads: torch intra-op threads during the call (restored afterwards); ``None`` keeps
        the global setting. Default 1: see "Caveats" in the module docstring.
    """
    _require_llmcompressor()
    from llmcompressor.modifiers.gptq import GPTQModifier

    actorder = _actorder(act_order)
    config = dict(
        method="gptq",
        llmcompressor_version=_version(),
        bits=bits,
        group_size=group_size,
        sym=sym,
        actorder=actorder,
        dampening_frac=dampening_frac,
        block_size=block_size,
        observer=observer,
        ignore=list(ignore),
        batch_size=batch_size,
        pipeline=pipeline,
        sequential_targets=sequential_targets,
        n_samples=int(calib_input_ids.shape[0]),
        seq_len=int(calib_input_ids.shape[1]),
    )
    recipe = [
        GPTQModifier(
            config_groups=_config_groups(bits, group_size, sym, observer),
            ignore=list(ignore),
            block_size=block_size,
            dampening_frac=dampening_frac,
            actorder=actorder,
        )
    ]

    fallback: list[str] = []
    orig_log = GPTQModifier._log_rtn_fallback_summary

    def _log_and_record(self):
        fallback.extend(self._rtn_fallback_module_names)
        return orig_log(self)

    with mock.patch.object(GPTQModifier, "_log_rtn_fallback_summary", _log_and_record):
        original, out, seconds = _oneshot(
            model, calib_input_ids, recipe, batch_size, sequential_targets, pipeline, dtype,
            num_threads,
        )
    res = _collect(original, out, expect_on_grid=True)
    res.rtn_fallback = sorted(set(fallback))
    res.config = config
    res.seconds = seconds
    return res


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
    _require_llmcompressor()
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    config = dict(
        method="awq",
        llmcompressor_version=_version(),
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
            config_groups=_config_groups(bits, group_size, sym, observer), ignore=list(ignore)
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
        original, out, seconds = _oneshot(
            model, calib_input_ids, recipe, batch_size, sequential_targets, pipeline, dtype,
            num_threads,
        )
    res = _collect(original, out, expect_on_grid=False)
    res.awq_scales = awq_scales
    res.awq_mappings = awq_mappings
    res.config = config
    res.seconds = seconds
    return res


# --------------------------------------------------------------------------------------------
# internals


def _version() -> str:
    import llmcompressor

    return getattr(llmcompressor, "__version__", "unknown")


def _actorder(act_order):
    if act_order is None or act_order is False:
        return None
    if act_order is True:
        return "weight"
    if isinstance(act_order, str) and act_order.lower() in ("weight", "static"):
        return act_order.lower()
    raise ValueError(
        f"act_order={act_order!r}: llm-compressor 0.14 supports only None/False or 'weight' "
        "(alias 'static', or True); 'group'/'dynamic' act order was removed"
    )


def _config_groups(bits, group_size, sym, observer):
    from compressed_tensors.quantization import QuantizationScheme

    return {
        "group_0": QuantizationScheme(
            targets=["Linear"], weights=weight_quant_args(bits, group_size, sym, observer)
        )
    }


def _load_model(model, dtype):
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            os.fspath(model), dtype=dtype or torch.float32, local_files_only=True
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a local directory, got {type(model)}")
    return model


class _CalibSet(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        x = self.ids[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x)}


@contextlib.contextmanager
def _torch_threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _oneshot(model, calib_input_ids, recipe, batch_size, sequential_targets, pipeline, dtype,
             num_threads=1):
    """Run ``oneshot`` on a deep copy; returns (caller's model, quantized copy, seconds)."""
    with _torch_threads(num_threads):
        return _oneshot_impl(
            model, calib_input_ids, recipe, batch_size, sequential_targets, pipeline, dtype
        )


def _oneshot_impl(model, calib_input_ids, recipe, batch_size, sequential_targets, pipeline, dtype):
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    original = _load_model(model, dtype)
    ids = torch.as_tensor(calib_input_ids)
    if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("calib_input_ids must be an integer tensor [n_samples, seq_len]")
    ids = ids.to(torch.long).cpu().contiguous()
    loader = torch.utils.data.DataLoader(_CalibSet(ids), batch_size=batch_size, shuffle=False)

    work = copy.deepcopy(original)
    if dtype is not None:
        work = work.to(dtype)
    work.eval()
    old_name = getattr(work.config, "_name_or_path", "")
    with tempfile.TemporaryDirectory(prefix="llmc_ref_") as tmp:
        work.config.save_pretrained(tmp)
        work.config._name_or_path = tmp
        t0 = time.perf_counter()
        try:
            out = oneshot(
                model=work,
                recipe=recipe,
                dataset=loader,
                processor=object(),  # anything but str/None: skips tokenizer loading
                pipeline=pipeline,
                sequential_targets=sequential_targets,
                batch_size=batch_size,
                output_dir=None,
            )
        finally:
            seconds = time.perf_counter() - t0
            work.config._name_or_path = old_name
            active_session().reset()
    out.config._name_or_path = old_name
    return original, out, seconds


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
def _collect(original, out, *, expect_on_grid: bool) -> ReferenceResult:
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


# ---------------------------------------------------------------- the cross-check setting --
#: bits, group size and damping of tests/test_reference_crosscheck.py and bench/reference_errors.py
BITS, GROUP, DAMP = 4, 32, 0.01


def relative_output_errors(model, tasks, weights, input_scales=None, output_scales=None):
    """``||(W_eff - W) X|| / ||W X||`` per layer, ``W_eff = diag(s_out) Q diag(1/s_in)``."""
    errors = {}
    for name, weight in weights.items():
        gram = input_gram(model, name, tasks)
        reference = model.get_submodule(name).weight.detach().double()
        s_in = (input_scales or {}).get(name, torch.ones(reference.shape[1])).double()
        s_out = (output_scales or {}).get(name, torch.ones(reference.shape[0])).double()
        diff = s_out[:, None] * weight.double() / s_in[None, :] - reference
        errors[name] = float(((diff @ gram) * diff).sum() / ((reference @ gram) * reference).sum()) ** 0.5
    return errors


def ours(model, tasks, **params):
    copy_ = copy.deepcopy(model)
    method = get_method("gptq", method_params("quantize", bits=BITS, group_size=GROUP, percdamp=DAMP, **params))
    return {name: layer.weight for name, layer in quantize_model(copy_, method, tasks).replacements.items()}
