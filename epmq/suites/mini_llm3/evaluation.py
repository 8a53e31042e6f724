"""mini-llm3's lm-eval tasks: the task YAMLs written next to the held-out data, and the score
read back from lm-eval's results (zero-shot, greedy; stderr is lm-eval's)."""

from __future__ import annotations

from pathlib import Path

import yaml

from epmq.suites.base import PACKAGE

#: the lm-eval task templates, one per protocol
TEMPLATES = PACKAGE / "lm_eval_tasks"


def lm_eval_task_name(cfg: dict, task: str) -> str:
    """The lm-eval name of a task: unique per suite, lm-eval's alphabet."""
    return f"{cfg['suite'].replace('-', '_')}_{task.replace('-', '_')}"


def lm_eval_task_config(cfg: dict, task: str, test_file: Path) -> dict:
    """The lm-eval task YAML of a task: its protocol's template with the suite's values filled in."""
    spec = cfg["tasks"][task]
    template = "generate_exact_match.yaml" if spec["protocol"] == "generate" else "multiple_choice.yaml"
    config = yaml.safe_load((TEMPLATES / template).read_text())
    config["task"] = lm_eval_task_name(cfg, task)
    config["dataset_kwargs"]["data_files"]["test"] = str(Path(test_file).resolve())
    if spec["protocol"] == "generate":
        config["generation_kwargs"]["max_gen_toks"] = spec["max_gen_toks"]
        if spec.get("answer_regex"):  # read the answer out of the output (GSM8K's flexible extract)
            config["filter_list"] = [{"name": "extract", "filter": [
                {"function": "regex", "regex_pattern": spec["answer_regex"], "group_select": 0},
                {"function": "take_first"}]}]
    else:
        config["doc_to_choice"] = list(spec["classes"])
    return config


def metric_of(task_result: dict, metric: str) -> tuple[str, float, float]:
    """(lm-eval key, value, stderr) of ``metric`` in one task's lm-eval results (any filter)."""
    for key, value in task_result.items():
        name, _, filter_name = key.partition(",")
        if name == metric and isinstance(value, (int, float)):
            stderr = task_result.get(f"{metric}_stderr,{filter_name}")
            return key, float(value), float(stderr) if isinstance(stderr, (int, float)) else float("nan")
    raise ValueError(f"lm-eval result has no {metric!r}: {sorted(task_result)}")
