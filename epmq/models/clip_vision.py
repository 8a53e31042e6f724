"""A plain-torch ``CLIPVisionModel``: transformers' module tree and forward, without importing transformers.

Why: importing transformers' model classes costs about 4 CPU seconds a process (its generation
utilities pull in scikit-learn, ``torch.distributed`` and ``torch._dynamo``), more than quantizing
or evaluating a model of the offline suites takes. This tree has transformers' module names
(``encoder.layers.N.self_attn.q_proj``, ``mlp.activation_fn`` a module, ...), so the
state dict, the adapter, AWQ's groups and the checkpoint format are those of the real class; and
its forward makes the same torch calls in the same order (``F.layer_norm``, ``F.linear``,
``F.scaled_dot_product_attention`` with ``scale = head_dim ** -0.5``, quick-GELU as
``x * sigmoid(1.702 x)``), so outputs are bit-identical to ``CLIPVisionModel`` with its default SDPA
attention (``tests/test_plain_clip.py`` checks it, block by block and end to end).

No dropout (CLIP's is 0), attention mask, position interpolation or gradient checkpointing: enough to
fine-tune the offline suites' towers (the same autograd graph as transformers', so the same experts)
and to quantize and evaluate any ``CLIPVisionModel``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: CLIP's activation (transformers' ``QuickGELUActivation``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class GELU(nn.Module):
    """``F.gelu`` (``approximate="tanh"`` for ``gelu_new`` / ``gelu_pytorch_tanh``)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


ACTIVATIONS = {
    "quick_gelu": QuickGELU,
    "gelu": GELU,
    "gelu_new": lambda: GELU("tanh"),
    "gelu_pytorch_tanh": lambda: GELU("tanh"),
}


class Config:
    """A checkpoint's ``config.json`` as attributes (what the engine and ``save_quantized`` read)."""

    def __init__(self, values: dict):
        self.__dict__["values"] = dict(values)

    def __getattr__(self, name: str):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        self.__dict__["values"][name] = value

    def to_dict(self) -> dict:
        return dict(self.__dict__["values"])

    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` as transformers writes it (sorted keys, two-space indent)."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        (Path(directory) / "config.json").write_text(text)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.scale = self.head_dim**-0.5
        # transformers' registration order (k, v, q, out): the state dict's order and the engine's layer order
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scale,
                                                  is_causal=False)
        attended = attended.transpose(1, 2).contiguous().reshape(batch, tokens, -1).contiguous()
        return self.out_proj(attended), None


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {activation!r}; supported: {sorted(ACTIVATIONS)}")
        self.activation_fn = ACTIVATIONS[activation]()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = Attention(hidden, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.mlp = MLP(hidden, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))[0]
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class Encoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))


class PositionEmbedding(nn.Module):
    """The ``weight`` of transformers' ``nn.Embedding`` of positions, read whole (every position is used).

    Not an ``nn.Embedding``: its initialisation on the meta device imports ``torch._dynamo`` (a second of start-up)."""

    def __init__(self, positions: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(positions, hidden))


class Embeddings(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        hidden, patch = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.patch_embedding = nn.Conv2d(config.num_channels, hidden, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = PositionEmbedding((config.image_size // patch) ** 2 + 1, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class ClipVisionModel(nn.Module):
    """``CLIPVisionModel`` (transformers 5's tree: no ``vision_model.`` level) in plain torch;
    ``forward(pixel_values)`` returns the pooled output (transformers' ``pooler_output``)."""

    #: the transformers class this one stands for (written as ``architectures`` by ``save_quantized``)
    architecture = "CLIPVisionModel"
    main_input_name = "pixel_values"

    def __init__(self, config: Config | dict):
        super().__init__()
        self.config = config if isinstance(config, Config) else Config(config)
        hidden, eps = self.config.hidden_size, self.config.layer_norm_eps
        self.embeddings = Embeddings(self.config)
        self.pre_layrnorm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = Encoder(self.config)
        self.post_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            hidden = layer(hidden)
        return self.post_layernorm(hidden[:, 0])

    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` and ``model.safetensors`` as transformers' ``save_pretrained`` writes them."""
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        state = {key: value.detach().contiguous() for key, value in self.state_dict().items()}
        save_file(state, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def supports(cls, config: dict) -> bool:
        """Whether a ``config.json`` describes a model this class reproduces exactly."""
        return (config.get("model_type") == "clip_vision_model" and config.get("architectures") == [cls.architecture]
                and config.get("hidden_act", "quick_gelu") in ACTIVATIONS
                and config.get("_attn_implementation", "sdpa") in (None, "sdpa"))
