"""The hub-t5 and hub-llama suite builders through the CLI stages, offline: local 'hub' folders in
an experts table, local datasets, then merge, quantize (E-PMQ) and evaluate."""

import json

from epmq.cli import main
from epmq.suites.base import packaged_config
from tests.test_paper_glue import TASK_NAMES as GLUE_TASKS
from tests.test_paper_glue import glue_suite  # noqa: F401  (fixture)
from tests.test_paper_lm_eval import QUESTIONS, llm_suite  # noqa: F401  (fixture)


def write_suite(root, name, builder, base, pretrained, experts, tasks, datasets, **extra):
    """A suite YAML over the packaged paper suite ``base`` (its settings, ours on top)."""
    table = root / "experts.tsv"
    rows = [f"{name}\tpretrained\t-\t{pretrained}\tmain\t"] + [f"{name}\texpert\t{t}\t{p}\tmain\t" for t, p in experts.items()]
    table.write_text("suite\trole\ttask\tsource\trevision\tnote\n" + "\n".join(rows) + "\n")
    config = root / f"{name}.yaml"
    config.write_text(json.dumps({"base": str(packaged_config(base)), "suite": name, "builder": builder,
                                  "experts_table": str(table), "tasks": tasks,
                                  "models_dir": str(root / "models"),
                                  "datasets": {t: str(p) for t, p in datasets.items()}, **extra}))
    return config


def build_and_evaluate(root, config, tasks, eval_tasks, samples=8):
    suite = root / "results"
    assert main(["suite", "data", "--suite-config", str(config), "--out", str(suite / "data")]) == 0
    assert main(["suite", "pretrain", "--suite-config", str(config), "--out", str(suite / "pretrained")]) == 0
    experts, calib = [], []
    for task in tasks:
        experts.append(str(suite / "experts" / task))
        assert main(["suite", "finetune", "--suite-config", str(config), "--pretrained", str(suite / "pretrained"),
                     "--task", task, "--out", experts[-1]]) == 0
        calib.append(str(suite / "calib" / f"{task}.safetensors"))
    assert main(["suite", "calib", "--suite-config", str(config), "--tasks", *tasks, "--samples", str(samples),
                 "--data", str(suite / "data"), "--suite-dir", str(suite), "--out", str(suite / "calib")]) == 0
    assert main(["merge", "--method", "task_arithmetic", "--pretrained", str(suite / "pretrained"),
                 "--experts", *experts, "--out", str(suite / "merged")]) == 0
    assert main(["quantize", "--model", str(suite / "merged"), "--method", "epmq", "--group-size", "32",
                 "--batch-size", "4", "--experts", *experts, "--calib", *calib, "--out", str(suite / "epmq")]) == 0
    assert main(["evaluate", "--suite-config", str(config), "--model", str(suite / "epmq"), "--data", str(suite / "data"),
                 "--suite-dir", str(suite), "--tasks", *eval_tasks, "--out-dir", str(suite / "eval")]) == 0
    return {task: json.loads((suite / "eval" / f"{task}.json").read_text()) for task in eval_tasks}


def test_hub_t5_suite(glue_suite, tmp_path):  # noqa: F811
    experts = dict(zip(GLUE_TASKS, glue_suite["experts"]))
    config = write_suite(tmp_path, "tiny-glue", "hub-t5", "flan-t5-glue8", glue_suite["hub"], experts, list(GLUE_TASKS), glue_suite["data"],
                         eval={"batch_size": 8, "device": "cpu"}, calib={"max_length": 64})
    results = build_and_evaluate(tmp_path, config, list(GLUE_TASKS), list(GLUE_TASKS))
    assert results["rte"]["metric"] == "exact_match" and results["stsb"]["metric"] == "spearman"
    assert all(r["n"] == 12 and "provenance" in r for r in results.values())


def test_hub_llama_suite(llm_suite, tmp_path):  # noqa: F811
    import datasets

    data = {}
    columns = {"math": ("query", "response"), "coding": ("instruction", "response")}
    for task, (prompt, answer) in columns.items():
        rows = {prompt: [q["question"] for q in QUESTIONS] * 3, answer: [q["target"] for q in QUESTIONS] * 3}
        data[task] = tmp_path / "data" / task
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(data[task]))
    experts = dict(zip(("math", "coding"), llm_suite["experts"]))
    config = write_suite(tmp_path, "tiny-llama", "hub-llama", "llama-3b", llm_suite["hub"], experts, ["math", "coding"], data,
                         eval_tasks=["tiny_mc"],
                         eval={"batch_size": 4, "device": "cpu", "allow_code": False, "include_path": str(llm_suite["tasks"])},
                         calib={"max_length": 24})
    results = build_and_evaluate(tmp_path, config, ["math", "coding"], ["tiny_mc"])
    assert results["tiny_mc"]["lm_eval_task"] == "tiny_mc" and 0 <= results["tiny_mc"]["accuracy"] <= 100
