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
        # the transformers class the model is (or, for epmq.models' plain-torch classes, stands for)
        model.config.architectures = [getattr(model, "architecture", type(model).__name__)]
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


#: bytes of unpacking scratch per chunk of rows (the bit stream is int64, ~3 copies alive at once)
_UNPACK_BUDGET = 8 << 20


def quantized_layers(info: dict) -> dict[str, dict]:
    """The linears of ``quantization.json`` stored packed (not the unrounded ``weight`` rows)."""
    return {name: spec for name, spec in info["layers"].items() if spec["bits"]}


def dequantize_into(out: torch.Tensor, checkpoint: LazyCheckpoint, name: str, spec: dict,
                    stored_dtype: torch.dtype) -> torch.Tensor:
    """Write linear ``name``'s dequantized weight into ``out`` (d_out x d_in), a chunk of rows at a time.

    Each chunk goes through :attr:`QuantizedWeight.weight` (float32), then the dtype the model had
    when it was saved, then ``out``'s dtype: values equal those of a whole-matrix dequantization,
    while the scratch stays near ``_UNPACK_BUDGET`` bytes whatever the layer's size.
    """
    g_idx = checkpoint.get(f"{name}.g_idx").long()
    packed = checkpoint.get(f"{name}.qweight")
    scales = checkpoint.get(f"{name}.scales")
    zeros = checkpoint.get(f"{name}.qzeros")
    bits, d_in = spec["bits"], g_idx.numel()
    rows = max(1, _UNPACK_BUDGET // (3 * 8 * bits * max(d_in, 1)))
    for start in range(0, packed.shape[0], rows):
        chunk = slice(start, start + rows)
        quantized = QuantizedWeight(unpack_codes(packed[chunk], bits, d_in), scales[chunk], zeros[chunk], g_idx,
                                    bits, spec["group_size"], spec["sym"])
        out[chunk].copy_(quantized.weight.to(stored_dtype))
    return out


def dequantized_state(checkpoint: LazyCheckpoint, info: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized checkpoint, with quantized linears turned back into ``weight``.

    Holds the whole model at once; :func:`load_model` fills a model in place instead.
    """
    layers = quantized_layers(info)
    stored_dtype = getattr(torch, info.get("dtype", "float32"))
    packed = {f"{name}.{suffix}" for name in layers for suffix in _SUFFIXES}
    state = {key: checkpoint.get(key) for key in checkpoint.keys() if key not in packed}
    for name, spec in layers.items():
        d_out = checkpoint.shape_dtype(f"{name}.scales")[0][0]
        d_in = checkpoint.shape_dtype(f"{name}.g_idx")[0][0]
        state[f"{name}.weight"] = dequantize_into(torch.empty(d_out, d_in, dtype=stored_dtype), checkpoint, name, spec,
                                                  stored_dtype)
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


def load_model(path: str | Path, dtype: torch.dtype | None = None, plain_torch: bool = False) -> nn.Module:
    """Load any checkpoint this project writes: HF directories, merged models, quantized models.

    Quantized checkpoints are rebuilt with dequantized float weights (see :func:`load_quantized`).
    With ``plain_torch``, a family that ``epmq.models`` reproduces exactly (CLIP vision towers) is
    built as its plain-torch class instead of transformers' (same module names, bit-identical
    outputs, no transformers import); any other family loads as without it.
    """
    path = require_local_dir(path, "model")
    info = quantization_info(path)
    if plain_torch:
        from epmq.models import allocate, plain_model_class

        config = read_json(path / "config.json")
        plain = plain_model_class(config)
        if plain is not None:
            stored_dtype = getattr(torch, (info or {}).get("dtype") or config.get("dtype") or "float32")
            with torch.device("meta"):
                model = plain(config)
            checkpoint = LazyCheckpoint(path)
            if _names_modules_of(checkpoint, model):  # else stored under another prefix: transformers maps it
                allocate(model, dtype or stored_dtype)
                return _fill(checkpoint, model, info or {"layers": {}}, stored_dtype)

    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    cls = model_class(config)
    if info is None:
        return cls.from_pretrained(path, dtype=dtype) if dtype else cls.from_pretrained(path)
    return load_quantized(path, cls, config, info, dtype)


def _names_modules_of(checkpoint: LazyCheckpoint, model: nn.Module) -> bool:
    """Whether every tensor stored in ``checkpoint`` belongs to a module of ``model`` by its exact path."""
    modules = dict(model.named_modules())
    return all(key.rpartition(".")[0] in modules for key in checkpoint.keys())


def load_quantized(path: Path, cls: type[nn.Module], config, info: dict, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a quantized checkpoint in ``dtype`` (default: the dtype it was saved in), in place.

    The model is allocated once, uninitialised, in its final dtype; then each stored tensor is copied
    into its parameter and each packed linear is dequantized straight into its weight, one linear
    at a time. Peak memory is the model plus one tensor being read, not a second copy of the state.
    """
    from transformers.initialization import no_init_weights

    stored_dtype = getattr(torch, info.get("dtype", "float32"))
    with no_init_weights():
        model = cls._from_config(config, dtype=dtype or stored_dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return _fill(LazyCheckpoint(path), model, info, stored_dtype)


def _fill(checkpoint: LazyCheckpoint, model: nn.Module, info: dict, stored_dtype: torch.dtype) -> nn.Module:
    """Every parameter of the allocated ``model`` from ``checkpoint``, packed linears dequantized in
    place (``info["layers"]``; empty for an unquantized checkpoint)."""
    validate_quantized_state(checkpoint, info["layers"], model)
    layers = quantized_layers(info)
    packed = {f"{name}.{suffix}" for name in layers for suffix in _SUFFIXES}
    stored = [key for key in checkpoint.keys() if key not in packed]
    # activations AWQ stored scaled (``scale_activation``) become ScaledActivation modules first
    wrap_scaled_activations(model, stored, {key: checkpoint.shape_dtype(key)[0] for key in stored})
    targets = model.state_dict()
    unexpected = [key for key in stored if key not in targets]
    unexpected += [f"{name}.weight" for name in layers if f"{name}.weight" not in targets]
    loaded = set()
    for key in stored:
        if key in targets:
            with torch.no_grad():
                checkpoint.read_into(key, targets[key])
            loaded.add(key)
    for name, spec in layers.items():
        key = f"{name}.weight"
        if key in targets:
            with torch.no_grad():
                dequantize_into(targets[key], checkpoint, name, spec, stored_dtype)
            loaded.add(key)
    storage = {targets[key].data_ptr() for key in loaded if targets[key].numel()}
    missing = [key for key in targets if key not in loaded and targets[key].data_ptr() not in storage]
    if missing or unexpected:
        raise ValueError(f"{checkpoint.path}: checkpoint does not match {type(model).__name__}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
