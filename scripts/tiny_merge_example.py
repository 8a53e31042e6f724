"""Write a tiny decoder LM, two "experts" and calibration files, to try the mergekit walkthrough.

    python scripts/tiny_merge_example.py OUT_DIR

OUT_DIR/base, OUT_DIR/expert_math, OUT_DIR/expert_code: Qwen2ForCausalLM folders (2 blocks,
hidden size 64), built from config, no download. The experts are the base plus small random
perturbations standing in for fine-tuning. OUT_DIR/calib/{math,code}.safetensors: 16 random
token sequences each (``input_ids``, ``attention_mask``), in the format ``python -m epmq quantize
--calib`` reads. Only a stand-in: real calibration data is text from each expert's own task.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

TASKS = ("math", "code")


def main(out: Path) -> None:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    base = Qwen2ForCausalLM(config)
    with torch.no_grad():  # wider than the default init, so rounding matters
        for param in base.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.08)
    base.save_pretrained(out / "base")
    for index, task in enumerate(TASKS):
        expert = Qwen2ForCausalLM(config)
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for param, source in zip(expert.parameters(), base.parameters()):
                param.copy_(source + 0.02 * torch.randn(source.shape, generator=generator))
        expert.save_pretrained(out / f"expert_{task}")
        ids = torch.randint(3, config.vocab_size, (16, 32), generator=generator)
        (out / "calib").mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(out / "calib" / f"{task}.safetensors"))
    print(f"wrote {out}/base, {out}/expert_math, {out}/expert_code, {out}/calib/{{math,code}}.safetensors")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/tiny_merge_example.py OUT_DIR")
    main(Path(sys.argv[1]))
