"""mini-llm3's models and training format: the pretrained Llama (dequantized from the GGUF, or a
tiny random one for smoke configs) and the (prompt + answer) examples the experts train on and
calibration is drawn in."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from epmq.io import sha256_file
from epmq.suites.common import stable_seed
from epmq.suites.mini_llm3.data import gguf_path


def pretrained_model(cfg: dict):
    """(model, what it is, its source record) of ``model.source``: no training.

    ``gguf``: SmolLM2-135M-Instruct dequantized from the package's Q4_1 GGUF into a plain
    ``LlamaForCausalLM`` (``quantization_config`` dropped); its fp weights came from 4-bit blocks.
    ``config`` (smoke configs only): a tiny ``LlamaForCausalLM`` with seeded random weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = getattr(torch, cfg["model"]["dtype"])
    if cfg["model"]["source"] == "config":  # smoke configs: a tiny random Llama, never a result
        from transformers import LlamaConfig

        torch.manual_seed(stable_seed(cfg["seed"], "init"))
        model = LlamaForCausalLM(LlamaConfig(**cfg["model"]["config"])).to(dtype)
        what, source = "a small LlamaForCausalLM with random weights, built from model.config (smoke test only)", {}
    else:
        gguf = gguf_path(cfg)
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
    return model, what, source


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


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [N, longest] int64, right-padded with ``pad_id``."""
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
