"""Fetching models (local paths, the HF cache offline, the offline error), the experts table, the CLIP split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from epmq.hub.experts_table import EXPERTS_TABLE, read_experts_table
from epmq.hub.layout import align_checkpoint, split_clip, vision_key_prefix
from epmq.hub.store import FETCH_RECORD, HubFetchError, fetch, is_local_source, resource_name
from epmq.merge.registry import MergeError
from epmq.merge.streaming import merge_checkpoints
from evals.clip_tasks import TALL20, TASKS
from epmq.testing.paper_models import (
    clip_tokenizer,
    perturbed,
    save_with_prefix,
    tiny_clip_model,
)

REPO = Path(__file__).resolve().parents[1]


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    save_file({"w": torch.ones(2, 2)}, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "x"}')
    (path / "tokenizer.json").write_text("{}")
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "pytorch_model.bin").write_bytes(b"not fetched")
    (path / "original").mkdir()
    (path / "original" / "params.json").write_text("{}")
    return path


def test_fetch_local_folder(tmp_path):
    source = _model_folder(tmp_path / "src")
    out = fetch(source, "main", tmp_path / "out", label="suite expert t")
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["config.json", FETCH_RECORD, "merges.txt", "model.safetensors", "tokenizer.json"]
    record = json.loads((out / FETCH_RECORD).read_text())
    assert record["kind"] == "local" and record["source"] == str(source.resolve())
    assert len(record["files"]["model.safetensors"]["sha256"]) == 64 and "provenance" in record
    assert torch.equal(load_file(str(out / "model.safetensors"))["w"], torch.ones(2, 2))


def test_fetch_refuses_folders_without_safetensors(tmp_path):
    source = tmp_path / "bin-only"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(HubFetchError, match="pytorch_model.bin cannot be read as a weights-only torch checkpoint"):
        fetch(source, "main", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(HubFetchError, match="does not exist"):
        fetch(tmp_path / "absent" / "x" / "y", "main", tmp_path / "out2")


def test_fetch_from_hub_cache_offline_records_commit(tmp_path):
    """A hub id already in the HF cache is fetched offline; the commit 'main' resolved to is recorded."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--owner--model"
    snapshot = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _model_folder(snapshot)
    out = fetch("owner/model", "main", tmp_path / "out", cache_dir=tmp_path / "cache", local_files_only=True)
    record = json.loads((out / FETCH_RECORD).read_text())
    assert record["kind"] == "hub" and record["resolved_commit"] == commit and record["revision_requested"] == "main"
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    assert not (out / "original").exists()


def test_fetch_offline_without_cache_is_one_clear_error(tmp_path):
    started = time.time()
    with pytest.raises(HubFetchError) as error:
        fetch("epmq-test/no-such-model", "main", tmp_path / "out", cache_dir=tmp_path / "empty-cache",
              local_files_only=True, label="clip-b32-ta8 expert sun397")
    message = str(error.value)
    assert "epmq-test/no-such-model@main" in message and "clip-b32-ta8 expert sun397" in message
    assert str(EXPERTS_TABLE) in message and "local folder" in message
    assert time.time() - started < 5 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fetch_cli_offline_env(tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache: `python -m epmq.hub fetch` fails fast with one line, exit 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "epmq.hub", "fetch", "--source", "epmq-test/no-such-model",
                           "--out", str(tmp_path / "out")], check=False, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("epmq hub: error:")]
    assert len(lines) == 1 and "epmq-test/no-such-model" in lines[0] and "config/experts.tsv" in lines[0]
    assert "Traceback" not in done.stderr and time.time() - started < 30


def test_source_kinds():
    assert not is_local_source("tanganke/clip-vit-base-patch32_sun397")
    assert is_local_source("/models/x") and is_local_source("./x") and is_local_source("resources/models/x")
    assert is_local_source("local:owner/name")
    assert resource_name("tanganke/flan-t5-base_glue-cola") == "tanganke--flan-t5-base_glue-cola@main"


