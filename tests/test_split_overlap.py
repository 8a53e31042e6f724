"""No model input is in two splits of any offline suite, judged on what the model sees.

* mini-clip8: the raw pool images (bytes) of pretraining, fine-tuning, calibration and test; the
  task transforms are applied after the split.
* mini-text4: each e-mail's first ``model.max_length`` tokens (the model truncates there).
* mini-llm3: the token ids of each prompt, every task.

For every pair of different splits, the union over the suite's tasks of one split's inputs and of
the other's must not intersect. Default configs (the tables' data); needs the suites' data.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest

from epmq.suites import mini_clip8
from epmq.suites.base import packaged_config
from epmq.suites.mini_llm3 import MiniLlm3
from epmq.suites.mini_llm3.data import SPLITS as LLM_SPLITS
from epmq.suites.mini_llm3.data import source_tokenizer, task_items
from epmq.suites.mini_text4.config import POOLS, load_config
from epmq.suites.mini_text4.data import load_emails, pool_assignment, task_split
from epmq.suites.mini_text4.model import load_tokenizer
from tests.suite_data import requires_spamassassin

pytestmark = pytest.mark.slow


def overlaps(inputs: dict[str, set]) -> dict[tuple[str, str], int]:
    """Shared inputs of every pair of splits."""
    return {(a, b): len(inputs[a] & inputs[b]) for a, b in itertools.combinations(inputs, 2)}


def digest(values) -> str:
    return hashlib.sha1(repr(list(values)).encode()).hexdigest()


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_mini_clip8_splits_share_no_image():
    cfg = mini_clip8.MiniClip8.load_config()
    sources = mini_clip8.data.Sources(cfg)
    inputs: dict[str, set] = {split: set() for split in mini_clip8.data.SPLITS}
    for source in cfg["data"]["splits"]:
        for split, indices in mini_clip8.data.source_splits(cfg, source, sources).items():
            images = sources[f"{mini_clip8.data.pool_name(source, split)}_images"][indices]
            inputs[split] |= {hashlib.sha1(image.tobytes()).hexdigest() for image in images}
    assert all(inputs.values())
    assert overlaps(inputs) == dict.fromkeys(overlaps(inputs), 0)


@requires_spamassassin
def test_mini_text4_splits_share_no_token_sequence():
    cfg = load_config()
    emails = load_emails(cfg)
    pools = pool_assignment(cfg, emails)
    tokenizer = load_tokenizer(cfg)
    inputs: dict[str, set] = {split: set() for split in POOLS}
    for task in cfg["tasks"]:
        for split in POOLS:
            part = task_split(cfg, task, split, emails, pools)
            ids = tokenizer(part.texts, truncation=True, max_length=cfg["model"]["max_length"])["input_ids"]
            inputs[split] |= {digest(sequence) for sequence in ids}
    assert all(inputs.values())
    assert overlaps(inputs) == dict.fromkeys(overlaps(inputs), 0)


@requires_spamassassin
def test_mini_llm3_splits_share_no_prompt():
    cfg = MiniLlm3.load_config(packaged_config("mini-llm3"))
    tokenizer = source_tokenizer(cfg)
    inputs: dict[str, set] = {split: set() for split in LLM_SPLITS}
    for task in cfg["tasks"]:
        for split, docs in task_items(cfg, task, tokenizer).items():
            inputs[split] |= {digest(tokenizer(doc["prompt"], add_special_tokens=False)["input_ids"]) for doc in docs}
    assert all(inputs.values())
    assert overlaps(inputs) == dict.fromkeys(overlaps(inputs), 0)
