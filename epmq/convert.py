"""``python -m epmq convert --from open_clip --to hf`` (and back): CLIP vision towers between open_clip and transformers.

open_clip (``open_clip.transformer.VisionTransformer``) and transformers
(``CLIPVisionModelWithProjection``) hold the same CLIP ViT with different tensor names, and open_clip
fuses the query, key and value projections into one ``in_proj`` (``nn.MultiheadAttention``, rows
in the order q, k, v). The mapping, with ``visual.`` on the open_clip side and ``vision_model.`` on
the HF side (``N`` a block index):

    conv1.weight                                embeddings.patch_embedding.weight
    class_embedding                             embeddings.class_embedding
    positional_embedding                        embeddings.position_embedding.weight
    ln_pre.{weight,bias}                        pre_layrnorm.{weight,bias}
    transformer.resblocks.N.ln_1.*              encoder.layers.N.layer_norm1.*
    transformer.resblocks.N.attn.in_proj_weight encoder.layers.N.self_attn.{q,k,v}_proj.weight  (rows split in 3)
    transformer.resblocks.N.attn.in_proj_bias   encoder.layers.N.self_attn.{q,k,v}_proj.bias
    transformer.resblocks.N.attn.out_proj.*     encoder.layers.N.self_attn.out_proj.*
    transformer.resblocks.N.ln_2.*              encoder.layers.N.layer_norm2.*
    transformer.resblocks.N.mlp.c_fc.*          encoder.layers.N.mlp.fc1.*
    transformer.resblocks.N.mlp.c_proj.*        encoder.layers.N.mlp.fc2.*
    ln_post.{weight,bias}                       post_layernorm.{weight,bias}
    proj  (width x embed, used as x @ proj)     visual_projection.weight (no prefix; its transpose)

Both compute the same function: open_clip applies ``ln_post`` to every token and pools the class
token, HF pools the class token and then applies ``post_layernorm`` (a per-token norm, so the same).
Splitting, concatenating and transposing copy values unchanged, so a round trip is bit-exact.

What the shapes say and what they cannot:

* width, layers, MLP width, patch size, channels, projection dim: read from the tensors; image size
  is ``patch * sqrt(positional_embedding rows - 1)`` (a square grid; anything else is refused).
* heads: not in any shape. open_clip's ``CLIPVisionCfg`` derives them as ``width // head_width``
  with ``head_width = 64``, used here unless ``--heads`` (or ``--head-width``) says otherwise.
* activation: not in any shape. OpenAI's CLIP weights (ViT-B/32 and every task-vector expert
  fine-tuned from them) use QuickGELU (``hidden_act: quick_gelu``, the default here);
  LAION-trained open_clip models use ``nn.GELU`` (``--act gelu``). A state dict written by this
  module carries the activation in its metadata, and that wins over the default.

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
import math
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from epmq.io import LazyCheckpoint, atomic_output_dir, atomic_write_json, provenance, sha256_file

log = logging.getLogger("epmq.convert")

OPEN_CLIP, HF = "open_clip", "hf"
RECORD = "convert.json"
MAPPING = "open_clip-vision-v1"  # bump when the table above changes
HEAD_WIDTH = 64  # open_clip CLIPVisionCfg.head_width
ACTIVATIONS = ("quick_gelu", "gelu")
DEFAULT_ACTIVATION = "quick_gelu"  # OpenAI CLIP's activation (see the module docstring)
LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm is torch's default; HF CLIP's layer_norm_eps default
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
VISUAL, VISION = "visual.", "vision_model."
PROJECTION = "visual_projection.weight"
_METADATA_ACT = "epmq_hidden_act"
_METADATA_HEADS = "epmq_num_attention_heads"

# (open_clip name after "visual.", HF name after "vision_model.")
_TOWER = (
    ("conv1.weight", "embeddings.patch_embedding.weight"),
    ("class_embedding", "embeddings.class_embedding"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_pre.weight", "pre_layrnorm.weight"),
    ("ln_pre.bias", "pre_layrnorm.bias"),
    ("ln_post.weight", "post_layernorm.weight"),
    ("ln_post.bias", "post_layernorm.bias"),
)
# (open_clip name after "visual.transformer.resblocks.N.", HF name after "vision_model.encoder.layers.N.")
_BLOCK = (
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
)
# open_clip's fused attention input projection -> HF's three projections (q, k, v row blocks)
_FUSED = (("attn.in_proj_weight", "weight"), ("attn.in_proj_bias", "bias"))
_QKV = ("q_proj", "k_proj", "v_proj")
_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_HF_BLOCK_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


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


def open_clip_prefix(keys: Sequence[str], where: object = "checkpoint") -> str:
    """The prefix before ``visual.`` (``""``, ``module.`` from DDP, ``model.`` from a wrapper); must be unique."""
    suffix = VISUAL + "conv1.weight"
    prefixes = sorted(key[: -len(suffix)] for key in keys if key == suffix or key.endswith("." + suffix))
    if len(prefixes) != 1:
        found = "no tensor" if not prefixes else f"{len(prefixes)} tensors"
        raise ValueError(f"{where}: {found} named like '{suffix}': not an open_clip ViT state dict "
                         "(ResNet and timm towers are not supported)")
    return prefixes[0]


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


# ------------------------------------------------------------------------------- config --
def infer_config(
    visual: Mapping[str, torch.Tensor],
    *,
    heads: int | None = None,
    head_width: int = HEAD_WIDTH,
    act: str = DEFAULT_ACTIVATION,
    where: object = "checkpoint",
) -> dict:
    """``CLIPVisionConfig`` arguments of an open_clip tower (keys without ``visual.``), from its shapes.

    Heads are ``heads`` when given, else ``width // head_width`` (open_clip's convention).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")
    unsupported = sorted(key for key in visual if re.search(r"(^|\.)(ls_1|ls_2|attn_pool|attn_pool_contrastive)\.", key))
    if unsupported:
        raise ValueError(f"{where}: tensor visual.{unsupported[0]} is an open_clip feature (layer scale or attentional "
                         "pooling) that transformers' CLIPVisionModel lacks; cannot convert")
    if any(key.startswith(("attnpool.", "layer1.")) for key in visual):
        raise ValueError(f"{where}: an open_clip ModifiedResNet tower (visual.layer1, visual.attnpool); only ViT towers convert")
    for name in ("conv1.weight", "positional_embedding", "class_embedding"):
        if name not in visual:
            raise ValueError(f"{where}: missing tensor visual.{name}")
    if "ln_pre.weight" not in visual:
        raise ValueError(f"{where}: missing tensor visual.ln_pre.weight (a tower built with no_ln_pre has no "
                         "counterpart in transformers' CLIP, which always applies pre_layrnorm)")
    conv = visual["conv1.weight"]
    if conv.dim() != 4 or conv.shape[2] != conv.shape[3]:
        raise ValueError(f"{where}: visual.conv1.weight has shape {tuple(conv.shape)}, expected (width, channels, patch, patch)")
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    positions = visual["positional_embedding"]
    if positions.dim() != 2 or positions.shape[1] != width:
        raise ValueError(f"{where}: visual.positional_embedding has shape {tuple(positions.shape)}, expected (tokens, {width})")
    grid = math.isqrt(positions.shape[0] - 1)
    if grid * grid != positions.shape[0] - 1 or grid == 0:
        raise ValueError(f"{where}: visual.positional_embedding has {positions.shape[0]} rows, not 1 + a square grid: "
                         "transformers' CLIP needs a square image")
    indices = sorted({int(m.group(1)) for key in visual if (m := _BLOCK_KEY.fullmatch(key))})
    if not indices or indices != list(range(len(indices))):
        raise ValueError(f"{where}: residual blocks visual.transformer.resblocks.N are {indices or 'missing'}, "
                         "expected 0..L-1")
    mlp = visual.get("transformer.resblocks.0.mlp.c_fc.weight")
    if mlp is None:
        raise ValueError(f"{where}: missing tensor visual.transformer.resblocks.0.mlp.c_fc.weight")
    if heads is None:
        if head_width <= 0 or width % head_width:
            raise ValueError(f"{where}: width {width} is not a multiple of head width {head_width}; "
                             "give the number of heads (--heads)")
        heads = width // head_width
    if heads <= 0 or width % heads:
        raise ValueError(f"{where}: width {width} is not divisible into {heads} heads")
    config = {
        "hidden_size": width,
        "intermediate_size": mlp.shape[0],
        "num_hidden_layers": len(indices),
        "num_attention_heads": heads,
        "num_channels": channels,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": act,
        "layer_norm_eps": LAYER_NORM_EPS,
    }
    if "proj" in visual:
        proj = visual["proj"]
        if proj.dim() != 2 or proj.shape[0] != width:
            raise ValueError(f"{where}: visual.proj has shape {tuple(proj.shape)}, expected ({width}, embed_dim)")
        config["projection_dim"] = proj.shape[1]
    return config


