"""CLIP zero-shot classification, the protocol of paper §5.1 (as in CLIP and fusion_bench).

- Zero-shot head of a task: for every class, encode every prompt template filled with the class
  name, L2-normalise each text embedding, average over templates, renormalise.
- Image embedding: the visual projection of the tower's pooled output (CLS token after
  ``post_layernorm``), L2-normalised.
- Logits: ``logit_scale.exp() * image_embedding @ heads.T``; the metric is top-1 accuracy, with
  the binomial standard error ``sqrt(p (1 - p) / n)``.

The protocol is independent of the suite: ``build_zeroshot_head`` takes any text encoder function
(CLIP's text tower for the paper-scale suites, MiniLM for mini-clip8). The image side is any
pixel_values -> pooled output function (``hf_pooled_encoder``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from epmq.progress import progress

TextEncoder = Callable[[list[str]], torch.Tensor]
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------- heads --
def build_zeroshot_head(encode_text: TextEncoder, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Zero-shot head [n_classes, dim]: per class, mean of normalised template embeddings, renormalised."""
    if not classnames or not templates:
        raise ValueError("a zero-shot head needs at least one class name and one template")
    texts = [template.format(name) for name in classnames for template in templates]
    embeddings = encode_text(texts).float()
    if embeddings.shape[0] != len(texts):
        raise ValueError(f"text encoder returned {embeddings.shape[0]} embeddings for {len(texts)} texts")
    embeddings = F.normalize(embeddings, dim=-1).reshape(len(classnames), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)


# ---------------------------------------------------------------------------------- images --
def image_features(pooled: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Normalised image embedding: ``normalize(pooled @ projection.T)`` (projection [dim, hidden])."""
    return F.normalize(pooled @ projection.T.to(pooled.dtype), dim=-1)


def zeroshot_logits(features: torch.Tensor, heads: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """``exp(logit_scale) * features @ heads.T``; ``logit_scale`` is stored in log space, as in CLIP."""
    scale = torch.as_tensor(logit_scale, dtype=features.dtype).exp()
    return scale * features @ heads.T.to(features.dtype)


@torch.inference_mode()
def image_embeddings(
    encoder: ImageEncoder, pixel_values: torch.Tensor, projection: torch.Tensor, batch_size: int = 1024
) -> list[torch.Tensor]:
    """Normalised image embeddings of ``pixel_values`` [N, C, H, W], one tensor per batch of ``batch_size``.

    Kept per batch so that logits computed from them are those of a batch-by-batch ``predict``, bit for bit."""
    return [image_features(encoder(pixel_values[start : start + batch_size]), projection)
            for start in progress(range(0, pixel_values.shape[0], batch_size), "evaluating", unit="batch")]


@torch.inference_mode()
def classify(embeddings: Sequence[torch.Tensor], heads: torch.Tensor, logit_scale: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Top-1 predictions [N] of the zero-shot head ``heads`` on per-batch image embeddings."""
    predictions = [zeroshot_logits(batch, heads, logit_scale).argmax(dim=-1) for batch in embeddings]
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def predict(
    encoder: ImageEncoder,
    pixel_values: torch.Tensor,
    projection: torch.Tensor,
    heads: torch.Tensor,
    logit_scale: torch.Tensor | float = 0.0,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Top-1 predictions [N] of the zero-shot classifier on ``pixel_values`` [N, C, H, W]."""
    return classify(image_embeddings(encoder, pixel_values, projection, batch_size), heads, logit_scale)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int]:
    """(accuracy %, binomial standard error %, n)."""
    n = int(labels.numel())
    if n == 0:
        raise ValueError("empty test set")
    p = float((predictions == labels).double().mean())
    return 100.0 * p, 100.0 * binomial_stderr(p, n), n


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def average_stderr(stderrs: Sequence[float]) -> float:
    """Standard error of an unweighted mean of independent per-task accuracies."""
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)


def hf_pooled_encoder(model: torch.nn.Module) -> ImageEncoder:
    """Wrap any transformers CLIP vision model (or CLIPModel), or a plain-torch one of ``epmq.models``
    (which returns the pooled output itself), as pixel_values -> pooled output."""
    vision = model.vision_model if hasattr(model, "vision_model") else model

    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        output = vision(pixel_values=pixel_values)
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    return encode
