"""llm-compressor's GPTQ and AWQ run offline on CPU, with dequantized weights read back.

Imported by the tests and the bench scripts (``pip install -e '.[reference]'``) for
cross-checking our own GPTQ / AWQ against the maintained reference implementation
``llmcompressor==0.14.0.1`` (with ``compressed-tensors==0.19``). Everything runs on CPU with
no network: the model is passed as an object (or loaded from a local directory), and the
calibration data is a fixed ``LongTensor [n_samples, seq_len]`` of token ids wrapped in a
``torch.utils.data.DataLoader`` (``oneshot`` returns a DataLoader unchanged, so no dataset,
tokenizer or hub access is involved).

Modules (``epmq.testing.reference_quantizers.*``)
-------------------------------------------------
* ``gptq``: ``llmcompressor_gptq`` / ``run_llmcompressor_gptq``, and how llm-compressor's GPTQ
  differs from IST-DASLab's;
* ``awq``: ``llmcompressor_awq`` / ``run_llmcompressor_awq``, and how its AWQ differs from
  AutoAWQ / llm-awq;
* ``oneshot``: the exact llm-compressor configuration, the offline ``oneshot`` call both run, and
  its caveats; ``llmcompressor_available``;
* ``readback``: ``ReferenceResult`` and how the quantized weights are read back;
* ``crosscheck``: the setting the cross-check test and bench share, and our side of it.

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
a few expert knobs) and return a :class:`~.readback.ReferenceResult` with everything: dequantized
weights, the clean model, the raw scales / zero points / integer codes, the pre-quantization
weights (for AWQ: the smoothed fp weights), the AWQ smoothing scales per mapping, the
llm-compressor config that was used, modules that fell back to RTN, and the wall time.

Neither function modifies the caller's model (the work happens on a deep copy). Both raise
``ImportError`` when llmcompressor is missing (tests use ``pytest.importorskip``).
"""