# ------------------------------------------------------------------------------ mapping --
def open_clip_to_hf(visual: Mapping[str, torch.Tensor], layers: int, where: object = "checkpoint") -> dict[str, torch.Tensor]:
    """HF tensors (``vision_model.*`` and ``visual_projection.weight``) from an open_clip tower (keys without ``visual.``)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in visual:
            raise ValueError(f"{where}: missing tensor visual.{name}")
        used.add(name)
        return visual[name]

    for source, target in _TOWER:
        out[VISION + target] = take(source).contiguous()
    for n in range(layers):
        block, layer = f"transformer.resblocks.{n}.", f"{VISION}encoder.layers.{n}."
        for source, target in _BLOCK:
            out[layer + target] = take(block + source).contiguous()
        for source, kind in _FUSED:
            fused = take(block + source)
            if fused.shape[0] % 3:
                raise ValueError(f"{where}: visual.{block}{source} has {fused.shape[0]} rows, not 3 x width")
            for name, part in zip(_QKV, fused.chunk(3, dim=0)):
                out[f"{layer}self_attn.{name}.{kind}"] = part.clone().contiguous()
    if "proj" in visual:
        out[PROJECTION] = take("proj").t().contiguous()
    unknown = sorted(set(visual) - used)
    if unknown:
        raise ValueError(f"{where}: tensor visual.{unknown[0]} has no counterpart in transformers' CLIP vision model"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    return out


def hf_to_open_clip(state: Mapping[str, torch.Tensor], where: object = "checkpoint") -> dict[str, torch.Tensor]:
    """open_clip tensors (``visual.*``) from an HF CLIP vision tower (keys with or without ``vision_model.``)."""
    tower = {key.removeprefix(VISION): value for key, value in state.items() if key != PROJECTION}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in tower:
            raise ValueError(f"{where}: missing tensor {VISION}{name}")
        used.add(name)
        return tower[name]

    out: dict[str, torch.Tensor] = {}
    for target, source in _TOWER:
        out[VISUAL + target] = take(source).contiguous()
    layers = sorted({int(m.group(1)) for key in tower if (m := _HF_BLOCK_KEY.fullmatch(key))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{where}: encoder layers are {layers or 'missing'}, expected 0..L-1")
    for n in layers:
        block, layer = f"{VISUAL}transformer.resblocks.{n}.", f"encoder.layers.{n}."
        for target, source in _BLOCK:
            out[block + target] = take(layer + source).contiguous()
        for target, kind in _FUSED:
            out[block + target] = torch.cat([take(f"{layer}self_attn.{name}.{kind}") for name in _QKV], dim=0)
    if PROJECTION in state:
        out[VISUAL + "proj"] = state[PROJECTION].t().contiguous()
    # position_ids is a buffer transformers 4 saved; it is arange(tokens), derived, not a weight.
    unknown = sorted(set(tower) - used - {"embeddings.position_ids"})
    if unknown:
        raise ValueError(f"{where}: tensor {unknown[0]!r} has no counterpart in open_clip's vision tower")
    return out


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
