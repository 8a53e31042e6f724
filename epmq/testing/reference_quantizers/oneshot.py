"""The exact llm-compressor configuration and the offline ``oneshot`` call GPTQ and AWQ both run.

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

import torch


def llmcompressor_available() -> bool:
    try:
        require_llmcompressor()
    except ImportError:
        return False
    return True


def require_llmcompressor():
    try:
        import compressed_tensors  # noqa: F401
        import llmcompressor  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        raise ImportError(
            "llmcompressor (and compressed-tensors) are required for the reference quantizers; "
            "install the 'reference' extra: pip install 'epmq[reference]' (llmcompressor==0.14.0.1)"
        ) from e


def llmcompressor_version() -> str:
    import llmcompressor

    return getattr(llmcompressor, "__version__", "unknown")


def weight_quant_args(bits: int, group_size: int | None, sym: bool, observer: str = "memoryless_minmax"):
    """The compressed-tensors ``QuantizationArgs`` used for the weights."""
    require_llmcompressor()
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


def config_groups(bits, group_size, sym, observer):
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


def run_oneshot(model, calib_input_ids, recipe, batch_size, sequential_targets, pipeline, dtype,
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
