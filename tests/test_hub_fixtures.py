"""The fetch path against hub-faithful fixtures (scripts/make_hub_fixtures.py) in a real HF cache, offline.

Each stage runs as ``python -m epmq ...`` in a subprocess with ``HF_HOME`` at the fixtures and
``HF_HUB_OFFLINE=1``, so huggingface_hub resolves ``refs/main`` -> snapshot -> blobs as on a cluster.
Issue 12 items: 1 (CLIP position_ids), 2 (.bin-only repos), 3 (lm-eval extras, HF_ALLOW_CODE_EVAL),
6 (recorded expert dtype cast); issue 13 item 5 (one store per model, links, locks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epmq.hub.experts_table import read_experts_table
from epmq.hub.store import FETCH_RECORD, HubFetchError, fetch, fetch_to_store
from epmq.suites.base import packaged_config

REPO = Path(__file__).resolve().parents[1]


def _fixtures_module():
    spec = importlib.util.spec_from_file_location("make_hub_fixtures", REPO / "scripts" / "make_hub_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(path: Path, suite: str, pretrained: str, experts: dict[str, str]) -> Path:
    rows = [f"{suite}\tpretrained\t-\t{pretrained}\tmain\t"] + [f"{suite}\texpert\t{t}\t{s}\tmain\t" for t, s in experts.items()]
    path.write_text("suite\trole\ttask\tsource\trevision\tnote\n" + "\n".join(rows) + "\n")
    return path


def _run(*args, hf_home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "epmq", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def clip_hub(tmp_path_factory):
    """Both CLIP pretrained repositories and one FusionBench expert each, in an HF cache."""
    root = tmp_path_factory.mktemp("clip-hub")
    fixtures = _fixtures_module()
    experts = {"eurosat": "tanganke/clip-vit-base-patch32_eurosat", "mnist": "tanganke/clip-vit-large-patch14_mnist"}
    table = _table(root / "t.tsv", "s", "openai/clip-vit-base-patch32", {"eurosat": experts["eurosat"]})
    entries = read_experts_table(table)
    table_l14 = _table(root / "l.tsv", "s", "openai/clip-vit-large-patch14", {"mnist": experts["mnist"]})
    entries += read_experts_table(table_l14)
    fixtures.clip_repos(root / "hf", entries, root / "build")
    return root


def _clip_suite(root: Path, name: str, pretrained: str, task: str, expert: str) -> Path:
    table = _table(root / f"{name}.tsv", name, pretrained, {task: expert})
    config = root / f"{name}.yaml"
    config.write_text(json.dumps({"base": str(packaged_config("clip.base")), "suite": name, "builder": "hub-clip",
                                  "experts_table": str(table), "models_dir": str(root / "store"), "tasks": [task],
                                  "eval": {"device": "cpu"}}))
    return config


@pytest.mark.slow
def test_clip_position_ids_are_dropped_and_recorded(clip_hub, tmp_path):
    """Item 1: openai's file has both position_ids buffers, FusionBench's experts none; fetch, align and merge work."""
    root = clip_hub
    config = _clip_suite(root, "l14", "openai/clip-vit-large-patch14", "mnist", "tanganke/clip-vit-large-patch14_mnist")
    out = tmp_path / "results"
    done = _run("suite", "pretrain", "--suite-config", str(config), "--out", str(out / "pretrained"), hf_home=root / "hf", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "pretrained" / FETCH_RECORD).read_text())
    assert set(record["dropped_nonpersistent_buffers"]) == {"text_model.embeddings.position_ids",
                                                             "vision_model.embeddings.position_ids"}
    assert record["kind"] == "hub" and len(record["resolved_commit"]) == 40
    assert "vision_model.embeddings.position_ids" not in load_file(str(out / "pretrained" / "model.safetensors"))
    done = _run("suite", "finetune", "--suite-config", str(config), "--pretrained", str(out / "pretrained"),
                "--task", "mnist", "--out", str(out / "experts" / "mnist"), hf_home=root / "hf", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run("merge", "--method", "task_arithmetic", "--pretrained", str(out / "pretrained"),
                "--experts", str(out / "experts" / "mnist"), "--out", str(out / "merged"), hf_home=root / "hf", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]


def test_bin_only_repo_is_converted_once_with_both_hashes(clip_hub, tmp_path):
    """Item 2: openai/clip-vit-base-patch32 with pytorch_model.bin only: weights-only load, safetensors in the store."""
    root = clip_hub
    snapshot = next((root / "hf" / "hub" / "models--openai--clip-vit-base-patch32" / "snapshots").iterdir())
    assert not list(snapshot.glob("*.safetensors")) and (snapshot / "pytorch_model.bin").exists()
    config = _clip_suite(root, "b32", "openai/clip-vit-base-patch32", "eurosat", "tanganke/clip-vit-base-patch32_eurosat")
    out = tmp_path / "results"
    done = _run("suite", "pretrain", "--suite-config", str(config), "--out", str(out / "pretrained"), hf_home=root / "hf", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    store = root / "store" / "openai--clip-vit-base-patch32@main"
    record = json.loads((store / FETCH_RECORD).read_text())
    converted = record["converted_from_bin"]
    assert list(converted["bin"]) == ["pytorch_model.bin"] and list(converted["safetensors"]) == ["model.safetensors"]
    assert all(len(h) == 64 for h in [*converted["bin"].values(), *converted["safetensors"].values()])
    assert converted["loader"] == "torch.load(weights_only=True)"
    original = torch.load(snapshot / "pytorch_model.bin", weights_only=True)
    stored = load_file(str(store / "model.safetensors"))
    assert set(stored) == set(original) and all(torch.equal(stored[k], original[k]) for k in original)
    done = _run("suite", "finetune", "--suite-config", str(config), "--pretrained", str(out / "pretrained"),
                "--task", "eurosat", "--out", str(out / "experts" / "eurosat"), hf_home=root / "hf", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]


def test_bin_with_more_than_tensors_is_refused(tmp_path):
    """Item 2: the .bin is never fully unpickled: an object that is not a tensor stops the fetch."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    torch.save({"w": torch.ones(2), "payload": argparse.Namespace(x=1)}, source / "pytorch_model.bin")
    with pytest.raises(HubFetchError, match="weights-only"):
        fetch(source, "main", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_store_is_shared_linked_and_locked(tmp_path):
    """Issue 13 item 5: one store folder per model, suites get hard links, parallel fetches wait for one another."""
    from epmq.suites.hub.llama import HubLlamaSuite

    fixtures = _fixtures_module()
    from epmq.testing.paper_models import llama_tokenizer, perturbed, tiny_llama_model

    model = tiny_llama_model(llama_tokenizer(["a b c d e f"] * 4, vocab_size=300))
    base, expert = tmp_path / "hub" / "base", tmp_path / "hub" / "expert"
    fixtures._save_model(model, base, shards=2)
    fixtures._save_model(perturbed(model, seed=1), expert, shards=2)
    outs = []
    for suite in ("a", "b"):
        table = _table(tmp_path / f"{suite}.tsv", suite, str(base), {"math": str(expert)})
        cfg = {"suite": suite, "builder": "hub-llama", "experts_table": str(table), "tasks": {"math": {}},
               "models_dir": str(tmp_path / "store")}
        outs.append(tmp_path / suite / "experts" / "math")
        HubLlamaSuite(cfg).build_expert(base, "math", outs[-1])
    from epmq.hub.store import resource_name

    name = resource_name(str(expert))
    assert [p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")] == [name]
    shard = "model-00001-of-00002.safetensors"
    inodes = {(out / shard).stat().st_ino for out in outs} | {(tmp_path / "store" / name / shard).stat().st_ino}
    assert len(inodes) == 1  # links, not copies
    assert json.loads((outs[0] / FETCH_RECORD).read_text())["store"] == str((tmp_path / "store" / name).resolve())
    # two processes fetch the same model at once: both succeed, the second reuses the first's folder
    script = ("import sys; from epmq.hub.store import fetch_to_store; "
              f"print(fetch_to_store({str(expert)!r}, 'main', {str(tmp_path / 'store2')!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), results
    assert [p.name for p in (tmp_path / "store2").iterdir() if not p.name.startswith(".")] == [name]
    assert fetch_to_store(str(expert), "main", tmp_path / "store2") == tmp_path / "store2" / name


def test_llama_experts_in_another_dtype_need_the_recorded_cast(tmp_path):
    """Item 6: bf16 base (meta-llama), fp32 experts (MergeBench): refused unless --cast-experts, which is recorded."""
    from epmq.cli import main

    fixtures = _fixtures_module()
    from epmq.testing.paper_models import llama_tokenizer, perturbed, tiny_llama_model

    model = tiny_llama_model(llama_tokenizer(["a b c d e f"] * 4, vocab_size=300))
    fixtures._save_model(model, tmp_path / "base", dtype=torch.bfloat16, shards=2)
    for seed in (1, 2):
        fixtures._save_model(perturbed(model.float(), seed=seed), tmp_path / f"e{seed}", dtype=torch.float32, shards=2)
    args = ["merge", "--method", "task_arithmetic", "--pretrained", str(tmp_path / "base"),
            "--experts", str(tmp_path / "e1"), str(tmp_path / "e2")]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2 and not (tmp_path / "refused").exists()
    assert main([*args, "--cast-experts", "--out", str(tmp_path / "merged")]) == 0
    record = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert record["cast_experts"] is True
    tensors = sum(len(load_file(str(path))) for path in (tmp_path / "e1").glob("*.safetensors"))
    assert list(record["expert_casts"].values()) == [{"F32->BF16": tensors}] * 2
    merged = load_file(str(tmp_path / "merged" / "model-00001-of-00002.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in merged.values() if t.is_floating_point())


def test_workflow_casts_where_the_paper_did():
    """Item 6: the switch is off by default (offline suites) and on for the Llama suites of config/paper.yaml."""
    import yaml

    schema = yaml.safe_load((REPO / "rules" / "schemas" / "config.schema.yaml").read_text())
    assert schema["properties"]["suites"]["additionalProperties"]["properties"]["cast_experts"]["default"] is False
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    assert {name for name, s in paper["suites"].items() if s.get("cast_experts")} == {"llama-3b", "llama-8b"}
    assert "--cast-experts" in (REPO / "rules" / "common.smk").read_text()


def test_lm_eval_task_extras_are_declared_and_importable():
    """Item 3: lm-eval's ifeval and math extras are in the eval extra, pinned, and their task modules import."""
    eval_extra = " ".join(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["eval"])
    constraints = (REPO / "constraints.txt").read_text()
    for package in ("langdetect", "immutabledict", "math-verify", "antlr4-python3-runtime"):
        assert package in eval_extra and f"{package}==" in constraints
    import langdetect  # noqa: F401
    import math_verify  # noqa: F401

    importlib.import_module("lm_eval.tasks.ifeval.instructions")
    importlib.import_module("lm_eval.tasks.minerva_math.utils")


@pytest.mark.parametrize("allow_code", [True, False])
def test_prefetch_sets_code_eval_only_where_allowed(monkeypatch, allow_code):
    """Item 3: lm-eval's code tasks load code_eval at import: HF_ALLOW_CODE_EVAL=1 during the prefetch iff allow_code."""
    import lm_eval.tasks

    from epmq.suites.hub.llama import HubLlamaSuite

    seen = {}
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kwargs: None)
    monkeypatch.setattr(lm_eval.tasks, "get_task_dict",
                        lambda names, manager: seen.update(names=names, env=os.environ.get("HF_ALLOW_CODE_EVAL")))
    cfg = {"tasks": {"math": {}}, "eval_tasks": ["humaneval", "gsm8k"],
           "eval": {"allow_code": allow_code, "chat": False, "include_path": None}}
    HubLlamaSuite(cfg).prefetch_evaluation()
    assert seen["names"] == ["humaneval", "gsm8k"]
    assert seen["env"] == ("1" if allow_code else None)
    assert "HF_ALLOW_CODE_EVAL" not in os.environ
