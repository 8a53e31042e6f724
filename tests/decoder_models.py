"""Tiny decoder-only LMs of every family the decoder adapter serves, built from config (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

VOCAB = 96
#: family -> (config class, model class, family-specific config fields)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}


def tiny_decoder(family: str, seed: int = 0, kv_heads: int = 4) -> torch.nn.Module:
    """A 2-block model of ``family`` with non-trivial weights (outlier input channels, non-unit norms)."""
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, **extra,
    )
    model = getattr(transformers, model_class)(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=g) * 0.08)
                param[:, :2] *= 4
            else:  # norm weights and biases: away from their initial ones / zeros
                param.copy_(0.5 + torch.rand(param.shape, generator=g) if "norm" in name else
                            0.1 * torch.randn(param.shape, generator=g))
    return model


def save_family(model: torch.nn.Module, directory: Path, experts: int, scale: float = 0.02) -> tuple[Path, list[Path]]:
    """``directory/base`` (the model) and ``directory/expert<i>`` (every floating tensor perturbed)."""
    base = directory / "base"
    model.save_pretrained(base)
    paths = []
    for index in range(experts):
        g = torch.Generator().manual_seed(100 + index)
        state = {key: (value + scale * torch.randn(value.shape, generator=g)).contiguous()
                 for key, value in model.state_dict().items() if value.is_floating_point()}
        path = directory / f"expert{index}"
        path.mkdir(parents=True)
        model.config.save_pretrained(path)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        paths.append(path)
    return base, paths


def save_calibration(directory: Path, tasks: int, samples: int = 4, length: int = 12) -> list[Path]:
    """One calibration file per task (``input_ids`` and ``attention_mask``, right-padded)."""
    paths = []
    for index in range(tasks):
        g = torch.Generator().manual_seed(200 + index)
        ids = torch.randint(3, VOCAB, (samples, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length // 2 :] = 0
        path = directory / f"task{index}.safetensors"
        save_file({"input_ids": ids * mask, "attention_mask": mask}, str(path))
        paths.append(path)
    return paths
