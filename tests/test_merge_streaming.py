"""Streaming merges of safetensors checkpoints: equality with the in-memory path, output layout,
the CLI, and every bad input refused with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epmq.cli import main as cli_main
from epmq.io import CheckpointError, OutputError, sha256_file
from epmq.merge import MERGE_RECORD, MERGERS, MergeError, merge_checkpoints

# A tiny CLIP-like vision tower: block weights in both WUDI forms (d_in < d_out and d_out < d_in),
# a 2-D table outside the blocks, 1-D tensors, a bf16 tensor and an integer buffer.
SHAPES = {
    "vision_model.embeddings.position_embedding.weight": ((5, 8), torch.float32),
    "vision_model.encoder.layers.0.self_attn.q_proj.weight": ((8, 8), torch.float32),
    "vision_model.encoder.layers.0.self_attn.q_proj.bias": ((8,), torch.float32),
    "vision_model.encoder.layers.0.mlp.fc1.weight": ((24, 8), torch.float32),
    "vision_model.encoder.layers.0.mlp.fc2.weight": ((8, 24), torch.bfloat16),
    "vision_model.post_layernorm.weight": ((8,), torch.float32),
    "vision_model.embeddings.position_ids": ((1, 5), torch.int64),
}
CONFIG = {"model_type": "clip_vision_model", "hidden_size": 8}



def random_state_dict(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state_dict = {}
    for key, (shape, dtype) in SHAPES.items():
        if dtype.is_floating_point:
            state_dict[key] = torch.randn(shape, generator=generator).to(dtype)
        else:
            state_dict[key] = torch.arange(shape[-1]).expand(shape).contiguous()
    return state_dict


def perturbed(state_dict: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """An expert: multiples of 1/64 added, so that many |tau| tie (TIES thresholds at a tie)."""
    expert = {}
    for key, value in state_dict.items():
        if value.is_floating_point():
            step = torch.randint(-4, 5, value.shape, generator=generator).float() / 64
            expert[key] = (value.float() + step).to(value.dtype)
        else:
            expert[key] = value.clone()
    return expert


def save_checkpoint(directory: Path, state_dict: dict, sharded: bool = False) -> Path:
    """An HF save_pretrained-like directory: config.json plus one safetensors file or two shards."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    if not sharded:
        save_file(state_dict, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    keys = list(state_dict)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({key: state_dict[key] for key in shard_keys}, directory / name, metadata={"format": "pt"})
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state_dict.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A sharded pretrained checkpoint and three single-file experts, with their state dicts."""
    root = tmp_path_factory.mktemp("checkpoints")
    generator = torch.Generator().manual_seed(0)
    pretrained = random_state_dict(generator)
    experts = [perturbed(pretrained, generator) for _ in range(3)]
    pretrained_dir = save_checkpoint(root / "pretrained", pretrained, sharded=True)
    expert_dirs = [save_checkpoint(root / f"expert{i}", expert) for i, expert in enumerate(experts)]
    return pretrained_dir, expert_dirs, pretrained, experts


def load_merged(directory: Path) -> dict[str, torch.Tensor]:
    merged = {}
    for file in sorted(directory.glob("*.safetensors")):
        merged.update(load_file(file))
    return merged


CASES = [
    ("simple_average", {}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"scaling": 1.0}),
    ("ties", {}),
    ("ties", {"top_k": 0.37, "merge_func": "mean"}),
    ("ties", {"top_k": 1.0}),
    ("wudi", {"steps": 25, "lr": 1e-3}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_streaming_equals_in_memory(checkpoints, tmp_path, method, params):
    pretrained_dir, expert_dirs, pretrained, experts = checkpoints
    out = merge_checkpoints(method, pretrained_dir, expert_dirs, tmp_path / "merged", params)
    streamed = load_merged(out)
    in_memory = MERGERS[method](pretrained, experts, **params)
    assert sorted(streamed) == sorted(in_memory) == sorted(pretrained)
    for key, value in in_memory.items():
        assert streamed[key].dtype == value.dtype == pretrained[key].dtype, key
        if method == "wudi":  # same function on the same tensors; tolerance in case of kernel changes
            torch.testing.assert_close(streamed[key], value, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(streamed[key], value), key  # exact, TIES's streamed thresholds included


def test_output_mirrors_the_pretrained_layout_and_records_the_merge(checkpoints, tmp_path):
    pretrained_dir, expert_dirs, _, _ = checkpoints
    (pretrained_dir / "pytorch_model.bin").write_bytes(b"stale weights")  # never copied
    out = merge_checkpoints("ties", pretrained_dir, expert_dirs, tmp_path / "merged", {"scaling": 0.5})
    (pretrained_dir / "pytorch_model.bin").unlink()
    assert sorted(path.name for path in out.iterdir()) == [
        "config.json",
        MERGE_RECORD,
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for key, shard in index["weight_map"].items():
        assert key in load_file(out / shard)
    assert json.loads((out / "config.json").read_text()) == CONFIG
    record = json.loads((out / MERGE_RECORD).read_text())
    assert record["method"] == "ties"
    assert record["params"] == {"scaling": 0.5, "top_k": 0.2, "merge_func": "sum"}
    assert record["pretrained"]["path"] == str(pretrained_dir.resolve())
    shard = "model-00001-of-00002.safetensors"
    assert record["pretrained"]["sha256"][shard] == sha256_file(pretrained_dir / shard)
    assert [expert["path"] for expert in record["experts"]] == [str(path.resolve()) for path in expert_dirs]
    assert record["experts"][0]["sha256"]["model.safetensors"] == sha256_file(expert_dirs[0] / "model.safetensors")
    assert {"torch", "transformers", "git_commit"} <= set(record["provenance"])


def test_cli_merges_a_real_hf_model_that_transformers_loads(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=8, patch_size=4)
    torch.manual_seed(0)
    models = [CLIPVisionModel(config) for _ in range(3)]
    directories = []
    for position, model in enumerate(models):
        directories.append(tmp_path / f"model{position}")
        model.save_pretrained(directories[-1])
    out = tmp_path / "merged"
    code = cli_main(["merge", "--method", "task_arithmetic", "--pretrained", str(directories[0]),
                     "--experts", *map(str, directories[1:]), "--param", "scaling=0.5", "--out", str(out)])
    assert code == 0
    merged = CLIPVisionModel.from_pretrained(out).state_dict()
    expected = MERGERS["task_arithmetic"](models[0].state_dict(), [m.state_dict() for m in models[1:]], scaling=0.5)
    assert all(torch.equal(merged[key], expected[key]) for key in expected)


# --- bad inputs: a clear error and nothing written ------------------------------------------------


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not [path.name for path in out.parent.iterdir() if path.name.startswith(f".{out.name}.")]


def write_expert(tmp_path: Path, pretrained: dict, change) -> Path:
    expert = {key: value.clone() for key, value in pretrained.items()}
    change(expert)
    return save_checkpoint(tmp_path / "bad_expert", expert)


def put(key, value):
    return lambda expert: expert.__setitem__(key, value)


Q = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
BAD_EXPERTS = [
    ("missing", lambda expert: expert.pop(Q), f"lacks tensor '{Q}'"),
    ("extra", put("extra.weight", torch.zeros(2)), "has tensor 'extra.weight' that the pretrained model lacks"),
    ("shape", put(Q, torch.zeros(8, 7)), rf"tensor '{Q}' of expert .*bad_expert has shape \[8, 7\]"),
    ("dtype", put(Q, torch.zeros(8, 8, dtype=torch.float16)), f"tensor '{Q}' of expert .* has dtype F16"),
    ("nan", put(Q, torch.full((8, 8), float("nan"))), f"tensor '{Q}' of expert .*bad_expert contains NaN or Inf"),
    ("inf", put(Q, torch.full((8, 8), float("-inf"))), "contains NaN or Inf"),
]


@pytest.mark.parametrize("method", sorted(MERGERS))
@pytest.mark.parametrize(("name", "change", "message"), BAD_EXPERTS, ids=[case[0] for case in BAD_EXPERTS])
def test_bad_expert_is_refused_and_nothing_is_written(checkpoints, tmp_path, method, name, change, message):
    pretrained_dir, expert_dirs, pretrained, _ = checkpoints
    bad = write_expert(tmp_path, pretrained, change)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match=message):
        merge_checkpoints(method, pretrained_dir, [expert_dirs[0], bad], out, {"steps": 2} if method == "wudi" else {})
    assert_nothing_written(out)


def test_nan_in_the_pretrained_model_is_refused(checkpoints, tmp_path):
    _, expert_dirs, pretrained, _ = checkpoints
    bad = dict(pretrained, **{"vision_model.post_layernorm.weight": torch.full((8,), float("nan"))})
    bad_dir = save_checkpoint(tmp_path / "bad_pretrained", bad)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="'vision_model.post_layernorm.weight' of pretrained .* contains NaN"):
        merge_checkpoints("simple_average", bad_dir, expert_dirs, out)
    assert_nothing_written(out)


def test_non_finite_result_is_refused(tmp_path):
    big = {"layers.0.fc.weight": torch.full((2, 2), 3e38)}
    pretrained_dir = save_checkpoint(tmp_path / "pretrained", {"layers.0.fc.weight": torch.zeros(2, 2)})
    expert_dir = save_checkpoint(tmp_path / "expert", big)
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="produced NaN or Inf in tensor 'layers.0.fc.weight'"):
        merge_checkpoints("task_arithmetic", pretrained_dir, [expert_dir, expert_dir], out, {"scaling": 1.0})
    assert_nothing_written(out)


def test_missing_truncated_and_absent_inputs_are_refused(checkpoints, tmp_path):
    pretrained_dir, expert_dirs, pretrained, _ = checkpoints
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="at least one expert"):
        merge_checkpoints("ties", pretrained_dir, [], out)
    with pytest.raises(CheckpointError, match="not found"):
        merge_checkpoints("ties", pretrained_dir, [tmp_path / "no_such_expert"], out)
    truncated = save_checkpoint(tmp_path / "truncated", pretrained)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        merge_checkpoints("ties", pretrained_dir, [expert_dirs[0], truncated], out)
    shard = pretrained_dir / "model-00002-of-00002.safetensors"
    broken = tmp_path / "broken_pretrained"
    broken.mkdir()
    for path in pretrained_dir.iterdir():
        if path != shard:
            (broken / path.name).write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="missing shard model-00002-of-00002.safetensors"):
        merge_checkpoints("ties", broken, expert_dirs, out)
    with pytest.raises(OutputError, match="is the input"):
        merge_checkpoints("ties", pretrained_dir, expert_dirs, expert_dirs[0])
    with pytest.raises(ValueError, match="invalid configuration"):
        merge_checkpoints("ties", pretrained_dir, expert_dirs, out, {"top_k": 0})
    assert_nothing_written(out)


def test_failed_merge_leaves_an_existing_output_untouched(checkpoints, tmp_path):
    pretrained_dir, expert_dirs, pretrained, _ = checkpoints
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous").write_text("kept")
    bad = write_expert(tmp_path, pretrained, put(Q, torch.full((8, 8), float("nan"))))
    with pytest.raises(MergeError):
        merge_checkpoints("task_arithmetic", pretrained_dir, [bad], out, overwrite=True)
    assert [path.name for path in out.iterdir()] == ["previous"]


def test_cli_reports_bad_input_on_one_line_with_exit_code_2(checkpoints, tmp_path):
    pretrained_dir, expert_dirs, pretrained, _ = checkpoints
    bad = write_expert(tmp_path, pretrained, put(Q, torch.zeros(8, 7)))
    out = tmp_path / "merged"
    result = subprocess.run(
        [sys.executable, "-m", "epmq", "merge", "--method", "ties", "--pretrained", str(pretrained_dir),
         "--experts", str(expert_dirs[0]), str(bad), "--param", "top_k=0.1", "--out", str(out)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"tensor '{Q}'" in errors[0] and "shape [8, 7]" in errors[0]
    assert_nothing_written(out)
    assert cli_main(["merge", "--method", "ties", "--pretrained", str(pretrained_dir), "--experts",
                     str(expert_dirs[0]), "--param", "top_k", "--out", str(out)]) == 2
    assert cli_main(["merge", "--method", "ties", "--pretrained", str(pretrained_dir), "--experts",
                     str(expert_dirs[0]), "--param", "alpha=1", "--out", str(out)]) == 2
    assert_nothing_written(out)
