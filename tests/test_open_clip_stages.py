"""open_clip experts given directly to ``merge``, ``quantize`` and ``export``: converted on the fly,
recorded, and the same result as converting first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epmq.checkpoint import dequantized_state, quantization_info
from epmq.cli import main
from epmq.convert import open_clip_checkpoint_to_hf, read_state_dict
from epmq.io import LazyCheckpoint
from epmq.suites.base import packaged_config

WIDTH, LAYERS, PATCH, GRID, MLP, EMBED = 128, 2, 4, 4, 256, 16  # 128 wide: 2 heads of open_clip's width 64


def tower(seed: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    """An open_clip ViT state dict; with ``base``, an expert: base plus a small seeded change."""
    g = torch.Generator().manual_seed(seed)
    if base is not None:
        return {key: value + 0.01 * torch.randn(value.shape, generator=g) for key, value in base.items()}
    shapes = {"class_embedding": (WIDTH,), "positional_embedding": (GRID * GRID + 1, WIDTH), "proj": (WIDTH, EMBED),
              "conv1.weight": (WIDTH, 3, PATCH, PATCH), "ln_pre.weight": (WIDTH,), "ln_pre.bias": (WIDTH,),
              "ln_post.weight": (WIDTH,), "ln_post.bias": (WIDTH,)}
    for n in range(LAYERS):
        b = f"transformer.resblocks.{n}."
        shapes.update({b + "attn.in_proj_weight": (3 * WIDTH, WIDTH), b + "attn.in_proj_bias": (3 * WIDTH,),
                       b + "attn.out_proj.weight": (WIDTH, WIDTH), b + "attn.out_proj.bias": (WIDTH,),
                       b + "ln_1.weight": (WIDTH,), b + "ln_1.bias": (WIDTH,), b + "ln_2.weight": (WIDTH,),
                       b + "ln_2.bias": (WIDTH,), b + "mlp.c_fc.weight": (MLP, WIDTH), b + "mlp.c_fc.bias": (MLP,),
                       b + "mlp.c_proj.weight": (WIDTH, MLP), b + "mlp.c_proj.bias": (WIDTH,)})
    state = {}
    for name, shape in shapes.items():
        value = 0.1 * torch.randn(shape, generator=g)
        state["visual." + name] = value + 1 if "ln_" in name and name.endswith("weight") else value
    return state


@pytest.fixture
def open_clip_models(tmp_path):
    """A pretrained open_clip tower (.pt) and two experts (.pt and .safetensors)."""
    base = tower(0)
    torch.save(base, tmp_path / "pretrained.pt")
    torch.save(tower(1, base), tmp_path / "expert_a.pt")
    save_file(tower(2, base), str(tmp_path / "expert_b.safetensors"))
    return tmp_path / "pretrained.pt", [tmp_path / "expert_a.pt", tmp_path / "expert_b.safetensors"]


def hf_tower_without_projection(open_clip_file: Path, out: Path) -> Path:
    """The pretrained tower as the CLIP suites keep it: CLIPVisionModel, ``vision_model.`` keys, no projection."""
    open_clip_checkpoint_to_hf(open_clip_file, out.with_name(out.name + "-full"))
    out.mkdir()
    config = json.loads((out.with_name(out.name + "-full") / "config.json").read_text())
    config.pop("projection_dim")
    config["architectures"] = ["CLIPVisionModel"]
    (out / "config.json").write_text(json.dumps(config))
    state = load_file(str(out.with_name(out.name + "-full") / "model.safetensors"))
    state.pop("visual_projection.weight")
    save_file(state, str(out / "model.safetensors"))
    return out


def test_merge_takes_open_clip_experts(tmp_path, open_clip_models):
    pretrained, experts = open_clip_models
    out = tmp_path / "merged" / "ta"
    assert main(["merge", "--method", "task_arithmetic", "--pretrained", str(pretrained),
                 "--experts", *map(str, experts), "--param", "scaling=0.3", "--out", str(out)]) == 0
    record = json.loads((out / "merge.json").read_text())
    conversions = record["open_clip_conversions"]
    assert [Path(c["source"]).name for c in conversions] == ["pretrained.pt", "expert_a.pt", "expert_b.safetensors"]
    assert all(c["config"]["num_attention_heads"] == 2 and c["dropped"] == [] for c in conversions)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merge.json", "model.safetensors"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["ta"]  # temporary conversions removed
    # the same as converting first and merging HF folders
    hf = [tmp_path / "hf" / name for name in ("p", "a", "b")]
    for source, target in zip([pretrained, *experts], hf):
        open_clip_checkpoint_to_hf(source, target)
    assert main(["merge", "--method", "task_arithmetic", "--pretrained", str(hf[0]), "--experts", *map(str, hf[1:]),
                 "--param", "scaling=0.3", "--out", str(tmp_path / "reference")]) == 0
    merged, reference = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert set(merged) == set(reference) and all(torch.equal(merged[k], reference[k]) for k in merged)
    # and back to open_clip: the task-arithmetic merge of the open_clip tensors themselves
    assert main(["export", "--format", "open_clip", "--model", str(out), "--out", str(tmp_path / "merged.pt")]) == 0
    back, _ = read_state_dict(tmp_path / "merged.pt")
    states = [read_state_dict(path)[0] for path in [pretrained, *experts]]
    for key, value in back.items():
        expected = states[0][key] + 0.3 * sum(state[key] - states[0][key] for state in states[1:])
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_open_clip_experts_follow_an_hf_pretrained_model(tmp_path, open_clip_models):
    """An HF CLIPVisionModel pretrained tower (no projection, transformers 4 key names) with open_clip experts:
    the experts take its tensor names; their projection, which it lacks, is dropped and recorded."""
    pretrained, experts = open_clip_models
    hf = hf_tower_without_projection(pretrained, tmp_path / "hf_pretrained")
    assert main(["merge", "--method", "simple_average", "--pretrained", str(hf), "--experts", *map(str, experts),
                 "--out", str(tmp_path / "merged")]) == 0
    conversions = json.loads((tmp_path / "merged" / "merge.json").read_text())["open_clip_conversions"]
    assert [c["dropped"] for c in conversions] == [["visual_projection.weight"]] * 2
    assert set(load_file(str(tmp_path / "merged" / "model.safetensors"))) == set(load_file(str(hf / "model.safetensors")))


def test_quantize_and_export_take_open_clip(tmp_path, open_clip_models):
    pretrained, experts = open_clip_models
    g = torch.Generator().manual_seed(3)
    calib = []
    for task in ("a", "b"):
        calib.append(tmp_path / f"{task}.safetensors")
        save_file({"pixel_values": torch.randn(8, 3, PATCH * GRID, PATCH * GRID, generator=g)}, str(calib[-1]))
    out = tmp_path / "quant"
    assert main(["quantize", "--model", str(pretrained), "--method", "epmq", "--group-size", "64", "--batch-size", "4",
                 "--experts", *map(str, experts), "--calib", *map(str, calib), "--out", str(out), "--device", "cpu"]) == 0
    info = quantization_info(out)
    assert [Path(c["source"]).name for c in info["open_clip_conversions"]] == ["pretrained.pt", "expert_a.pt",
                                                                                "expert_b.safetensors"]
    assert info["model"] == str(pretrained) and [t["expert"] for t in info["tasks"]] == list(map(str, experts))
    assert len(info["layers"]) == 6 * LAYERS and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # export the quantized tower as open_clip: the dequantized weights, fused again
    assert main(["export", "--format", "open_clip", "--model", str(out), "--out", str(tmp_path / "q.safetensors")]) == 0
    back, metadata = read_state_dict(tmp_path / "q.safetensors")
    dequantized = dequantized_state(LazyCheckpoint(out), info)
    q, k, v = (dequantized[f"vision_model.encoder.layers.1.self_attn.{name}.weight"] for name in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(back["visual.transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert json.loads(metadata["epmq_convert"])["quantized"] is True
    assert set(back) == set(read_state_dict(pretrained)[0])


def test_bad_open_clip_input_to_merge_is_one_line(tmp_path, open_clip_models, capsys):
    pretrained, experts = open_clip_models
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    assert main(["merge", "--method", "simple_average", "--pretrained", str(pretrained),
                 "--experts", str(experts[0]), str(tmp_path / "module.pt"), "--out", str(tmp_path / "merged")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "module.pt" in error and "weights_only" in error
    assert not (tmp_path / "merged").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_experts_table_lists_open_clip_experts(tmp_path, open_clip_models, capsys):
    """A hub-clip suite whose experts.tsv rows are open_clip state dicts: a local .pt and a folder of safetensors."""
    pretrained, experts = open_clip_models
    folder = tmp_path / "laion-style"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text("{}")
    save_file(load_file(str(experts[1])), str(folder / "open_clip_model.safetensors"))
    table = tmp_path / "experts.tsv"
    table.write_text("suite\trole\ttask\tsource\trevision\tnote\n"
                     f"oc\tpretrained\t-\t{tmp_path / 'clip'}\tmain\t\n"
                     f"oc\texpert\teurosat\t{experts[0]}\tmain\topen_clip state dict\n"
                     f"oc\texpert\tmnist\t{folder}\tmain\topen_clip safetensors\n")
    config = tmp_path / "oc.yaml"
    config.write_text(json.dumps({"base": str(packaged_config("clip.base")), "suite": "oc", "builder": "hub-clip",
                                  "experts_table": str(table), "tasks": ["eurosat", "mnist"]}))
    suite_pretrained = hf_tower_without_projection(pretrained, tmp_path / "pretrained")
    for task in ("eurosat", "mnist"):
        out = tmp_path / "experts" / task
        assert main(["suite", "finetune", "--suite-config", str(config), "--pretrained", str(suite_pretrained),
                     "--task", task, "--out", str(out)]) == 0
        record = json.loads((out / "convert.json").read_text())
        assert record["dropped"] == ["visual_projection.weight"] and record["heads_from"] == f"config of {suite_pretrained}"
        assert set(LazyCheckpoint(out).keys()) == set(LazyCheckpoint(suite_pretrained).keys())
    assert main(["merge", "--method", "ties", "--pretrained", str(suite_pretrained), "--experts",
                 str(tmp_path / "experts" / "eurosat"), str(tmp_path / "experts" / "mnist"), "--out", str(tmp_path / "m")]) == 0
    # the pretrained row must stay a full HF CLIPModel: its text tower builds the zero-shot heads
    table.write_text(table.read_text().replace(str(tmp_path / "clip"), str(pretrained)))
    assert main(["suite", "pretrain", "--suite-config", str(config), "--out", str(tmp_path / "p")]) == 2
    assert "is an open_clip checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_quantize_of_open_clip_equals_quantize_of_its_conversion(tmp_path, open_clip_models):
    pretrained, _ = open_clip_models
    open_clip_checkpoint_to_hf(pretrained, tmp_path / "hf")
    for name, model in (("direct", pretrained), ("converted", tmp_path / "hf")):
        assert main(["quantize", "--model", str(model), "--method", "rtn", "--group-size", "64",
                     "--out", str(tmp_path / name), "--device", "cpu"]) == 0
    direct, converted = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("direct", "converted"))
    assert set(direct) == set(converted) and all(torch.equal(direct[k], converted[k]) for k in direct)
    assert "open_clip_conversions" in quantization_info(tmp_path / "direct")
    assert "open_clip_conversions" not in quantization_info(tmp_path / "converted")
