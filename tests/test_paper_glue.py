"""The FLAN-T5 GLUE path end to end on a small T5 built from config, with a locally trained tokenizer.

fetch (local path) -> merge (TIES) -> teacher-forced calibration files from the real GLUE prompts
-> quantize (rtn, gptq, awq, epmq; encoder and decoder, cross-attention included) -> text-to-text
evaluation (greedy, max_length 10, exact match / Spearman) of every model.
"""

from __future__ import annotations

import json

import pytest
import torch

from epmq.cli import main as epmq_main
from epmq.hub.store import fetch
from evals import glue
from epmq.suites.common import save_calibration
from evals.datasets import calibration_indices, glue_calibration, load_glue_task
from epmq.testing.paper_models import perturbed, t5_tokenizer, tiny_t5_model

TASK_NAMES = ("rte", "stsb")
METHODS = ("rtn", "gptq", "awq", "epmq")
WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "it", "was", "red", "blue", "big", "small", "house", "tree", "car",
         "ran", "fast", "slowly", "today"]



def _examples(task: str, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def sentence():
        idx = torch.randint(0, len(WORDS), (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
        return " ".join(WORDS[i] for i in idx) + "."

    rows = {"sentence1": [sentence() for _ in range(n)], "sentence2": [sentence() for _ in range(n)], "idx": list(range(n))}
    if task == "stsb":
        rows["label"] = [round(float(torch.rand(1, generator=g)) * 5, 2) for _ in range(n)]
    else:
        rows["label"] = [int(i % 2) for i in range(n)]
    return rows


@pytest.fixture(scope="module")
def glue_suite(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("glue")
    data, corpus = {}, []
    for index, task in enumerate(TASK_NAMES):
        splits = {"train": datasets.Dataset.from_dict(_examples(task, 24, index)),
                  "validation": datasets.Dataset.from_dict(_examples(task, 12, 50 + index))}
        data[task] = root / "data" / task
        datasets.DatasetDict(splits).save_to_disk(str(data[task]))
        for split in splits.values():
            corpus += [text for row in split for text in glue.glue_texts(task, row)]
    tokenizer = t5_tokenizer(corpus)
    model = tiny_t5_model(tokenizer)
    hub = root / "hub" / "flan-t5"
    model.save_pretrained(hub)
    tokenizer.save_pretrained(hub)
    experts = []
    for index, task in enumerate(TASK_NAMES):
        path = root / "hub" / f"flan-t5_glue-{task}"
        perturbed(model, seed=20 + index).save_pretrained(path)
        experts.append(path)
    return {"root": root, "hub": hub, "experts": experts, "data": data, "tokenizer": tokenizer}


def test_prompts_and_scoring():
    prompt, target = glue.glue_texts("mnli", {"premise": "P", "hypothesis": "H", "label": 2})
    assert prompt.startswith("Does the premise: 'P' logically imply") and "'H'" in prompt and target == "contradiction"
    assert glue.glue_texts("stsb", {"sentence1": "a", "sentence2": "b", "label": 3.25})[1] == "3.2"
    assert glue.glue_texts("qnli", {"question": "q", "sentence": "s", "label": 0})[1] == "yes"
    assert glue.target_text("cola", -1) == ""
    assert glue.EVAL_SPLIT["mnli"] == "validation_matched" and set(glue.TASKS) == set(glue.PROMPTS)
    em = glue.score("rte", ["yes", "no", "no", "yes"], ["yes", "no", "yes", "yes"])
    assert em["metric"] == "exact_match" and em["accuracy"] == 75.0 and em["n"] == 4
    rho = glue.score("stsb", ["1.0", "2.0", "x", "4.0"], ["1.0", "2.0", "3.0", "4.0"])
    assert rho["metric"] == "spearman" and rho["accuracy"] == pytest.approx(40.0)  # "x" parses as 0
    assert glue.parse_float("nope") == 0.0 and glue.parse_float(" 2.5") == 2.5
    flat = glue.score("stsb", ["1.0"] * 4, ["1.0", "2.0", "3.0", "4.0"])
    assert flat["accuracy"] == 0.0 and flat["spearman_undefined"]


class _Oracle(torch.nn.Module):
    """A 'model' whose generate returns the gold answer of each prompt (tests decoding and matching)."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers = tokenizer, list(answers)

    def generate(self, input_ids, attention_mask, max_length, **kwargs):
        batch, self.answers = self.answers[: len(input_ids)], self.answers[len(input_ids):]
        encoded = self.tokenizer(batch, padding=True, return_tensors="pt")["input_ids"]
        return torch.cat([torch.zeros(len(batch), 1, dtype=torch.long), encoded], dim=1)[:, :max_length]


def test_exact_match_of_correct_answers(glue_suite):
    tokenizer = glue_suite["tokenizer"]
    dataset = load_glue_task("rte", "validation", glue_suite["data"]["rte"])
    answers = [glue.glue_texts("rte", row)[1] for row in dataset]
    result = glue.evaluate_task(_Oracle(tokenizer, answers), tokenizer, "rte", dataset, batch_size=5)
    assert result["accuracy"] == 100.0 and result["n"] == len(dataset)
    wrong = ["no" if a == "yes" else "yes" for a in answers]
    assert glue.evaluate_task(_Oracle(tokenizer, wrong), tokenizer, "rte", dataset)["accuracy"] == 0.0


@pytest.mark.slow
def test_glue_pipeline_end_to_end(glue_suite, tmp_path):
    from safetensors.torch import load_file

    root = tmp_path
    pretrained = fetch(glue_suite["hub"], "main", root / "resources" / "flan-t5")
    experts = [fetch(path, "main", root / "resources" / path.name) for path in glue_suite["experts"]]
    merged = root / "merged"
    assert epmq_main(["merge", "--method", "ties", "--pretrained", str(pretrained), "--experts", *map(str, experts),
                      "--out", str(merged)]) == 0

    tokenizer = glue_suite["tokenizer"]
    calib = []
    for task in TASK_NAMES:
        file = root / "calib" / f"{task}.safetensors"
        save_calibration(glue_calibration(task, tokenizer, samples=8, seed=3, max_length=512,
                                          local_path=glue_suite["data"][task]),
                         file, {"suite": "tiny-glue"}, task, samples=8, seed=3)
        tensors = load_file(str(file))
        assert tensors["sample_indices"].tolist() == calibration_indices(24, 8, 3).tolist()
        assert set(tensors) == {"input_ids", "attention_mask", "labels", "decoder_attention_mask", "sample_indices"}
        labels = tensors["labels"]
        assert (labels == -100).any() or task == "rte"  # stsb targets differ in length
        assert torch.equal(tensors["decoder_attention_mask"].bool(), labels != -100)
        # the target of the first drawn example, teacher-forced, ends with </s>
        first = load_glue_task(task, "train", glue_suite["data"][task])[int(tensors["sample_indices"][0])]
        ids = labels[0][labels[0] != -100].tolist()
        assert ids == tokenizer(glue.glue_texts(task, first)[1])["input_ids"] and ids[-1] == tokenizer.eos_token_id
        calib.append(file)

    models = {"merged": merged}
    for method in METHODS:
        out = root / "quantized" / method
        assert epmq_main(["quantize", "--model", str(merged), "--method", method, "--out", str(out), "--group-size", "32",
                          "--calib", *map(str, calib), "--experts", *map(str, experts), "--batch-size", "4"]) == 0, method
        models[method] = out
    info = json.loads((models["epmq"] / "quantization.json").read_text())
    quantized = set(info["layers"])
    assert any(n.startswith("decoder.") and "EncDecAttention.k" in n for n in quantized)  # cross-attention quantized
    assert any(n.startswith("encoder.") for n in quantized)

    for name, model_dir in models.items():
        glue.evaluate_glue(model_dir, TASK_NAMES, root / "metrics" / name, tokenizer_dir=pretrained,
                           data=glue_suite["data"], batch_size=6)
        for task in TASK_NAMES:
            record = json.loads((root / "metrics" / name / f"{task}.json").read_text())
            assert record["metric"] == glue.METRIC[task] and record["n"] == 12
            assert -100.0 <= record["accuracy"] <= 100.0 and record["split"] == "validation"
            assert record["generation"] == {"max_length": 10, "greedy": True} and "provenance" in record


def test_glue_validation_split_names(tmp_path):
    import datasets

    rows = {"premise": ["p"], "hypothesis": ["h"], "label": [1], "idx": [0]}
    datasets.DatasetDict({"validation_matched": datasets.Dataset.from_dict(rows),
                          "train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "mnli"))
    loaded = load_glue_task("mnli", "validation", tmp_path / "mnli")
    assert len(loaded) == 1 and glue.glue_texts("mnli", loaded[0])[1] == "neutral"
    with pytest.raises(KeyError):
        load_glue_task("wnli", "validation", tmp_path / "mnli")
