"""LLM evaluation through lm-eval's Python API (paper §5.5, Table 4: GSM8K, MATH500, ARC-C, IFEval, HumanEval, MBPP+).

The model is loaded with ``epmq.checkpoint.load_model`` (so merged and quantized checkpoints of
this project work; quantized weights are dequantized) and handed to
``lm_eval.models.huggingface.HFLM(pretrained=<model object>, tokenizer=...)``; tasks run through
``lm_eval.simple_evaluate`` with a ``TaskManager`` that also reads local YAML tasks
(``include_path``), which is how the code path is exercised offline.

Paper column -> lm-eval 0.4.13 task (``PAPER_TASKS``; checked against lm_eval/tasks/):
gsm8k -> ``gsm8k``, math500 -> ``minerva_math500`` (HuggingFaceH4/MATH-500 with Minerva's answer
extraction; ``hendrycks_math500`` is the other MATH-500 task), arc-challenge -> ``arc_challenge``,
ifeval -> ``ifeval``, humaneval -> ``humaneval``, mbpp-plus -> ``mbpp_plus``. The paper names
neither the variants, shots, chat template nor metrics: these defaults, the main metric of each
task (``MAIN_METRICS``) and ``PAPER_TASKS_CHAT`` (the generative/instruct variants lm-eval ships,
for chat models) are **ours**; Table 4's full-precision scores (ARC-C 72.7 on the 3B model) suggest
instruct models evaluated generatively, so a run should record which mapping it used (the
result files do). HumanEval and MBPP+ execute model-written code: they need
``confirm_run_unsafe_code=True`` (and ``HF_ALLOW_CODE_EVAL=1``).

Result per task (``<out_dir>/<name>.json``): {task (the paper name), lm_eval_task, metric,
accuracy (score in %), stderr (%; null when lm-eval reports none), n, model, provenance}.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PAPER_TASKS = {
    "gsm8k": "gsm8k",
    "math500": "minerva_math500",
    "arc-challenge": "arc_challenge",
    "ifeval": "ifeval",
    "humaneval": "humaneval",
    "mbpp-plus": "mbpp_plus",
}
PAPER_TASKS_CHAT = {
    "gsm8k": "gsm8k_cot_llama",
    "math500": "minerva_math500",
    "arc-challenge": "arc_challenge_chat",
    "ifeval": "ifeval",
    "humaneval": "humaneval_instruct",
    "mbpp-plus": "mbpp_plus_instruct",
}
# lm-eval task -> result keys to report, in order of preference ("metric,filter")
MAIN_METRICS = {
    "gsm8k": ("exact_match,strict-match", "exact_match,flexible-extract"),
    "gsm8k_cot_llama": ("exact_match,strict-match", "exact_match,flexible-extract"),
    "minerva_math500": ("exact_match,none", "math_verify,none"),
    "hendrycks_math500": ("exact_match,none",),
    "arc_challenge": ("acc_norm,none", "acc,none"),
    "arc_challenge_chat": ("exact_match,remove_whitespace", "exact_match,none"),
    "ifeval": ("prompt_level_strict_acc,none", "inst_level_strict_acc,none"),
    "humaneval": ("pass@1,create_test", "pass_at_k,create_test", "pass_at_1,create_test"),
    "humaneval_instruct": ("pass@1,create_test", "pass_at_k,create_test", "pass_at_1,create_test"),
    "mbpp_plus": ("pass_at_1,none", "pass@1,none"),
    "mbpp_plus_instruct": ("pass_at_1,extract_code", "pass_at_1,none"),
}
UNSAFE_TASKS = {"humaneval", "humaneval_instruct", "mbpp_plus", "mbpp_plus_instruct"}


@contextlib.contextmanager
def code_eval_environment(allow_code: bool):
    """``HF_ALLOW_CODE_EVAL=1`` inside the block when ``allow_code`` (lm-eval's code tasks need it at import), else unset."""
    saved = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allow_code:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    else:
        os.environ.pop("HF_ALLOW_CODE_EVAL", None)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = saved


def main_metric(lm_eval_task: str, task_results: Mapping) -> tuple[str, float, float | None]:
    """(key, value, stderr) of a task's main metric in lm-eval's results.

    Known tasks: the first key of ``MAIN_METRICS`` present; other tasks (local YAML): the first
    metric lm-eval reports, i.e. the first of the task's ``metric_list``.
    """
    numeric = {key: value for key, value in task_results.items()
               if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    if not numeric:
        raise ValueError(f"lm-eval returned no metric for {lm_eval_task}: {dict(task_results)}")
    key = next((k for k in MAIN_METRICS.get(lm_eval_task, ()) if k in numeric), None) or next(iter(numeric))
    metric, _, filter_name = key.partition(",")
    stderr = task_results.get(f"{metric}_stderr,{filter_name}")
    return key, float(numeric[key]), float(stderr) if isinstance(stderr, (int, float)) else None


def manager_include(include_path) -> list[str] | None:
    if include_path is None:
        return None
    paths = include_path if isinstance(include_path, (list, tuple)) else [include_path]
    return [str(path) for path in paths]


def local_task_names(include_path) -> set[str]:
    """Task names defined by the YAML files under ``include_path`` (read as text: they may hold !function tags)."""
    names = set()
    for folder in manager_include(include_path) or []:
        for file in Path(folder).rglob("*.yaml"):
            names.update(re.findall(r"^task:\s*['\"]?([\w.\-]+)", file.read_text(), flags=re.MULTILINE))
    return names


_MANAGERS: dict = {}


def task_manager(include_path, wanted: set[str]):
    """An lm-eval TaskManager, cached per process; built-in tasks are indexed (about 10 s) only when needed."""
    from lm_eval.tasks import TaskManager

    include = manager_include(include_path)
    include_defaults = not wanted <= local_task_names(include_path)
    key = (tuple(include or ()), include_defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=include, include_defaults=include_defaults)
    return _MANAGERS[key]


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:  # Llama tokenizers have none; HFLM pads batches
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run_lm_eval(
    model_dir: str | Path,
    tasks: Mapping[str, str] | Sequence[str],
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    batch_size: int | str = 8,
    limit: float | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    confirm_run_unsafe_code: bool = False,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
    gen_kwargs: dict | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """Evaluate a checkpoint with lm-eval; ``tasks`` maps result names to lm-eval tasks (or lists lm-eval tasks).

    Writes ``<out_dir>/<name>.json`` per task and returns the results. ``tokenizer_dir`` defaults
    to ``model_dir`` (quantized checkpoints hold no tokenizer: pass the pretrained folder).
    """
    names = dict(tasks) if isinstance(tasks, Mapping) else {task: task for task in tasks}
    unsafe = sorted(set(names.values()) & UNSAFE_TASKS)
    if unsafe and not confirm_run_unsafe_code:
        raise ValueError(f"tasks {unsafe} run model-written code: pass confirm_run_unsafe_code=True (--allow-code)")

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from epmq.checkpoint import load_model
    from epmq.io import atomic_write_json, provenance

    started = time.time()
    model = load_model(model_dir, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    manager = task_manager(include_path, set(names.values()))
    include = manager_include(include_path)
    with code_eval_environment(confirm_run_unsafe_code):
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(dict.fromkeys(names.values())), num_fewshot=num_fewshot, limit=limit,
            task_manager=manager, apply_chat_template=apply_chat_template, confirm_run_unsafe_code=confirm_run_unsafe_code,
            gen_kwargs=gen_kwargs, log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, bootstrap_iters=1000,
        )
    seconds = round(time.time() - started, 2)
    results = {}
    for name, lm_task in names.items():
        task_results = output["results"].get(lm_task)
        if task_results is None:
            raise ValueError(f"lm-eval returned no results for {lm_task} (got {sorted(output['results'])})")
        key, value, stderr = main_metric(lm_task, task_results)
        n_samples = output.get("n-samples", {}).get(lm_task, {})
        results[name] = {
            "task": name,
            "lm_eval_task": lm_task,
            "metric": key,
            "accuracy": 100.0 * value,
            "stderr": None if stderr is None else 100.0 * stderr,
            "n": int(n_samples.get("effective", n_samples.get("original", 0)) or 0),
            "model": str(model_dir),
            "lm_eval": {"num_fewshot": output.get("n-shot", {}).get(lm_task), "apply_chat_template": apply_chat_template,
                        "limit": limit, "version": output.get("versions", {}).get(lm_task),
                        "all_metrics": {k: v for k, v in task_results.items() if k != "alias"}},
        }
        log.info("%s (%s): %s = %.2f%%", name, lm_task, key, 100.0 * value)
    record = provenance(eval_seconds=seconds, lm_eval=getattr(lm_eval, "__version__", None),
                        tokenizer=str(tokenizer_dir or model_dir), include_path=include)
    for name, result in results.items():
        atomic_write_json(Path(out_dir) / f"{name}.json", {**result, "provenance": record})
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (HF, merged or quantized Llama)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS),
                        help="paper names (gsm8k math500 ...) or lm-eval task names; NAME=LM_EVAL_TASK to rename")
    parser.add_argument("--chat", action="store_true", help="map paper names with PAPER_TASKS_CHAT and apply the chat template")
    parser.add_argument("--include-path", nargs="*", default=None, help="folders of local YAML tasks")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--batch-size", default="8")
    parser.add_argument("--limit", type=float, default=None)
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--allow-code", action="store_true", help="confirm running model-written code (HumanEval, MBPP+)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)


def task_mapping(words: Sequence[str], chat: bool = False) -> dict[str, str]:
    table = PAPER_TASKS_CHAT if chat else PAPER_TASKS
    mapping = {}
    for word in words:
        name, sep, lm_task = word.partition("=")
        mapping[name] = lm_task if sep else table.get(name, name)
    return mapping


def run(args: argparse.Namespace) -> int:
    batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    run_lm_eval(args.model, task_mapping(args.tasks, args.chat), args.out_dir, tokenizer_dir=args.tokenizer,
                include_path=args.include_path, batch_size=batch_size, limit=limit, num_fewshot=args.num_fewshot,
                apply_chat_template=args.chat, confirm_run_unsafe_code=args.allow_code, device=args.device,
                dtype=getattr(torch, args.dtype) if args.dtype else None)
    return 0


if __name__ == "__main__":
    import sys

    from epmq.cli import run_module

    raise SystemExit(run_module(sys.modules[__name__]))
