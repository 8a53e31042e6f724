"""``hub-t5``: FLAN-T5-base on eight GLUE tasks (paper §5.1, Table 3).

Text to text: calibration is the prompt with its teacher-forced target; evaluation is greedy
decoding scored by exact match (Spearman for STS-B) on the validation splits.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from epmq.suites.base import register_suite
from epmq.suites.hub.base import HubSuite, split_dir


@register_suite("hub-t5")
class HubT5Suite(HubSuite):
    """FLAN-T5 on GLUE: the whole seq2seq model is merged and quantized."""

    family_keys = ("calib.max_length",)

    def data_splits(self, task, local):
        from evals.glue import load_glue_task

        return {"train": load_glue_task(task, "train", local), "validation": load_glue_task(task, "validation", local)}

    def calibration_inputs(self, task, samples, seed, train, pretrained):
        """Prompts and targets, each truncated to ``calib.max_length`` tokens."""
        from transformers import AutoTokenizer

        from evals.datasets import glue_calibration
        from evals.local_data import load_local

        tokenizer = AutoTokenizer.from_pretrained(pretrained)
        dataset = load_local(train, "train") if train else None
        return glue_calibration(task, tokenizer, samples=samples, seed=seed, dataset=dataset,
                                local_path=None if dataset is not None else self.cfg["datasets"].get(task),
                                max_length=self.cfg["calib"]["max_length"])

    def evaluate(self, model_dir, tasks, data_dir, suite_dir):
        """Greedy decoding on the validation splits, with the pretrained model's tokenizer."""
        from evals.glue import evaluate_glue

        cfg, suite_dir = self.cfg, Path(suite_dir)
        data = {t: p for t in tasks if (p := split_dir(data_dir, t, "validation") or cfg["datasets"].get(t))}
        with tempfile.TemporaryDirectory() as out:
            return evaluate_glue(model_dir, tasks, out, tokenizer_dir=suite_dir / "pretrained", data=data,
                                 batch_size=cfg["eval"]["batch_size"], limit=cfg["eval"]["limit"], device=self.device())
