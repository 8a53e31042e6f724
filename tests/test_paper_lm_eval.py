"""The LLM path end to end on a small Llama built from config, with a local tokenizer and local YAML tasks.

fetch (local path) -> merge (task arithmetic, as the paper's Llama runs) -> calibration files from
text samples -> quantize (rtn, gptq, awq, epmq) -> lm-eval through its Python API (HFLM wrapping
the loaded model object; a multiple-choice and a generation task defined in local YAML files).
"""

from __future__ import annotations

import json

import pytest

from epmq.cli import main as epmq_main
from epmq.hub.store import fetch
from evals import lm_eval_runner
from epmq.suites.common import save_calibration
from evals.datasets import alpaca_text, text_calibration
from epmq.testing.paper_models import llama_tokenizer, perturbed, tiny_llama_model

METHODS = ("rtn", "gptq", "awq", "epmq")
QUESTIONS = [
    {"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "answer": 0,
     "target": str(a + b)}
    for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (7, 2)]
]
MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: target
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""



@pytest.fixture(scope="module")
def llm_suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    corpus = [f"Question: {q['question']}\nAnswer: {q['target']}" for q in QUESTIONS] * 4
    corpus += [alpaca_text({"query": q["question"], "response": q["target"]}, "query", None, "response") for q in QUESTIONS]
    tokenizer = llama_tokenizer(corpus)
    model = tiny_llama_model(tokenizer)
    hub = root / "hub" / "llama"
    model.save_pretrained(hub)
    tokenizer.save_pretrained(hub)
    experts = []
    for index, task in enumerate(("math", "coding")):
        path = root / "hub" / f"llama_{task}"
        perturbed(model, seed=30 + index).save_pretrained(path)
        experts.append(path)
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tasks / "tiny_mc.yaml").write_text(MC_YAML.format(data=data))
    (tasks / "tiny_gen.yaml").write_text(GEN_YAML.format(data=data))
    return {"root": root, "hub": hub, "experts": experts, "tasks": tasks, "tokenizer": tokenizer, "corpus": corpus}


def test_task_names_and_metric_choice():
    assert lm_eval_runner.task_mapping(["gsm8k", "math500", "mbpp-plus", "x=arc_easy"]) == {
        "gsm8k": "gsm8k", "math500": "minerva_math500", "mbpp-plus": "mbpp_plus", "x": "arc_easy"}
    assert lm_eval_runner.task_mapping(["arc-challenge"], chat=True) == {"arc-challenge": "arc_challenge_chat"}
    results = {"alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
               "exact_match,flexible-extract": 0.6, "exact_match_stderr,flexible-extract": "N/A"}
    assert lm_eval_runner.main_metric("gsm8k", results) == ("exact_match,strict-match", 0.5, 0.1)
    assert lm_eval_runner.main_metric("unknown", {"foo,none": 1.0, "foo_stderr,none": "N/A"}) == ("foo,none", 1.0, None)
    with pytest.raises(ValueError, match="model-written code"):
        lm_eval_runner.run_lm_eval("nowhere", ["humaneval"], "out")


@pytest.mark.slow
def test_lm_eval_pipeline_end_to_end(llm_suite, tmp_path):
    from safetensors.torch import load_file

    root = tmp_path
    pretrained = fetch(llm_suite["hub"], "main", root / "resources" / "llama")
    experts = [fetch(path, "main", root / "resources" / path.name) for path in llm_suite["experts"]]
    merged = root / "merged"
    assert epmq_main(["merge", "--method", "task_arithmetic", "--pretrained", str(pretrained),
                      "--experts", *map(str, experts), "--out", str(merged)]) == 0
    tokenizer = llm_suite["tokenizer"]
    calib = []
    for index, task in enumerate(("math", "coding")):
        file = root / "calib" / f"{task}.safetensors"
        save_calibration(text_calibration(llm_suite["corpus"], tokenizer, samples=8, seed=index, max_length=24),
                         file, {"suite": "tiny-llama"}, task, samples=8, seed=index)
        tensors = load_file(str(file))
        assert tensors["input_ids"].shape[0] == 8 and tensors["input_ids"].shape[1] <= 24
        assert tensors["input_ids"][:, 0].eq(tokenizer.bos_token_id).all()
        calib.append(file)
    models = {"merged": merged}
    for method in METHODS:
        out = root / "quantized" / method
        assert epmq_main(["quantize", "--model", str(merged), "--method", method, "--out", str(out), "--group-size", "32",
                          "--calib", *map(str, calib), "--experts", *map(str, experts), "--batch-size", "4"]) == 0, method
        models[method] = out
    for name, model_dir in models.items():
        results = lm_eval_runner.run_lm_eval(model_dir, {"mc": "tiny_mc", "gen": "tiny_gen"}, root / "metrics" / name,
                                             tokenizer_dir=pretrained, include_path=llm_suite["tasks"], batch_size=4)
        for task, metric in (("mc", "acc,none"), ("gen", "exact_match,none")):  # first of each metric_list
            record = json.loads((root / "metrics" / name / f"{task}.json").read_text())
            assert record["metric"] == metric and record["n"] == len(QUESTIONS) and 0.0 <= record["accuracy"] <= 100.0
            assert record["accuracy"] == results[task]["accuracy"] and "provenance" in record
        assert results["mc"]["stderr"] is not None