def test_experts_table():
    rows = read_experts_table(REPO / "config" / "experts.tsv")
    suites = {row.suite for row in rows}
    assert {"clip-b32-ta8", "clip-b32-tall14", "clip-b32-tall20", "clip-l14-ta8", "clip-l14-tall14",
            "clip-l14-tall20", "flan-t5-glue8", "llama-3b", "llama-8b"} <= suites
    for backbone, pretrained in (("b32", "openai/clip-vit-base-patch32"), ("l14", "openai/clip-vit-large-patch14")):
        tall20 = [row for row in rows if row.suite == f"clip-{backbone}-tall20"]
        assert [row.source for row in tall20 if row.role == "pretrained"] == [pretrained]
        experts = [row for row in tall20 if row.role == "expert"]
        assert [row.task for row in experts] == list(TALL20)
        assert all(row.source == TASKS[row.task].expert_id(backbone) and row.revision == "main" for row in experts)
    glue = [row for row in rows if row.suite == "flan-t5-glue8" and row.role == "expert"]
    assert [row.source for row in glue] == [f"tanganke/flan-t5-base_glue-{t}" for t in
                                            ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")]
    llama = [row for row in rows if row.suite.startswith("llama")]
    assert llama and all(row.placeholder for row in llama)
    assert {row.task for row in llama if row.role == "expert"} == {"instruction", "coding", "math", "multilingual"}


@pytest.fixture(scope="module")
def hub_clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubclip")
    tokenizer = clip_tokenizer(["a photo of a cat.", "a photo of a dog."])
    model = tiny_clip_model(tokenizer)
    model.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root, model


def test_split_clip_and_merge_conventions(hub_clip, tmp_path):
    from transformers import CLIPVisionModel

    root, model = hub_clip
    # FusionBench-style experts: transformers 4 CLIPVisionModel files, keys prefixed with vision_model.
    experts = []
    for index in range(2):
        tower = CLIPVisionModel(model.config.vision_config)
        tower.load_state_dict(perturbed(model.vision_model, seed=index).state_dict())
        experts.append(save_with_prefix(tower, tmp_path / f"expert{index}", "vision_model."))
    assert vision_key_prefix(experts[0]) == "vision_model."

    # The tower as transformers 5 saves it has no prefix: the merge refuses the mismatch ...
    plain = tmp_path / "plain-tower"
    CLIPVisionModel(model.config.vision_config).save_pretrained(plain)
    assert vision_key_prefix(plain) == ""
    with pytest.raises(MergeError, match="lacks tensor"):
        merge_checkpoints("simple_average", plain, experts, tmp_path / "bad")

    # ... the split writes the experts' convention, and the merge goes through.
    vision, zeroshot = split_clip(root / "clip", tmp_path / "prepared", like=experts[0])
    assert vision_key_prefix(vision) == "vision_model."
    merge_checkpoints("simple_average", vision, experts, tmp_path / "merged")
    split_record = json.loads((vision / "clip_split.json").read_text())
    assert split_record["vision_key_prefix"] == "vision_model." and split_record["prefix_from"].startswith("expert")

    # transformers 5 loads the prefixed tower; it equals CLIPModel's own vision tower
    tower = CLIPVisionModel.from_pretrained(vision).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixel_values=pixels).pooler_output,
                                   model.vision_model(pixel_values=pixels).pooler_output)
    zeroshot_keys = set(load_file(str(zeroshot / "model.safetensors")))
    assert {"visual_projection.weight", "text_projection.weight", "logit_scale"} <= zeroshot_keys
    assert not any(key.startswith("vision_model.") for key in zeroshot_keys)
    assert (zeroshot / "tokenizer.json").exists()

    # prefix-free experts: split follows them; align rewrites one convention into the other
    vision2, _ = split_clip(root / "clip", tmp_path / "prepared2", like=plain)
    assert vision_key_prefix(vision2) == ""
    aligned = align_checkpoint(plain, experts[0], tmp_path / "aligned")
    assert set(load_file(str(aligned / "model.safetensors"))) == set(load_file(str(experts[0] / "model.safetensors")))
