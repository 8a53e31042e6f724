"""The zero-shot heads of the image suites: the frozen all-MiniLM-L6-v2 text encoder, the class
embeddings CLIP's protocol builds from it (``evals.clip_zeroshot.build_zeroshot_head``: every
template encoded, normalised, averaged, renormalised; paper §5.1), and the file that carries them
beside the pretrained tower."""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

from evals import clip_zeroshot as zs

#: ``visual_projection.weight``, ``logit_scale`` (log space) and ``heads.<task>``, beside the pretrained tower
HEAD_FILE = "head.safetensors"


def minilm_text_encoder(cfg: dict) -> zs.TextEncoder:
    """The frozen all-MiniLM-L6-v2 sentence encoder: mean pooling over tokens, as its model card says."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    spec = cfg["text_encoder"]
    path = importlib.import_module(spec["package"]).get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    if spec["pooling"] != "mean":
        raise ValueError(f"unsupported pooling {spec['pooling']!r}")

    @torch.inference_mode()
    def encode(texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), spec["batch_size"]):
            batch = tokenizer(texts[start : start + spec["batch_size"]], padding=True, truncation=True,
                              max_length=spec["max_length"], return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
        return torch.cat(out)

    return encode


def build_heads(cfg: dict, encode: zs.TextEncoder) -> dict[str, torch.Tensor]:
    """Every task's zero-shot head [classes, dim] from its class names and evaluation templates."""
    return {name: zs.build_zeroshot_head(encode, t["classnames"], t["templates"]) for name, t in cfg["tasks"].items()}


def load_head(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``head.safetensors``: ``visual_projection.weight``, ``logit_scale`` (log space), ``heads.<task>``."""
    from safetensors.torch import load_file

    return load_file(str(path))
