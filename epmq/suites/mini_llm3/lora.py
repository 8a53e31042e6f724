"""The minimal LoRA of mini-llm3's experts: rank-r adapters on chosen linears of chosen blocks,
merged back into the full weights before saving, so an expert has exactly the pretrained
model's tensors (merging needs the same tensor names in every model)."""

from __future__ import annotations

import math

import torch


class LoRALinear(torch.nn.Module):
    """``base(x) + scale * x A^T B^T`` with A [r, d_in] (seeded normal / sqrt(d_in)), B [d_out, r] = 0."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T.to(x.dtype)) @ (self.lora_b.T.to(x.dtype) * self.scale)

    @torch.no_grad()
    def merged(self) -> torch.nn.Linear:
        """The base linear with ``scale * B A`` added to its weight (in place)."""
        self.base.weight += (self.scale * self.lora_b @ self.lora_a).to(self.base.weight.dtype)
        return self.base


def add_lora(model, spec: dict, generator: torch.Generator) -> list[tuple[torch.nn.Module, str, LoRALinear]]:
    """Wrap the target linears of the chosen blocks (the YAML's ``lora``); everything else is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.layers
    chosen = range(len(layers)) if spec["layers"] == "all" else range(len(layers) - int(spec["layers"]), len(layers))
    wrapped = []
    for index in chosen:
        for path in spec["targets"]:
            parent_path, _, leaf = path.rpartition(".")
            parent = layers[index].get_submodule(parent_path) if parent_path else layers[index]
            lora = LoRALinear(getattr(parent, leaf), spec["rank"], spec["alpha"], generator)
            setattr(parent, leaf, lora)
            wrapped.append((parent, leaf, lora))
    return wrapped


def merge_lora(wrapped: list[tuple[torch.nn.Module, str, LoRALinear]]) -> None:
    """Put every wrapped linear back, its adapter merged into its weight."""
    for parent, leaf, lora in wrapped:
        setattr(parent, leaf, lora.merged())
