"""FLAN-T5 on GLUE as text-to-text (paper §5.1 and §5.4; the protocol of FusionBench's flan-t5 taskpool).

Each example becomes a prompt (``PROMPTS``) and a target text (``TARGETS``); the model answers by
greedy decoding with ``generate(max_length=10)`` (decoder sequence of at most 10 tokens, the start
token included, as FusionBench calls it); the answer is decoded without special tokens and
compared with the target text after the same tokenizer round trip (FusionBench decodes the
tokenized labels). Metric: exact match for cola, mnli, mrpc, qnli, qqp, rte, sst2; Spearman's rho
for stsb between the parsed answer and the target score (``float(text)``, 0 when unparsable).
Evaluation splits: ``validation`` (mnli: ``validation_matched``).

Transcribed as data from tanganke/fusion_bench (commit 54c9e8c9):
- prompts and target texts: ``fusion_bench/tasks/flan_t5_text_generation/glue_prompt_templates.py``
  (the prompts' spelling "Answere" is FusionBench's and is kept: the experts were fine-tuned on it);
- fields of each task: ``glue_preprocessors.py`` in the same folder;
- splits, ``max_length=10``, the label round trip and the float parsing: ``config/taskpool/
  flan-t5_glue_text_generation.yaml`` and ``glue_evaluation.py``.
FusionBench loads ``load_dataset("glue", name)``; the hub now serves that dataset as ``nyu-mll/glue``.

Result per task (``<out_dir>/<task>.json``): {task, metric, accuracy (score in %), stderr (%),
n, model, split, dataset, provenance}. The stderr of exact match is binomial; that of Spearman's
rho is the Fieller-Hartley-Pearson approximation ``(1 - rho^2) sqrt(1.06 / (n - 3))``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from epmq.progress import progress
from evals.local_data import load_local

log = logging.getLogger(__name__)

GLUE_DATASET = "nyu-mll/glue"
TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")
EVAL_SPLIT = {task: "validation" for task in TASKS} | {"mnli": "validation_matched"}

PROMPTS = {
    "cola": "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". Answere 'acceptable' or 'unacceptable'.",
    "mnli": "Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: '{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
    "mrpc": "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? Answere with 'yes' or 'no'.",
    "qnli": "Given the context: '{sentence}', does the question '{question}' have an answer based on the information provided? Answer with 'yes' or 'no'.",
    "qqp": "Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.",
    "rte": "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
    "sst2": "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
    "stsb": "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) to 5 (completely similar), rate the similarity.",
}
# label -> target text; stsb formats its float score
TARGETS: dict[str, dict[int, str] | str] = {
    "cola": {0: "unacceptable", 1: "acceptable"},
    "mnli": {0: "entailment", 1: "neutral", 2: "contradiction"},
    "mrpc": {0: "no", 1: "yes"},
    "qnli": {0: "yes", 1: "no"},
    "qqp": {0: "no", 1: "yes"},
    "rte": {0: "yes", 1: "no"},
    "sst2": {0: "negative", 1: "positive"},
    "stsb": "{:.1f}",
}
FIELDS = {
    "cola": ("sentence",), "mnli": ("premise", "hypothesis"), "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"), "qqp": ("question1", "question2"), "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence",), "stsb": ("sentence1", "sentence2"),
}
METRIC = {task: "exact_match" for task in TASKS} | {"stsb": "spearman"}
MAX_LENGTH = 10  # generate(max_length=10), FusionBench's glue_evaluation.py
MAX_INPUT_LENGTH = 512  # FusionBench pads/truncates inputs to the tokenizer's model_max_length (512 for FLAN-T5)


def load_glue_task(task: str, split: str, local_path: str | os.PathLike | None = None):
    """GLUE task ``task``: ``"train"`` or ``"validation"`` (mnli: ``validation_matched``), or any split name."""
    import datasets

    if task not in TASKS:
        raise KeyError(f"unknown GLUE task {task!r}; known: {', '.join(TASKS)}")
    real_split = EVAL_SPLIT[task] if split == "validation" else split
    if local_path is not None:
        return load_local(local_path, real_split)
    return datasets.load_dataset(GLUE_DATASET, task, split=real_split)


def _check(task: str) -> None:
    if task not in PROMPTS:
        raise KeyError(f"unknown GLUE task {task!r}; known: {', '.join(TASKS)}")


def target_text(task: str, label) -> str:
    """The target text of a label (empty for GLUE's hidden test labels, as in FusionBench)."""
    _check(task)
    targets = TARGETS[task]
    if isinstance(targets, str):
        return targets.format(float(label))
    return targets.get(int(label), "")


def glue_texts(task: str, example: Mapping) -> tuple[str, str]:
    """(prompt, target text) of one GLUE example."""
    _check(task)
    prompt = PROMPTS[task].format(**{field: example[field] for field in FIELDS[task]})
    return prompt, target_text(task, example["label"])


def parse_float(text: str) -> float:
    """FusionBench's parse: ``float(text)``, 0.0 when that fails."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return 0.0


def spearman_stderr(rho: float, n: int) -> float:
    if n <= 3:
        return float("nan")
    return (1.0 - rho * rho) * math.sqrt(1.06 / (n - 3))


def score(task: str, predictions: Sequence[str], targets: Sequence[str]) -> dict:
    """{metric, accuracy (%), stderr (%), n} of decoded answers against target texts."""
    from evals.clip_zeroshot import binomial_stderr

    n = len(targets)
    if n == 0 or len(predictions) != n:
        raise ValueError(f"{task}: {len(predictions)} predictions for {n} targets")
    if METRIC[task] == "exact_match":
        p = sum(pred == gold for pred, gold in zip(predictions, targets)) / n
        return {"metric": "exact_match", "accuracy": 100.0 * p, "stderr": 100.0 * binomial_stderr(p, n), "n": n}
    from scipy.stats import spearmanr

    with warnings.catch_warnings():  # constant answers: scipy warns and returns NaN, handled below
        warnings.simplefilter("ignore")
        rho = float(spearmanr([parse_float(t) for t in predictions], [parse_float(t) for t in targets])[0])
    extra = {}
    if math.isnan(rho):  # constant answers: FusionBench would report NaN; a table needs a number
        rho, extra = 0.0, {"spearman_undefined": True}
    return {"metric": "spearman", "accuracy": 100.0 * rho, "stderr": 100.0 * spearman_stderr(rho, n), "n": n, **extra}


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: Sequence[str], batch_size: int = 32, max_length: int = MAX_LENGTH,
                     max_input_length: int = MAX_INPUT_LENGTH) -> list[str]:
    """Greedy answers of a seq2seq model to ``prompts``, decoded without special tokens."""
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in progress(range(0, len(prompts), batch_size), "generating answers", unit="batch"):
        inputs = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True,
                           truncation=True, max_length=max_input_length)
        outputs = model.generate(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
                                 max_length=max_length, do_sample=False, num_beams=1)
        answers.extend(tokenizer.batch_decode(outputs, skip_special_tokens=True))
    return answers


def round_trip(tokenizer, text: str) -> str:
    """A target as FusionBench compares it: tokenized, special tokens dropped, decoded."""
    return tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)


def evaluate_task(model, tokenizer, task: str, dataset, *, batch_size: int = 32, max_length: int = MAX_LENGTH,
                  limit: int | None = None) -> dict:
    """Score ``model`` on one GLUE task's examples (an HF dataset or a list of dicts)."""
    rows = dataset if limit is None else [dataset[i] for i in range(min(limit, len(dataset)))]
    pairs = [glue_texts(task, row) for row in rows]
    answers = generate_answers(model, tokenizer, [prompt for prompt, _ in pairs], batch_size, max_length)
    targets = [round_trip(tokenizer, target) for _, target in pairs]
    return score(task, answers, targets)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def evaluate_glue(
    model_dir: str | Path,
    tasks: Sequence[str],
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    data: Mapping[str, str | Path] | None = None,
    datasets: Mapping[str, object] | None = None,
    batch_size: int = 32,
    max_length: int = MAX_LENGTH,
    limit: int | None = None,
    device: str = "cpu",
) -> dict[str, dict]:
    """Evaluate a (merged or quantized) T5 checkpoint on GLUE tasks; write ``<out_dir>/<task>.json``.

    ``tokenizer_dir`` defaults to ``model_dir`` (quantized checkpoints hold no tokenizer: pass the
    pretrained folder). ``data`` maps a task to a local dataset folder (see
    :func:`load_glue_task`); ``datasets`` maps a task to an in-memory dataset.
    """
    from epmq.checkpoint import load_model
    from epmq.io import atomic_write_json, provenance

    started = time.time()
    model = load_model(model_dir).to(device).eval()
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    results = {}
    for task in tasks:
        split = EVAL_SPLIT[task]
        dataset = (datasets or {}).get(task)
        if dataset is None:
            dataset = load_glue_task(task, "validation", (data or {}).get(task))
        result = evaluate_task(model, tokenizer, task, dataset, batch_size=batch_size, max_length=max_length, limit=limit)
        results[task] = {"task": task, **result, "model": str(model_dir), "split": split, "dataset": f"{GLUE_DATASET}/{task}",
                         "generation": {"max_length": max_length, "greedy": True}}
        log.info("%s: %s %.2f%% +- %.2f (n=%d)", task, result["metric"], result["accuracy"], result["stderr"], result["n"])
    record = provenance(eval_seconds=round(time.time() - started, 2), tokenizer=str(tokenizer_dir or model_dir))
    for task, result in results.items():
        atomic_write_json(Path(out_dir) / f"{task}.json", {**result, "provenance": record})
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (HF, merged or quantized T5)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--data", nargs="*", default=[], metavar="TASK=PATH", help="local dataset folders")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="first N examples only (smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def parse_data(pairs: Sequence[str]) -> dict[str, str]:
    data = {}
    for pair in pairs:
        task, sep, path = pair.partition("=")
        if not sep:
            raise ValueError(f"--data expects TASK=PATH, got {pair!r}")
        data[task] = path
    return data


def run(args: argparse.Namespace) -> int:
    evaluate_glue(args.model, args.tasks, args.out_dir, tokenizer_dir=args.tokenizer, data=parse_data(args.data),
                  batch_size=args.batch_size, limit=args.limit, device=args.device)
    return 0


if __name__ == "__main__":
    import sys

    from epmq.cli import run_module

    raise SystemExit(run_module(sys.modules[__name__]))
