"""CLIP vision towers of open_clip and transformers: the tensor-name mapping and the config read from shapes.

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
  LAION-trained open_clip models use ``nn.GELU`` (``--act gelu``). A state dict written by
  :mod:`epmq.convert` carries the activation in its metadata, and that wins over the default.

Refused, with one line naming the cause: towers with open_clip features transformers' CLIP lacks
(layer scale ``ls_1/ls_2``, attentional pooling, ``no_ln_pre``, non-square grids) and any tensor
the mapping does not name. :mod:`epmq.convert` reads and writes the checkpoint files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch

MAPPING = "open_clip-vision-v1"  # bump when the table above changes
HEAD_WIDTH = 64  # open_clip CLIPVisionCfg.head_width
ACTIVATIONS = ("quick_gelu", "gelu")
DEFAULT_ACTIVATION = "quick_gelu"  # OpenAI CLIP's activation (see the module docstring)
LAYER_NORM_EPS = 1e-5  # open_clip's LayerNorm is torch's default; HF CLIP's layer_norm_eps default
VISUAL, VISION = "visual.", "vision_model."
PROJECTION = "visual_projection.weight"

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

def open_clip_prefix(keys: Sequence[str], where: object = "checkpoint") -> str:
    """The prefix before ``visual.`` (``""``, ``module.`` from DDP, ``model.`` from a wrapper); must be unique."""
    suffix = VISUAL + "conv1.weight"
    prefixes = sorted(key[: -len(suffix)] for key in keys if key == suffix or key.endswith("." + suffix))
    if len(prefixes) != 1:
        found = "no tensor" if not prefixes else f"{len(prefixes)} tensors"
        raise ValueError(f"{where}: {found} named like '{suffix}': not an open_clip ViT state dict "
                         "(ResNet and timm towers are not supported)")
    return prefixes[0]

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
