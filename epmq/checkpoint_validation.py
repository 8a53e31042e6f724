"""Load-time checks of a quantized checkpoint: a tampered or corrupt file is a named error, never a model.

``quantization.json`` must describe a grid this project writes (format, dtype, and per layer bits,
group size and symmetry of the right types), and each quantized linear's stored tensors must fit
it: ``qweight`` int32 (d_out, ceil(d_in * bits / 32)), ``scales`` finite float (d_out, n_groups),
``qzeros`` uint8 codes on the grid (<= 2^bits - 1), ``g_idx`` int32 (d_in,) with every entry a
group that exists (0 <= g < n_groups), where n_groups = ceil(d_in / group_size) (1 per row for
``group_size`` -1) and d_out x d_in is the shape of the model's linear. Codes unpacked from
``qweight`` are in range by construction (each is ``bits`` bits of the stream).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from epmq.io import CheckpointError, LazyCheckpoint

#: dtypes a quantized checkpoint's unquantized tensors may be stored in
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_STORED = {"qweight": ("I32",), "scales": ("F32", "F16", "BF16", "F64"), "qzeros": ("U8",), "g_idx": ("I32", "I64")}


def validate_quantization_info(info: object, file: str | Path) -> dict:
    """``quantization.json``'s content, refused with a message naming ``file`` and the field if it
    does not describe a loadable checkpoint."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(info).__name__}")
    dtype = info.get("dtype", "float32")
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{file}: field 'dtype' is {dtype!r}; expected one of {FLOAT_DTYPES}")
    layers = info.get("layers")
    if not isinstance(layers, dict):
        raise CheckpointError(f"{file}: field 'layers' must map linear names to their grid, found {type(layers).__name__}")
    for name, spec in layers.items():
        where = f"{file}: layer {name!r}"
        if not isinstance(spec, dict) or "bits" not in spec:
            raise CheckpointError(f"{where}: expected an object with 'bits', found {spec!r}")
        bits = spec["bits"]
        if bits is None:
            continue
        if type(bits) is not int or not 1 <= bits <= 8:
            raise CheckpointError(f"{where}: 'bits' must be an integer in 1..8 (or null), found {bits!r}")
        group_size = spec.get("group_size")
        if type(group_size) is not int or not (group_size == -1 or group_size >= 1):
            raise CheckpointError(f"{where}: 'group_size' must be -1 or a positive integer, found {group_size!r}")
        if type(spec.get("sym")) is not bool:
            raise CheckpointError(f"{where}: 'sym' must be true or false, found {spec.get('sym')!r}")
    return info


def validate_quantized_state(checkpoint: LazyCheckpoint, layers: dict, model: nn.Module) -> None:
    """Check every quantized linear's stored tensors against its grid and the model's linear."""
    for name, spec in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"{checkpoint.path}: quantization.json names {name!r}, not a linear of {type(model).__name__}")
        if not spec["bits"]:
            continue
        bits, group_size = spec["bits"], spec["group_size"]
        d_out, d_in = module.weight.shape
        n_groups = 1 if group_size == -1 else math.ceil(d_in / group_size)
        expected = {
            "qweight": (d_out, math.ceil(d_in * bits / 32)),
            "scales": (d_out, n_groups),
            "qzeros": (d_out, n_groups),
            "g_idx": (d_in,),
        }
        for suffix, shape in expected.items():
            key = f"{name}.{suffix}"
            if key not in checkpoint:
                raise CheckpointError(f"{checkpoint.path}: tensor {key!r} is missing")
            stored_shape, stored_dtype = checkpoint.shape_dtype(key)
            if stored_shape != shape:
                raise CheckpointError(f"{checkpoint.path}: tensor {key!r} has shape {stored_shape}, expected {shape}")
            if stored_dtype not in _STORED[suffix]:
                raise CheckpointError(f"{checkpoint.path}: tensor {key!r} is {stored_dtype}, expected {_STORED[suffix]}")
        scales = checkpoint.get(f"{name}.scales")
        if not torch.isfinite(scales).all():
            raise CheckpointError(f"{checkpoint.path}: tensor {name}.scales contains NaN or Inf")
        zeros = checkpoint.get(f"{name}.qzeros")
        if int(zeros.max()) > 2**bits - 1:
            raise CheckpointError(
                f"{checkpoint.path}: tensor {name}.qzeros holds {int(zeros.max())}, off the {bits}-bit grid (max {2**bits - 1})"
            )
        g_idx = checkpoint.get(f"{name}.g_idx")
        low, high = int(g_idx.min()), int(g_idx.max())
        if low < 0 or high >= n_groups:
            raise CheckpointError(
                f"{checkpoint.path}: tensor {name}.g_idx has groups in [{low}, {high}], outside [0, {n_groups})"
            )
