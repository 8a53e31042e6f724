"""llm-compressor's GPTQ (``GPTQModifier``) on a copy of a model, read back.

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
"""

from __future__ import annotations

from unittest import mock

import torch

from epmq.testing.reference_quantizers.oneshot import (
    config_groups,
    llmcompressor_version,
    require_llmcompressor,
    run_oneshot,
)
from epmq.testing.reference_quantizers.readback import ReferenceResult, read_back


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
        the global setting. Default 1: see "Caveats" in :mod:`.oneshot`.
    """
    require_llmcompressor()
    from llmcompressor.modifiers.gptq import GPTQModifier

    actorder = _actorder(act_order)
    config = dict(
        method="gptq",
        llmcompressor_version=llmcompressor_version(),
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
            config_groups=config_groups(bits, group_size, sym, observer),
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
        original, out, seconds = run_oneshot(
            model, calib_input_ids, recipe, batch_size, sequential_targets, pipeline, dtype,
            num_threads,
        )
    res = read_back(original, out, expect_on_grid=True)
    res.rtn_fallback = sorted(set(fallback))
    res.config = config
    res.seconds = seconds
    return res


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
