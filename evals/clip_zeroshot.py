"""CLIP zero-shot classification, the protocol of paper §5.1 (as in CLIP and fusion_bench).

- Zero-shot head of a task: for every class, encode every prompt template filled with the class
  name, L2-normalise each text embedding, average over templates, renormalise.
- Image embedding: the visual projection of the tower's pooled output (CLS token after
  ``post_layernorm``), L2-normalised.
- Logits: ``logit_scale.exp() * image_embedding @ heads.T``; the metric is top-1 accuracy, with
  the binomial standard error ``sqrt(p (1 - p) / n)``.

The protocol is independent of the suite: ``build_zeroshot_head`` takes any text encoder function
(CLIP's text tower for the paper-scale suites, MiniLM for mini-clip8).

``ClipVisionTower`` is a plain-torch forward of a ``transformers.CLIPVisionModel`` checkpoint
(config.json + safetensors). It exists only for speed: importing transformers' CLIP costs about
5 s on a 2-core machine, while an evaluation of the mini suite runs in about as long, and ~60
models get evaluated. ``tests/test_mini_clip8.py`` checks it against ``CLIPVisionModel`` to
float32 round-off; any model object with the same call signature (pixel_values -> pooled output)
can be used instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

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


# --------------------------------------------------------------------- plain-torch tower --
class ClipVisionTower(torch.nn.Module):
    """Inference-only forward of ``CLIPVisionModel`` from its config dict and state dict.

    Returns the pooled output (``post_layernorm`` of the CLS token), exactly what
    ``CLIPVisionModel(...).pooler_output`` returns. Keys may carry the ``vision_model.`` prefix
    (``CLIPVisionModel``) or not.
    """

    ACTIVATIONS = {
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }

    def __init__(self, config: dict, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        if config.get("model_type") == "clip":  # a full CLIPModel config: take its vision part
            config = config["vision_config"]
        self.config = config
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in state_dict) else ""
        self.w = {k[len(prefix) :]: v.float() for k, v in state_dict.items() if k.startswith(prefix)}
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-5))
        self.patch = int(config["patch_size"])
        act = config.get("hidden_act", "quick_gelu")
        if act not in self.ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}")
        self.act = self.ACTIVATIONS[act]
        missing = [k for k in self._required_keys() if k not in self.w]
        if missing:
            raise KeyError(f"CLIP vision state dict lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}")

    def _required_keys(self) -> list[str]:
        keys = ["embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"]
        keys += [f"{n}.{p}" for n in ("pre_layrnorm", "post_layernorm") for p in ("weight", "bias")]
        for i in range(self.layers):
            base = f"encoder.layers.{i}."
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                         "mlp.fc1", "mlp.fc2", "layer_norm1", "layer_norm2"):
                keys += [base + name + ".weight", base + name + ".bias"]
        return keys

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ClipVisionTower:
        from safetensors.torch import load_file

        from epmq.io import safetensors_files

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        state: dict[str, torch.Tensor] = {}
        for file in safetensors_files(directory):
            state.update(load_file(str(file)))
        return cls(config, state)

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.w
        x = F.conv2d(pixel_values.float(), w["embeddings.patch_embedding.weight"], stride=self.patch)
        x = x.flatten(2).transpose(1, 2)  # [B, patches, hidden]
        cls = w["embeddings.class_embedding"].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + w["embeddings.position_embedding.weight"][: x.shape[1] + 1]
        x = self._ln(x, "pre_layrnorm")
        batch, tokens, hidden = x.shape
        head_dim = hidden // self.heads
        for i in range(self.layers):
            base = f"encoder.layers.{i}."
            h = self._ln(x, base + "layer_norm1")
            q, k, v = (
                self._linear(h, base + f"self_attn.{p}_proj").view(batch, tokens, self.heads, head_dim).transpose(1, 2)
                for p in "qkv"
            )
            a = F.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5)
            x = x + self._linear(a.transpose(1, 2).reshape(batch, tokens, hidden), base + "self_attn.out_proj")
            h = self._ln(x, base + "layer_norm2")
            x = x + self._linear(self.act(self._linear(h, base + "mlp.fc1")), base + "mlp.fc2")
        return self._ln(x[:, 0], "post_layernorm")


def hf_pooled_encoder(model: torch.nn.Module) -> ImageEncoder:
    """Wrap any transformers CLIP vision model (or CLIPModel), or a plain-torch one of ``epmq.models``
    (which returns the pooled output itself), as pixel_values -> pooled output."""
    vision = model.vision_model if hasattr(model, "vision_model") else model

    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        output = vision(pixel_values=pixel_values)
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    return encode
