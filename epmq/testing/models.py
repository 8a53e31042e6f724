"""Small models of the paper's architectures, built from config (no download), their experts and
calibration batches, for the tests and the bench scripts."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial weights: wider than the default init, a few outlier channels
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.08)
                module.weight[:, :2] *= 8
    return model.eval()


def tiny_clip_vision(seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=32,
    )
    return CLIPVisionModel(config).eval()


def save_experts(model: torch.nn.Module, directory: Path, k: int, scale: float = 0.02) -> list[Path]:
    """K experts = the model's weights plus independent perturbations, saved as safetensors."""
    paths = []
    for index in range(k):
        generator = torch.Generator().manual_seed(100 + index)
        state = {
            key: (value + scale * torch.randn(value.shape, generator=generator)).contiguous()
            for key, value in model.state_dict().items()
            if value.is_floating_point() and key != "lm_head.weight"
        }
        path = directory / f"expert{index}"
        path.mkdir(parents=True)
        save_file(state, str(path / "model.safetensors"))
        paths.append(path)
    return paths


def text_batches(n_batches: int, batch: int = 4, length: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (batch, length), generator=g)} for _ in range(n_batches)]


def image_batches(n_batches: int, batch: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)} for _ in range(n_batches)]


def outlier_llama(seed: int = 0) -> LlamaForCausalLM:
    """A small Llama with non-trivial random weights: weight outliers and large activation channels."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
                outliers = torch.randint(0, param.numel(), (max(1, param.numel() // 1000),), generator=g)
                param.view(-1)[outliers] *= 10.0
            else:  # RMSNorm weights
                param.copy_(0.5 + torch.rand(param.shape, generator=g))
        model.model.embed_tokens.weight[:, :3] *= 8.0
        for layer in model.model.layers:
            layer.input_layernorm.weight[5:8] *= 6.0
            layer.post_attention_layernorm.weight[9:12] *= 6.0
    return model


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return BertModel(config).eval()


def tiny_t5(seed: int = 0, gated: bool = True):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu" if gated else "relu", decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def padded_text_batches(n_batches: int, batch: int = 4, length: int = 16, seed: int = 0, targets: bool = False):
    """Text batches with right padding (and teacher-forced targets for encoder-decoders)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(1, 128, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        for row, keep in enumerate(torch.randint(length // 2, length + 1, (batch,), generator=g).tolist()):
            mask[row, keep:] = 0
        item = {"input_ids": ids * mask, "attention_mask": mask}
        if targets:
            item["labels"] = torch.randint(1, 128, (batch, 6), generator=g)
        batches.append(item)
    return batches


def input_gram(model, name, tasks):
    """X^T X of the inputs ``name`` receives when the tasks' batches run through ``model``."""
    captured = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    with torch.no_grad():
        for task in tasks:
            for batch in task.batches:
                model(**batch)
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    return x.T @ x
