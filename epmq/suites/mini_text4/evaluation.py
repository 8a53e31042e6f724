"""mini-text4's metric: accuracy of an encoder read through a task's linear head, with its binomial
standard error (the suite's analogue of the paper's GLUE accuracies, Table 3)."""

from __future__ import annotations

import math

import torch

from epmq.suites.mini_text4.model import encode


def head_logits(features: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class logits of the linear head ``{weight [C, hidden], bias [C]}`` on pooled features."""
    return features @ head["weight"].T.to(features.dtype) + head["bias"].to(features.dtype)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int]:
    """(accuracy %, binomial standard error %, n)."""
    n = int(labels.numel())
    if n == 0:
        raise ValueError("empty test set")
    p = float((predictions == labels).double().mean())
    return 100.0 * p, 100.0 * math.sqrt(max(p * (1 - p), 0.0) / n), n



def head_accuracy(cfg: dict, model, tokens: dict[str, torch.Tensor], labels: torch.Tensor,
                  head: dict[str, torch.Tensor]) -> tuple[float, float, int]:
    """Accuracy of ``model`` read through ``head`` on tokenized texts (batched by ``eval.batch_size``)."""
    features = encode(cfg, model, tokens, cfg["eval"]["batch_size"])
    return accuracy(head_logits(features, head).argmax(-1), labels)
