"""Small stand-ins for the paper-scale models, built offline: tokenizers trained here, models from config.

- ``clip_tokenizer``: a real ``CLIPTokenizer`` over a tiny byte-level BPE (CLIP's normaliser,
  pre-tokenizer and ``</w>`` suffix) trained with the ``tokenizers`` library on the given texts.
- ``t5_tokenizer``: a sentencepiece-like BPE (Metaspace) with T5's special ids (pad 0, eos 1, unk 2)
  and a ``$A </s>`` post-processor, as a ``PreTrainedTokenizerFast``.
- ``llama_tokenizer``: a byte-level BPE with ``<s>``/``</s>`` and a ``<s> $A`` post-processor.
- ``tiny_clip_model``, ``tiny_t5_model``, ``tiny_llama_model``: the real classes with small configs.
- ``perturbed``: an "expert": the model with a seeded perturbation of every floating tensor.
"""

from __future__ import annotations

import copy
import string
from collections.abc import Iterable
from pathlib import Path

import torch

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
PRINTABLE_WORDS = " ".join(string.ascii_letters + string.digits + string.punctuation)


def clip_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # every printable character as a word of its own, so each has its end-of-word token (no unknowns)
    tok.train_from_iterator([*texts, PRINTABLE_WORDS], trainer)
    merges = [tuple(pair) if isinstance(pair, (tuple, list)) else tuple(pair.split(" ")) for pair in _merges(tok)]
    return CLIPTokenizer(vocab=tok.get_vocab(), merges=merges)


def _merges(tok) -> list:
    import json

    return json.loads(tok.to_str())["model"]["merges"]


def t5_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator([*texts, PRINTABLE_WORDS], trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def llama_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_clip_model(tokenizer, seed: int = 0, image_size: int = 32):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 128, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": image_size, "patch_size": 8}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()


def tiny_t5_model(tokenizer, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def tiny_llama_model(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def perturbed(model, seed: int, scale: float = 0.02):
    """A copy of ``model`` with every floating tensor moved by ``scale * N(0, 1)`` noise (an "expert")."""
    expert = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in expert.parameters():
            if param.is_floating_point():
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return expert


def save_with_prefix(model, directory: Path, prefix: str) -> Path:
    """save_pretrained, then rewrite the weights' keys with ``prefix`` (transformers 4's CLIPVisionModel files)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(directory)
    state = load_file(str(directory / "model.safetensors"))
    save_file({prefix + key: value for key, value in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory
