"""Quantized checkpoints: packed codes + scales + zeros in safetensors, and a loader that dequantizes.

Layout of a quantized checkpoint directory::

    config.json          the HF config of the model (architectures names the class to rebuild)
    model.safetensors    every tensor of the model, except that each quantized linear's ``weight``
                         is replaced by
                           <linear>.qweight  int32 (d_out, ceil(d_in*bits/32))  codes, bit-packed per row
                           <linear>.scales   float32 (d_out, n_groups)
                           <linear>.qzeros   uint8 (d_out, n_groups)            integer zero points
                           <linear>.g_idx    int32 (d_in,)                      group of each column
    quantization.json    method, grid, calibration provenance, per-layer log, library versions

The dequantized weight is ``scales[r, g_idx[c]] * (code[r, c] - qzeros[r, g_idx[c]])`` (float32),
cast to the model's dtype: the same formula the solver used, so a save/load round trip is exact.
Linears replaced by an unrounded weight (the ``epmq_fp`` analysis row) keep a plain ``weight``.
``python -m epmq export`` writes the compressed-tensors format that transformers and vLLM load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from epmq.activations import wrap_scaled_activations
from epmq.checkpoint_validation import validate_quantization_info, validate_quantized_state
from epmq.grid import QuantizedWeight, pack_codes, unpack_codes
from epmq.io import (
    SAFETENSORS_SINGLE,
    LazyCheckpoint,
    atomic_output_dir,
    atomic_write_json,
    provenance,
    read_json,
    require_local_dir,
)

QUANTIZATION_FILE = "quantization.json"
FORMAT = "epmq-packed-v1"
_SUFFIXES = ("qweight", "scales", "qzeros", "g_idx")


def quantized_tensors(name: str, quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The four stored tensors of one quantized linear."""
    return {
        f"{name}.qweight": pack_codes(quantized.codes, quantized.bits),
        f"{name}.scales": quantized.scales.detach().float().cpu().contiguous(),
        f"{name}.qzeros": quantized.zeros.detach().to(torch.uint8).cpu().contiguous(),
        f"{name}.g_idx": quantized.g_idx.detach().to(torch.int32).cpu().contiguous(),
    }


def save_quantized(
    out_dir: str | Path,
    model: nn.Module,
    replacements: dict[str, QuantizedWeight | torch.Tensor],
    metadata: dict,
) -> Path:
    """Write ``model`` with its quantized linears packed; ``metadata`` goes into quantization.json."""
    state = {}
    seen: dict[int, str] = {}
    for key, tensor in model.state_dict().items():
        # Tied parameters (e.g. embeddings and LM head) are stored once; the loader re-ties them.
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue
        seen[tensor.data_ptr()] = key
        state[key] = tensor.detach().cpu().contiguous()
    layers = {}
    for name, replacement in replacements.items():
        if isinstance(replacement, QuantizedWeight):
            del state[f"{name}.weight"]
            state.update(quantized_tensors(name, replacement))
            layers[name] = {"bits": replacement.bits, "group_size": replacement.group_size, "sym": replacement.sym}
        else:
            layers[name] = {"bits": None}
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        save_file(state, str(tmp / SAFETENSORS_SINGLE), metadata={"format": "pt", "epmq_format": FORMAT})
        atomic_write_json(
            tmp / QUANTIZATION_FILE,
            {
                "format": FORMAT,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "layers": layers,
                **metadata,
                "provenance": provenance(),
            },
        )
    return out_dir


def quantization_info(path: str | Path) -> dict | None:
    """The ``quantization.json`` of a quantized checkpoint, or None for any other directory."""
    file = Path(path) / QUANTIZATION_FILE
    if not file.exists():
        return None
    info = validate_quantization_info(read_json(file), file)
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown quantized format {info.get('format')!r}")
    return info


def dequantized_state(checkpoint: LazyCheckpoint, layers: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized checkpoint, with quantized linears turned back into ``weight``."""
    packed = {f"{name}.{suffix}" for name, spec in layers.items() if spec["bits"] for suffix in _SUFFIXES}
    state = {key: checkpoint.get(key) for key in checkpoint.keys() if key not in packed}
    for name, spec in layers.items():
        if not spec["bits"]:
            continue
        g_idx = checkpoint.get(f"{name}.g_idx").long()
        codes = unpack_codes(checkpoint.get(f"{name}.qweight"), spec["bits"], g_idx.numel())
        quantized = QuantizedWeight(
            codes, checkpoint.get(f"{name}.scales"), checkpoint.get(f"{name}.qzeros"), g_idx,
            spec["bits"], spec["group_size"], spec["sym"],
        )
        state[f"{name}.weight"] = quantized.weight
    return state


def model_type(path: str | Path) -> str | None:
    """``model_type`` of a checkpoint directory's config.json (the family an adapter is chosen by)."""
    config = Path(path) / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a model checkpoint directory)")
    return read_json(config).get("model_type")


def model_class(config) -> type[nn.Module]:
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if not architectures or not hasattr(transformers, architectures[0]):
        raise ValueError(f"config names no loadable architecture: {architectures}")
    return getattr(transformers, architectures[0])


def load_model(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load any checkpoint this project writes: HF directories, merged models, quantized models.

    Quantized checkpoints are rebuilt with dequantized float weights (cast to the model's dtype).
    """
    import transformers

    path = require_local_dir(path, "model")
    config = transformers.AutoConfig.from_pretrained(path)
    cls = model_class(config)
    info = quantization_info(path)
    if info is None:
        return cls.from_pretrained(path, dtype=dtype) if dtype else cls.from_pretrained(path)
    model = cls(config).to(getattr(torch, info.get("dtype", "float32")))
    validate_quantized_state(LazyCheckpoint(path), info["layers"], model)
    state = dequantized_state(LazyCheckpoint(path), info["layers"])
    wrap_scaled_activations(model, state, {key: tuple(value.shape) for key, value in state.items()})  # AWQ
    expected = model.state_dict()
    state = {key: value.to(expected[key].dtype) if key in expected else value for key, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [key for key in missing if key not in tied and not _shares_storage(model, key, state)]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _shares_storage(model: nn.Module, key: str, state: dict) -> bool:
    """Whether ``key`` is a parameter tied to one that the checkpoint holds."""
    params = model.state_dict()
    return any(params[key].data_ptr() == params[other].data_ptr() for other in state if other in params and other != key)
