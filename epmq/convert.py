"""``python -m epmq convert --from open_clip --to hf`` (and back): CLIP vision towers between open_clip and transformers.

The tensor-name mapping and what a tower's shapes say live in :mod:`epmq.open_clip_mapping`; this
module reads and writes the checkpoint files.

Refused, with one line naming the cause: pickled modules (only ``torch.load(weights_only=True)``
state dicts and safetensors are read: unpickling a module runs arbitrary code), towers with
open_clip features transformers' CLIP lacks (layer scale ``ls_1/ls_2``, attentional pooling,
``no_ln_pre``, non-square grids) and any tensor the mapping does not name. Text-tower tensors of a
full open_clip CLIP state dict are left out of the HF tower and counted in ``convert.json``.

``merge``, ``quantize`` and ``export`` take open_clip checkpoints directly through
:func:`hf_inputs`, which converts them into temporary HF folders and records each conversion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from epmq.io import LazyCheckpoint, atomic_output_dir, atomic_write_json, provenance, sha256_file
from epmq.open_clip_mapping import (
    ACTIVATIONS,
    DEFAULT_ACTIVATION,
    HEAD_WIDTH,
    MAPPING,
    PROJECTION,
    VISUAL,
    hf_to_open_clip,
    infer_config,
    open_clip_prefix,
    open_clip_to_hf,
)

log = logging.getLogger("epmq.convert")

OPEN_CLIP, HF = "open_clip", "hf"
RECORD = "convert.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_METADATA_ACT = "epmq_hidden_act"
_METADATA_HEADS = "epmq_num_attention_heads"


# ------------------------------------------------------------------------------ reading --
def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file/folder or a ``torch.load(weights_only=True)`` state dict, and metadata.

    Training checkpoints wrapping the weights in ``{"state_dict": ...}`` are unwrapped. A pickled
    module (``torch.save(model)``) is refused: reading it would need ``weights_only=False``, which
    runs arbitrary code from the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.is_dir():
        torch_files = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES)
        if not list(path.glob("*.safetensors")) and len(torch_files) == 1:
            path = torch_files[0]
    if path.is_dir() or path.suffix == ".safetensors":
        checkpoint = LazyCheckpoint(path)
        return {key: checkpoint.get(key) for key in checkpoint.keys()}, dict(checkpoint.metadata)
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: not a safetensors or torch state-dict file (suffixes {', '.join(TORCH_SUFFIXES)})")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is not a plain state dict (it pickles Python objects, e.g. a whole torch.save(model)); "
            "only torch.load(weights_only=True)-loadable state dicts are read, because unpickling runs code "
            "from the file: load it where its classes are installed and save model.state_dict() "
            f"({str(error).splitlines()[0][:120]})") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"cannot read {path}: {str(error).splitlines()[0][:200]} (truncated or not a torch file?)") from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a state dict (a mapping of names to tensors)")
    state = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not state:
        raise ValueError(f"{path}: the state dict holds no tensors")
    return state, {}


def is_open_clip(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an open_clip checkpoint: a torch state-dict file, or safetensors with ``visual.conv1.weight``."""
    path = Path(path)
    if path.is_file() and path.suffix in TORCH_SUFFIXES:
        return True
    if path.is_dir() and not list(path.glob("*.safetensors")):
        # open_clip's hub folders: open_clip_config.json beside open_clip_pytorch_model.bin
        torch_files = [p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES]
        return len(torch_files) == 1 and ((path / "open_clip_config.json").exists() or torch_files[0].name.startswith("open_clip"))
    if not (path.is_dir() or path.suffix == ".safetensors"):
        return False
    try:
        keys = LazyCheckpoint(path).keys()
    except ValueError:
        return False
    return any(key == VISUAL + "conv1.weight" or key.endswith("." + VISUAL + "conv1.weight") for key in keys)


# ------------------------------------------------------------------------------ writing --
def _hf_config(config: dict):
    from transformers import CLIPVisionConfig

    hf = CLIPVisionConfig(**config)
    hf.architectures = ["CLIPVisionModelWithProjection" if "projection_dim" in config else "CLIPVisionModel"]
    return hf


