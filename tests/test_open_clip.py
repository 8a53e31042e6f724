"""open_clip <-> transformers conversion of CLIP vision towers (``epmq.convert``, ``epmq.open_clip_mapping``).

The reference is open_clip's ``VisionTransformer.forward`` written out below from its published
architecture (open_clip is not installable here: it needs torchvision), run on an open_clip-layout
state dict and compared with transformers' model loaded from the conversion.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file

from epmq.cli import main as cli_main
from epmq.convert import (
    hf_checkpoint_to_open_clip,
    is_open_clip,
    open_clip_checkpoint_to_hf,
    read_state_dict,
)
from epmq.open_clip_mapping import infer_config

WIDTH, LAYERS, HEADS, PATCH, GRID, MLP, EMBED = 32, 2, 2, 4, 4, 128, 8


def open_clip_state(seed: int = 0, dtype=torch.float32, text: bool = False) -> dict[str, torch.Tensor]:
    """A small open_clip ViT state dict (shapes as open_clip's VisionTransformer creates them)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    state = {
        "visual.class_embedding": rand(WIDTH),
        "visual.positional_embedding": rand(GRID * GRID + 1, WIDTH),
        "visual.proj": rand(WIDTH, EMBED),
        "visual.conv1.weight": rand(WIDTH, 3, PATCH, PATCH),
        "visual.ln_pre.weight": 1 + rand(WIDTH), "visual.ln_pre.bias": rand(WIDTH),
        "visual.ln_post.weight": 1 + rand(WIDTH), "visual.ln_post.bias": rand(WIDTH),
    }
    for n in range(LAYERS):
        b = f"visual.transformer.resblocks.{n}."
        state.update({
            b + "attn.in_proj_weight": rand(3 * WIDTH, WIDTH), b + "attn.in_proj_bias": rand(3 * WIDTH),
            b + "attn.out_proj.weight": rand(WIDTH, WIDTH), b + "attn.out_proj.bias": rand(WIDTH),
            b + "ln_1.weight": 1 + rand(WIDTH), b + "ln_1.bias": rand(WIDTH),
            b + "mlp.c_fc.weight": rand(MLP, WIDTH), b + "mlp.c_fc.bias": rand(MLP),
            b + "mlp.c_proj.weight": rand(WIDTH, MLP), b + "mlp.c_proj.bias": rand(WIDTH),
            b + "ln_2.weight": 1 + rand(WIDTH), b + "ln_2.bias": rand(WIDTH),
        })
    if text:  # a full open_clip CLIP state dict also holds the text tower
        state.update({"token_embedding.weight": rand(10, WIDTH), "text_projection": rand(WIDTH, EMBED),
                      "logit_scale": torch.tensor(4.6), "transformer.resblocks.0.ln_1.weight": rand(WIDTH)})
    return state


