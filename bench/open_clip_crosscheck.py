"""Cross-check ``epmq convert`` against open_clip's own vision tower, where open_clip_torch cannot be installed.

open_clip's package imports torchvision (for image transforms and ResNet batch-norm freezing), which
installs here only as a multi-GB CUDA build; its ViT tower needs neither. This script loads the
model module of an unpacked open_clip_torch wheel or source tree (``--open-clip-src``, the folder
holding ``open_clip/``, or the ``.whl`` itself) with that one torchvision import stubbed, builds
each named model's vision tower exactly as ``open_clip.create_model`` does
(``model._build_vision_tower`` from ``model_configs/<name>.json``), perturbs every parameter
(open_clip initialises LayerNorms to 1 and 0, which would hide a swapped norm), converts its
state dict with default flags except the activation the config names, and prints one JSON line
per model: the largest absolute difference between open_clip's image features and transformers'
``image_embeds`` (both float64; transformers' sdpa attention, since its eager CLIP attention takes
the softmax in float32), the largest feature, and whether HF -> open_clip returns every
tensor bit for bit.

    python bench/open_clip_crosscheck.py --open-clip-src open_clip_torch-3.3.0-py3-none-any.whl

Where ``import open_clip`` works, ``tests/test_open_clip.py::test_against_open_clip_create_model``
is the same check through ``open_clip.create_model``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import torch
import transformers  # noqa: F401  (imported before the stub, so it sees torchvision as absent)
from safetensors.torch import save_file

from epmq.convert import hf_checkpoint_to_open_clip, open_clip_checkpoint_to_hf, read_state_dict


def load_open_clip_model_module(source: Path) -> types.ModuleType:
    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
    package = types.ModuleType("open_clip")
    package.__path__ = [str(source / "open_clip")]  # the package without its __init__ (which imports transforms)
    sys.modules["open_clip"] = package
    import open_clip.model

    return open_clip.model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--open-clip-src", required=True, type=Path, help="open_clip_torch wheel, or folder holding open_clip/")
    parser.add_argument("--models", nargs="+", default=["ViT-B-32-quickgelu", "ViT-B-32"])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = args.open_clip_src
        if source.suffix == ".whl":
            zipfile.ZipFile(source).extractall(tmp / "src")
            source = tmp / "src"
        model_module = load_open_clip_model_module(source)
        for name in args.models:
            cfg = json.loads((source / "open_clip" / "model_configs" / f"{name}.json").read_text())
            torch.manual_seed(args.seed)
            tower = model_module._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))
            with torch.no_grad():
                for parameter in tower.parameters():
                    parameter.add_(0.02 * torch.randn_like(parameter))
            tower = tower.double().eval()
            state = {f"visual.{key}": value.float().contiguous() for key, value in tower.state_dict().items()}
            save_file(state, str(tmp / f"{name}.safetensors"))
            act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
            record = open_clip_checkpoint_to_hf(tmp / f"{name}.safetensors", tmp / name, act=act)
            hf = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp / name, attn_implementation="sdpa")
            hf = hf.double().eval()
            tower.load_state_dict({key.removeprefix("visual."): value.double() for key, value in state.items()})
            size = cfg["vision_cfg"]["image_size"]
            images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(args.seed),
                                 dtype=torch.float64)
            with torch.no_grad():
                expected, got = tower(images), hf(pixel_values=images).image_embeds
            hf_checkpoint_to_open_clip(tmp / name, tmp / f"{name}-back.safetensors")
            back, _ = read_state_dict(tmp / f"{name}-back.safetensors")
            exact = set(back) == set(state) and all(torch.equal(back[key], state[key]) for key in state)
            print(json.dumps({
                "model": name, "open_clip_version": (source / "open_clip" / "version.py").read_text().split("'")[1],
                "heads": record["config"]["num_attention_heads"], "hidden_act": act,
                "max_abs_diff": (expected - got).abs().max().item(), "max_abs_feature": expected.abs().max().item(),
                "round_trip_bit_exact": exact,
            }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
