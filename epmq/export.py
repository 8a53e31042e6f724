"""``python -m epmq export``: a quantized checkpoint in the compressed-tensors format.

compressed-tensors (the format llm-compressor writes) is what transformers (with the
``compressed-tensors`` package installed), vLLM and lm-eval load directly. Every family with an
adapter exports: decoder LMs, CLIP vision towers, T5, BERT. The export keeps our codes exactly:
compressed-tensors' own compressor writes them from the scales and zero points we fitted, in the
adapter's ``compressed_tensors_format``: ``pack-quantized`` (codes shifted to the signed range,
packed into int32 ``weight_packed``) or, for T5, ``int-quantized`` (one int8 ``weight`` per code);
``weight_scale`` and, for asymmetric grids, ``weight_zero_point`` go beside them, and config.json
gains the ``quantization_config`` that tells loaders how to read them.

What compressed-tensors cannot express is refused with the reason (our own format,
``epmq.checkpoint``, keeps it): codes wider than 8 bits (its integer formats store at most int8),
different grids for different linears (one scheme per export), groups that are not consecutive
columns (act-order with groups formed in permuted order: quantize with ``static_groups``), a
group size not dividing d_in, and unrounded layers (``epmq_fp``).

``--format open_clip`` writes a CLIP vision tower (merged, or quantized and then dequantized) back
as an open_clip state dict (``epmq.convert``), for use where the experts came from: open_clip.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from torch import nn

from epmq.adapters import adapter_for_type
from epmq.checkpoint import QUANTIZATION_FILE, load_model, model_type, quantization_info
from epmq.cli import add_overwrite_argument
from epmq.io import LazyCheckpoint, atomic_output_dir, check_output, require_local_dir
from epmq.progress import interactive

#: the copy of quantization.json an export carries: its provenance file
EXPORT_RECORD = "epmq_quantization.json"

#: widest integer code compressed-tensors' int formats store (int8 storage)
MAX_BITS = 8
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt", "vocab.txt",
                    "spiece.model", "preprocessor_config.json", "processor_config.json")


def _grid(layers: dict) -> tuple[int, int, bool]:
    unrounded = [name for name, spec in layers.items() if not spec["bits"]]
    if unrounded:
        raise ValueError(f"unrounded layers (epmq_fp) have no integer codes to export, e.g. {unrounded[0]}")
    grids = {(spec["bits"], spec["group_size"], spec["sym"]) for spec in layers.values() if spec["bits"]}
    too_wide = sorted({bits for bits, _, _ in grids if bits > MAX_BITS})
    if too_wide:
        raise ValueError(f"compressed-tensors stores integer codes of at most {MAX_BITS} bits; this checkpoint has {too_wide}")
    if len(grids) != 1:
        raise ValueError(f"compressed-tensors needs one grid for every quantized linear, found {sorted(grids)}")
    return grids.pop()


def export_compressed_tensors(quantized_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    quantized_dir, out_dir = require_local_dir(quantized_dir, "--model"), Path(out_dir)
    info = quantization_info(quantized_dir)
    if info is None:
        raise ValueError(f"{quantized_dir} has no {QUANTIZATION_FILE}: export reads checkpoints written by `quantize`")
    adapter = adapter_for_type(model_type(quantized_dir))
    model = load_model(quantized_dir)  # validates the checkpoint (epmq.checkpoint_validation) first
    bits, group_size, sym = _grid(info["layers"])
    checkpoint = LazyCheckpoint(quantized_dir)
    layers = list(info["layers"])
    for name in layers:
        d_in = model.get_submodule(name).in_features
        g_idx = checkpoint.get(f"{name}.g_idx").long()
        size = d_in if group_size == -1 else group_size
        if d_in % size or not torch.equal(g_idx, torch.arange(d_in) // size):
            raise ValueError(
                f"{name}: groups are not consecutive columns of a size dividing d_in={d_in} "
                "(act-order with dynamic groups, or a ragged last group): not representable in compressed-tensors"
            )
    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=sym,
        strategy="channel" if group_size == -1 else "group", group_size=None if group_size == -1 else group_size,
    )
    others = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in info["layers"]]
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights,
                                                      format=adapter.compressed_tensors_format)},
        ignore=others, quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, config, show_progress=interactive())
    offset = 2 ** (bits - 1)  # compressed-tensors keeps codes and zero points in the signed range
    with torch.no_grad():
        for name in layers:
            module = model.get_submodule(name)
            module.weight_scale.copy_(checkpoint.get(f"{name}.scales").to(module.weight_scale.dtype).reshape(module.weight_scale.shape))
            if not sym:
                zeros = checkpoint.get(f"{name}.qzeros").to(torch.int16) - offset
                module.weight_zero_point.copy_(zeros.to(module.weight_zero_point.dtype).reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    with atomic_output_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        for source in [tokenizer_dir, quantized_dir]:
            for file_name in _TOKENIZER_FILES:
                if source and (Path(source) / file_name).exists() and not (tmp / file_name).exists():
                    shutil.copy2(Path(source) / file_name, tmp / file_name)
        shutil.copy2(quantized_dir / QUANTIZATION_FILE, tmp / EXPORT_RECORD)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="a quantized checkpoint written by `quantize` (open_clip: also a merged CLIP vision tower)")
    parser.add_argument("--format", choices=["compressed-tensors", "open_clip"], default="compressed-tensors",
                        help="open_clip: a CLIP vision tower as an open_clip state dict, dequantized (--out FILE.safetensors or .pt)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="directory whose tokenizer files are copied along")
    parser.add_argument("--out", required=True, type=Path)
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    inputs = [args.model] + ([args.tokenizer] if args.tokenizer else [])
    check_output(args.out, inputs=inputs, records=[EXPORT_RECORD], overwrite=args.overwrite,
                 is_file=args.format == "open_clip")
    if args.format == "open_clip":
        from epmq.convert import hf_checkpoint_to_open_clip

        hf_checkpoint_to_open_clip(args.model, args.out)
    else:
        export_compressed_tensors(args.model, args.out, args.tokenizer)
    return 0