def align_to(state: dict[str, torch.Tensor], like: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` renamed to the tensor names of checkpoint ``like`` (prefix variants, as ``LazyCheckpoint.resolve``).

    Returns the aligned state and the names of tensors ``like`` lacks (dropped). A tensor of
    ``like`` that ``state`` lacks is an error.
    """
    reference = LazyCheckpoint(like)
    aligned, used = {}, set()
    for key in reference.keys():
        if key.endswith("embeddings.position_ids") and not any(k.endswith("embeddings.position_ids") for k in state):
            aligned[key] = reference.get(key)  # a buffer transformers 4 saved: arange(tokens), not a weight
            continue
        if key in state:
            match = key
        else:
            matches = [k for k in state if k.endswith("." + key) or key.endswith("." + k)]
            if len(matches) != 1:
                raise ValueError(f"converted open_clip tower has {len(matches)} tensors matching {key!r} of {like}")
            match = matches[0]
        if tuple(state[match].shape) != reference.shape_dtype(key)[0]:
            raise ValueError(f"converted {match} has shape {tuple(state[match].shape)}, {like} has "
                             f"{reference.shape_dtype(key)[0]} for {key}")
        aligned[key] = state[match]
        used.add(match)
    return aligned, sorted(set(state) - used)


def open_clip_checkpoint_to_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    heads: int | None = None,
    head_width: int = HEAD_WIDTH,
    act: str | None = None,
    like: str | os.PathLike | None = None,
    write_record: bool = True,
) -> dict:
    """Write open_clip checkpoint ``src`` as an HF folder ``out`` (atomically); return the conversion record.

    ``act`` and ``heads`` default to what ``src``'s metadata records, else to ``like``'s config,
    else to quick_gelu and ``width // head_width``. With ``like``, tensor names follow that HF
    checkpoint and tensors it lacks are dropped (recorded).
    The record is also written as ``out/convert.json`` unless ``write_record`` is false (on-the-fly
    conversions, whose record goes into the consuming stage's own record instead).
    """
    src, out = Path(src), Path(out)
    state, metadata = read_state_dict(src)
    prefix = open_clip_prefix(list(state), src)
    visual = {key[len(prefix) + len(VISUAL):]: value for key, value in state.items() if key.startswith(prefix + VISUAL)}
    others = len(state) - len(visual)
    # Not in the shapes: the argument, else what the file or the reference model (an expert's
    # pretrained tower shares its heads and activation) records, else open_clip's conventions.
    reference = json.loads((Path(like) / "config.json").read_text()) if like and (Path(like) / "config.json").exists() else {}
    if act:
        act_from = "argument"
    elif _METADATA_ACT in metadata:
        act, act_from = metadata[_METADATA_ACT], "checkpoint metadata"
    elif reference.get("hidden_act"):
        act, act_from = reference["hidden_act"], f"config of {like}"
    else:
        act, act_from = DEFAULT_ACTIVATION, "default (OpenAI CLIP)"
    if heads is not None:
        heads_from = "argument"
    elif _METADATA_HEADS in metadata:
        heads, heads_from = int(metadata[_METADATA_HEADS]), "checkpoint metadata"
    elif reference.get("num_attention_heads"):
        heads, heads_from = int(reference["num_attention_heads"]), f"config of {like}"
    else:
        heads_from = f"width // head_width ({head_width}, open_clip's convention)"
    config = infer_config(visual, heads=heads, head_width=head_width, act=act, where=src)
    converted = open_clip_to_hf(visual, config["num_hidden_layers"], where=src)
    del state, visual
    dropped: list[str] = []
    if like is not None:
        converted, dropped = align_to(converted, like)
        if PROJECTION in dropped:
            config.pop("projection_dim")
        if dropped:
            log.warning("%s: dropped %s (the reference %s has no such tensors)", src, ", ".join(dropped), like)
    record = {
        "from": OPEN_CLIP,
        "to": HF,
        "mapping": MAPPING,
        "source": str(src.resolve()),
        "source_sha256": _sha256(src),
        "source_key_prefix": prefix,
        "source_tensors_not_in_vision_tower": others,
        "config": config,
        "heads_from": heads_from,
        "activation_from": act_from,
        "like": str(like) if like is not None else None,
        "dropped": dropped,
    }
    with atomic_output_dir(out) as staging:
        _hf_config(config).save_pretrained(staging)
        save_file(converted, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if write_record:
            atomic_write_json(staging / RECORD, {**record, "provenance": provenance()})
    log.info("converted %s (open_clip, %d layers, width %d, %d heads, %s) -> %s", src, config["num_hidden_layers"],
             config["hidden_size"], config["num_attention_heads"], act, out)
    return record


def read_hf_state(src: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Tensors, config.json and provenance of any CLIP vision checkpoint this project writes (quantized: dequantized)."""
    from epmq.checkpoint import dequantized_state, quantization_info

    src = Path(src)
    config_file = src / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{src}: no config.json (expected an HF CLIP vision checkpoint folder)")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "clip_vision_model":
        raise ValueError(f"{src}: model_type {config.get('model_type')!r}, expected 'clip_vision_model' "
                         "(a CLIPVisionModel or CLIPVisionModelWithProjection folder)")
    checkpoint = LazyCheckpoint(src)
    info = quantization_info(src)
    if info is None:
        state = {key: checkpoint.get(key) for key in checkpoint.keys()}
        origin = {"quantized": False}
    else:
        state = dequantized_state(checkpoint, info)
        origin = {"quantized": True, "method": info.get("method"), "dequantized": "scales * (codes - zeros)"}
    return state, config, origin


def hf_checkpoint_to_open_clip(src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write HF CLIP vision checkpoint ``src`` as an open_clip state dict ``out`` (``.safetensors`` or ``.pt``)."""
    src, out = Path(src), Path(out)
    if out.suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"{out}: an open_clip output is one file ending in .safetensors, .pt or .pth")
    state, config, origin = read_hf_state(src)
    converted = hf_to_open_clip(state, where=src)
    if config.get("hidden_act") not in ACTIVATIONS:
        raise ValueError(f"{src}: hidden_act {config.get('hidden_act')!r} has no open_clip counterpart {ACTIVATIONS}")
    record = {
        "from": HF, "to": OPEN_CLIP, "mapping": MAPPING, "source": str(src.resolve()), **origin,
        "hidden_act": config.get("hidden_act"), "num_attention_heads": config.get("num_attention_heads"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        if out.suffix == ".safetensors":
            metadata = {"format": "pt", _METADATA_ACT: config["hidden_act"],
                        _METADATA_HEADS: str(config["num_attention_heads"]), "epmq_convert": json.dumps(record)}
            save_file(converted, tmp, metadata=metadata)
        else:
            torch.save(converted, tmp)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    log.info("converted %s (HF, %s) -> %s (open_clip)", src, config.get("hidden_act"), out)
    return record


def _sha256(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix == ".safetensors" or p.suffix in TORCH_SUFFIXES)
    return {file.name: sha256_file(file) for file in files}


# ------------------------------------------------------------------- on-the-fly inputs --
@contextlib.contextmanager
def hf_inputs(
    paths: Sequence[str | os.PathLike],
    *,
    like: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
) -> Iterator[tuple[list[Path], list[dict]]]:
    """``paths`` with every open_clip checkpoint replaced by a temporary HF conversion; and the conversion records.

    With ``like`` (an HF checkpoint), converted tensor names follow it. The first path is the
    reference for the rest when ``like`` is None and it is HF (or once converted). The temporary
    folders live in ``workdir`` (default: the system's) and are removed on exit.
    """
    paths = [Path(path) for path in paths]
    records: list[dict] = []
    if not any(is_open_clip(path) for path in paths):
        yield paths, records
        return
    tmp = Path(tempfile.mkdtemp(prefix=".epmq-open_clip-", dir=workdir))
    try:
        converted: list[Path] = []
        for position, path in enumerate(paths):
            reference = like if like is not None else (converted[0] if converted else None)
            if is_open_clip(path):
                target = tmp / f"{position}-{path.stem}"
                records.append(open_clip_checkpoint_to_hf(path, target, like=reference, write_record=False))
                path = target
            converted.append(path)
        yield converted, records
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------- CLI --
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source_format", required=True, choices=[OPEN_CLIP, HF])
    parser.add_argument("--to", dest="target_format", required=True, choices=[OPEN_CLIP, HF])
    parser.add_argument("--src", required=True, type=Path,
                        help="open_clip: a .safetensors or weights_only .pt/.pth/.bin state dict (or a folder with one); "
                             "hf: a CLIPVisionModel(WithProjection) folder, merged or quantized (dequantized)")
    parser.add_argument("--out", required=True, type=Path,
                        help="hf: output folder; open_clip: output file (.safetensors keeps activation and heads "
                             "in its metadata; .pt/.pth a plain state dict)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default: width // --head-width)")
    parser.add_argument("--head-width", type=int, default=HEAD_WIDTH,
                        help=f"open_clip's head width, used when --heads is not given (default {HEAD_WIDTH})")
    parser.add_argument("--act", choices=ACTIVATIONS, default=None,
                        help="activation of the open_clip tower (default: from the file's metadata, else quick_gelu, "
                             "OpenAI CLIP's; LAION open_clip models use gelu)")
    parser.add_argument("--like", type=Path, default=None, help="HF checkpoint whose tensor names to follow (to hf)")


def run(args: argparse.Namespace) -> int:
    if (args.source_format, args.target_format) == (OPEN_CLIP, HF):
        open_clip_checkpoint_to_hf(args.src, args.out, heads=args.heads, head_width=args.head_width, act=args.act,
                                   like=args.like)
    elif (args.source_format, args.target_format) == (HF, OPEN_CLIP):
        hf_checkpoint_to_open_clip(args.src, args.out)
    else:
        raise ValueError(f"convert --from {args.source_format} --to {args.target_format}: nothing to convert "
                         "(supported: open_clip -> hf, hf -> open_clip)")
    return 0


if __name__ == "__main__":
    import sys

    from epmq.cli import run_module

    sys.exit(run_module(sys.modules[__name__]))
