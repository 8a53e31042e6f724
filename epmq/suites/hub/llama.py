"""``hub-llama``: Llama-3.x experts (instruction, coding, math, multilingual) merged by task
arithmetic (paper Table 4, Appendix E).

Calibration on the experts' training data (``evals.datasets.LLM_CALIBRATION``, an assumption: the
paper does not say); evaluation with lm-eval on the paper's benchmarks (``eval_tasks``), which are
not the experts' tasks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from epmq.suites.base import register_suite
from epmq.suites.hub.base import HubSuite


@register_suite("hub-llama")
class HubLlamaSuite(HubSuite):
    """Llama experts merged and quantized; lm-eval benchmarks."""

    family_keys = ("eval_tasks", "calib.max_length", "eval.num_fewshot", "eval.chat", "eval.allow_code",
                   "eval.include_path")

    def eval_tasks(self):
        """The lm-eval benchmarks (``eval_tasks``), not the experts' tasks."""
        return list(self.cfg["eval_tasks"])

    def data_splits(self, task, local):
        from evals.datasets import llm_calibration_texts

        return {"train": llm_calibration_texts(task, "train", local)[0]}

    def prefetch_evaluation(self):
        """Load lm-eval's tasks once so their datasets sit in the HF cache for offline compute nodes.

        lm-eval's humaneval/mbpp task modules load ``code_eval`` when imported, which refuses unless
        ``HF_ALLOW_CODE_EVAL=1``: set here (as in evaluation) only when the suite says ``allow_code: true``.
        """
        from lm_eval.tasks import TaskManager, get_task_dict

        from evals.lm_eval_runner import code_eval_environment, task_mapping

        options = self.cfg["eval"]
        include = options["include_path"]
        manager = TaskManager(include_path=include) if include else TaskManager()
        with code_eval_environment(options["allow_code"]):
            get_task_dict(list(task_mapping(self.eval_tasks(), options["chat"]).values()), manager)

    def calibration_inputs(self, task, samples, seed, train, pretrained):
        """Alpaca-formatted training texts, each truncated to ``calib.max_length`` tokens."""
        from transformers import AutoTokenizer

        from evals.datasets import llm_calibration_texts, text_calibration
        from evals.local_data import load_local

        tokenizer = AutoTokenizer.from_pretrained(pretrained)
        dataset = load_local(train, "train") if train else None
        texts, to_text = llm_calibration_texts(task, "train", self.cfg["datasets"].get(task), dataset=dataset)
        return text_calibration(texts, tokenizer, samples=samples, seed=seed, to_text=to_text,
                                max_length=self.cfg["calib"]["max_length"])

    def evaluate(self, model_dir, tasks, data_dir, suite_dir):
        """lm-eval on ``tasks`` (names of the paper's benchmarks, or ``name=lm_eval_task``)."""
        from evals.lm_eval_runner import run_lm_eval, task_mapping

        options = self.cfg["eval"]
        with tempfile.TemporaryDirectory() as out:
            return run_lm_eval(model_dir, task_mapping(tasks, options["chat"]), out,
                               tokenizer_dir=Path(suite_dir) / "pretrained", include_path=options["include_path"],
                               batch_size=options["batch_size"], limit=options["limit"],
                               num_fewshot=options["num_fewshot"], apply_chat_template=options["chat"],
                               confirm_run_unsafe_code=options["allow_code"], device=self.device())