def open_clip_forward(state: dict, images: torch.Tensor, heads: int, act: str) -> torch.Tensor:
    """open_clip's VisionTransformer.forward (pool_type 'tok', no layer scale, no attentional pooling)."""
    v = {k.removeprefix("visual."): t for k, t in state.items() if k.startswith("visual.")}
    width = v["conv1.weight"].shape[0]

    def ln(x, name):
        return F.layer_norm(x, (x.shape[-1],), v[name + ".weight"], v[name + ".bias"], eps=1e-5)

    activation = (lambda x: x * torch.sigmoid(1.702 * x)) if act == "quick_gelu" else F.gelu
    x = F.conv2d(images, v["conv1.weight"], stride=v["conv1.weight"].shape[-1])  # conv stem, no bias
    x = x.reshape(x.shape[0], width, -1).permute(0, 2, 1)  # (batch, grid**2, width)
    x = torch.cat([v["class_embedding"].view(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
    x = ln(x + v["positional_embedding"], "ln_pre")
    x = x.transpose(0, 1)  # (tokens, batch, width): nn.MultiheadAttention's layout
    for n in range(sum(k.endswith("attn.in_proj_weight") for k in v)):
        b = f"transformer.resblocks.{n}."
        h = ln(x, b + "ln_1")
        attn, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, v[b + "attn.in_proj_weight"], v[b + "attn.in_proj_bias"], None, None, False, 0.0,
            v[b + "attn.out_proj.weight"], v[b + "attn.out_proj.bias"], training=False, need_weights=False)
        x = x + attn
        h = activation(F.linear(ln(x, b + "ln_2"), v[b + "mlp.c_fc.weight"], v[b + "mlp.c_fc.bias"]))
        x = x + F.linear(h, v[b + "mlp.c_proj.weight"], v[b + "mlp.c_proj.bias"])
    x = ln(x.transpose(0, 1), "ln_post")
    return x[:, 0] @ v["proj"]


def hf_image_embeds(model_dir: Path, images: torch.Tensor) -> torch.Tensor:
    from transformers import CLIPVisionModelWithProjection

    # sdpa: transformers' eager CLIP attention takes its softmax in float32 (errors ~1e-7 even in float64)
    model = CLIPVisionModelWithProjection.from_pretrained(model_dir, attn_implementation="sdpa").double().eval()
    with torch.no_grad():
        return model(pixel_values=images).image_embeds


@pytest.fixture
def open_clip_file(tmp_path) -> Path:
    path = tmp_path / "expert.pt"
    torch.save(open_clip_state(), path)
    return path


def test_hf_output_equals_open_clip_forward(tmp_path, open_clip_file):
    state = {k: t.double() for k, t in open_clip_state().items()}
    images = torch.randn(3, 3, PATCH * GRID, PATCH * GRID, dtype=torch.float64)
    with torch.no_grad():
        reference = open_clip_forward(state, images, HEADS, "quick_gelu")
        wrong_heads = open_clip_forward(state, images, 1, "quick_gelu")
        wrong_act = open_clip_forward(state, images, HEADS, "gelu")
    open_clip_checkpoint_to_hf(open_clip_file, tmp_path / "hf", heads=HEADS)
    embeds = hf_image_embeds(tmp_path / "hf", images)
    assert embeds.shape == (3, EMBED)
    torch.testing.assert_close(embeds, reference, rtol=0, atol=1e-12)
    # the comparison can fail: a wrong head count or activation changes the output
    assert not torch.allclose(embeds, wrong_heads, atol=1e-3)
    assert not torch.allclose(embeds, wrong_act, atol=1e-3)


def test_gelu_tower_with_head_width(tmp_path):
    torch.save(open_clip_state(), tmp_path / "laion.pt")
    record = open_clip_checkpoint_to_hf(tmp_path / "laion.pt", tmp_path / "hf", head_width=16, act="gelu")
    assert record["config"]["num_attention_heads"] == WIDTH // 16 == HEADS
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "gelu"
    state = {k: t.double() for k, t in open_clip_state().items()}
    images = torch.randn(2, 3, PATCH * GRID, PATCH * GRID, dtype=torch.float64)
    torch.testing.assert_close(hf_image_embeds(tmp_path / "hf", images), open_clip_forward(state, images, HEADS, "gelu"),
                               rtol=0, atol=1e-12)


def test_inferred_config_and_record(tmp_path, open_clip_file):
    record = open_clip_checkpoint_to_hf(open_clip_file, tmp_path / "hf", heads=HEADS)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    expected = {"hidden_size": WIDTH, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "patch_size": PATCH,
                "image_size": PATCH * GRID, "intermediate_size": MLP, "projection_dim": EMBED, "hidden_act": "quick_gelu",
                "model_type": "clip_vision_model", "architectures": ["CLIPVisionModelWithProjection"]}
    assert {key: config[key] for key in expected} == expected
    saved = json.loads((tmp_path / "hf" / "convert.json").read_text())
    assert saved["heads_from"] == "argument" and saved["activation_from"].startswith("default")
    assert saved["source_sha256"] == record["source_sha256"] and "provenance" in saved
    # default heads: width // 64 (open_clip's head width); 32 is not a multiple, so it is refused
    with pytest.raises(ValueError, match="not a multiple of head width 64.*--heads"):
        open_clip_checkpoint_to_hf(open_clip_file, tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_is_bit_exact(tmp_path, dtype, suffix):
    state = open_clip_state(dtype=dtype)
    src = tmp_path / f"src{suffix}"
    save_file(state, str(src)) if suffix == ".safetensors" else torch.save(state, src)
    open_clip_checkpoint_to_hf(src, tmp_path / "hf", heads=HEADS)
    hf_checkpoint_to_open_clip(tmp_path / "hf", tmp_path / f"back{suffix}")
    back, _ = read_state_dict(tmp_path / f"back{suffix}")
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    # and HF -> open_clip -> HF: the same tensors again; heads and activation travel in the metadata
    open_clip_checkpoint_to_hf(tmp_path / f"back{suffix}", tmp_path / "hf2", heads=HEADS)
    first, second = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_metadata_carries_heads_and_activation(tmp_path, open_clip_file):
    open_clip_checkpoint_to_hf(open_clip_file, tmp_path / "hf", heads=HEADS, act="gelu")
    hf_checkpoint_to_open_clip(tmp_path / "hf", tmp_path / "back.safetensors")
    with safe_open(str(tmp_path / "back.safetensors"), "pt") as handle:
        assert handle.metadata()["epmq_hidden_act"] == "gelu"
    record = open_clip_checkpoint_to_hf(tmp_path / "back.safetensors", tmp_path / "hf2")  # no flags needed
    assert record["config"]["hidden_act"] == "gelu" and record["config"]["num_attention_heads"] == HEADS
    assert record["activation_from"] == record["heads_from"] == "checkpoint metadata"


def test_wrapped_and_full_clip_state_dicts(tmp_path):
    """open_clip training checkpoints ({"state_dict": ...}, DDP's module. prefix) with the text tower."""
    state = open_clip_state(text=True)
    torch.save({"epoch": 3, "state_dict": {"module." + k: t for k, t in state.items()}}, tmp_path / "epoch_3.pt")
    record = open_clip_checkpoint_to_hf(tmp_path / "epoch_3.pt", tmp_path / "hf", heads=HEADS)
    assert record["source_key_prefix"] == "module." and record["source_tensors_not_in_vision_tower"] == 4
    converted = load_file(str(tmp_path / "hf" / "model.safetensors"))
    torch.testing.assert_close(converted["vision_model.encoder.layers.1.self_attn.k_proj.weight"],
                               state["visual.transformer.resblocks.1.attn.in_proj_weight"][WIDTH:2 * WIDTH], rtol=0, atol=0)
    torch.testing.assert_close(converted["visual_projection.weight"], state["visual.proj"].t(), rtol=0, atol=0)


def test_pickled_module_is_refused_naming_why(tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    assert cli_main(["convert", "--from", "open_clip", "--to", "hf", "--src", str(tmp_path / "module.pt"),
                     "--out", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "weights_only" in error and "pickles Python objects" in error
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(WIDTH)}), "layer scale"),
    (lambda s: s.update({"visual.positional_embedding": torch.zeros(16, WIDTH)}), "not 1 \\+ a square grid"),
    (lambda s: s.pop("visual.ln_pre.weight"), "no_ln_pre"),
    (lambda s: s.pop("visual.transformer.resblocks.0.mlp.c_fc.bias"), "missing tensor visual.transformer.resblocks.0.mlp.c_fc.bias"),
    (lambda s: s.update({"visual.extra": torch.ones(1)}), "visual.extra has no counterpart"),
    (lambda s: s.update({"visual.layer1.0.conv1.weight": torch.ones(1)}), "ModifiedResNet"),
    (lambda s: s.update({"visual.trunk.conv1.weight" if k == "visual.conv1.weight" else k: s.pop(k) for k in list(s)}),
     "not an open_clip ViT state dict"),
])
def test_bad_towers_are_refused(tmp_path, capsys, edit, message):
    state = open_clip_state()
    edit(state)
    torch.save(state, tmp_path / "bad.pt")
    before = (tmp_path / "bad.pt").read_bytes()
    assert cli_main(["convert", "--from", "open_clip", "--to", "hf", "--src", str(tmp_path / "bad.pt"),
                     "--out", str(tmp_path / "hf"), "--heads", str(HEADS)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(tmp_path / "bad.pt") in error
    assert re.search(message, error)
    assert not (tmp_path / "hf").exists() and (tmp_path / "bad.pt").read_bytes() == before


def test_infer_config_heads_flag_checks_divisibility():
    visual = {k.removeprefix("visual."): t for k, t in open_clip_state().items()}
    assert infer_config(visual, heads=4)["num_attention_heads"] == 4
    with pytest.raises(ValueError, match="not divisible into 5 heads"):
        infer_config(visual, heads=5)


def test_cli_round_trip_and_detection(tmp_path, open_clip_file):
    assert is_open_clip(open_clip_file) and not is_open_clip(tmp_path)  # a folder with some .pt: not said to be
    hub_folder = tmp_path / "hub"  # open_clip's hub layout
    hub_folder.mkdir()
    torch.save(open_clip_state(), hub_folder / "open_clip_pytorch_model.bin")
    (hub_folder / "open_clip_config.json").write_text("{}")
    assert is_open_clip(hub_folder)
    assert open_clip_checkpoint_to_hf(hub_folder, tmp_path / "from_hub", heads=HEADS)["config"]["num_hidden_layers"] == LAYERS
    assert cli_main(["convert", "--from", "open_clip", "--to", "hf", "--src", str(open_clip_file), "--out",
                     str(tmp_path / "hf"), "--heads", str(HEADS)]) == 0
    assert not is_open_clip(tmp_path / "hf")
    assert cli_main(["convert", "--from", "hf", "--to", "open_clip", "--src", str(tmp_path / "hf"), "--out",
                     str(tmp_path / "back.safetensors")]) == 0
    assert is_open_clip(tmp_path / "back.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.safetensors", "expert.pt", "from_hub", "hf", "hub"]  # no temp files left


def test_against_open_clip_create_model(tmp_path):
    """Where open_clip_torch is installed: its own model's image features equal the converted HF model's."""
    open_clip = pytest.importorskip(
        "open_clip", reason="open_clip_torch is not installed (it needs torchvision, a multi-GB CUDA build here)")
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    state = {k: t for k, t in model.state_dict().items() if k.startswith("visual.")}
    save_file({k: t.contiguous() for k, t in state.items()}, str(tmp_path / "vit.safetensors"))
    open_clip_checkpoint_to_hf(tmp_path / "vit.safetensors", tmp_path / "hf")
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model.encode_image(images).double()
    torch.testing.assert_close(hf_image_embeds(tmp_path / "hf", images.double()), expected, rtol=1e-4, atol=1e-4)
