"""Peak host memory of ``epmq.checkpoint.load_model`` on a quantized Llama, as a multiple of the model's size.

Builds a Llama with random weights in ``--dtype`` (default: about 170 M parameters in bfloat16),
rounds every linear of its decoder layers to the 4-bit grid (RTN, group 128), saves it as a
quantized checkpoint and loads it back in a fresh process, reading the peak resident set size
(``VmHWM``) against the resident size just before the call. The ratio is that increment over the
model's bytes in its dtype (issue 13 asks for at most 1.3).

    python bench/load_memory.py                          # the current loader
    PYTHONPATH=<older checkout> python bench/load_memory.py   # the loader of another commit

Measured figures belong in the README only as printed here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def resident_kib(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers, tied tensors once."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def write_quantized_llama(out: Path, *, hidden: int, intermediate: int, layers: int, vocab: int, dtype: str,
                          bits: int = 4, group_size: int = 128) -> Path:
    """A random Llama in ``dtype`` with every decoder linear on the RTN grid, saved quantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from epmq.adapters import block_linears
    from epmq.checkpoint import save_quantized
    from epmq.grid import rtn_quantize

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                         vocab_size=vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    replacements = {}
    with torch.no_grad():
        for index, block in enumerate(model.model.layers):
            for name, linear in block_linears(block).items():
                quantized = rtn_quantize(linear.weight, bits, group_size)
                linear.weight.copy_(quantized.weight.to(linear.weight.dtype))
                replacements[f"model.layers.{index}.{name}"] = quantized
    return save_quantized(out, model, replacements, {"method": "rtn"})


def measure(path: str) -> dict:
    """Load ``path`` in this process; peak resident increment and model size in bytes."""
    import transformers

    from epmq.checkpoint import load_model, model_class

    model_class(transformers.AutoConfig.from_pretrained(path))  # imports the model's module before the baseline
    before = resident_kib("VmRSS")
    model = load_model(path)
    peak = resident_kib("VmHWM")
    size = model_bytes(model)
    increment = (peak - before) * 1024
    return {"model_bytes": size, "peak_increment_bytes": increment, "ratio": round(increment / size, 3),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def measure_in_subprocess(path: Path) -> dict:
    """:func:`measure` in a fresh interpreter, so the peak belongs to the load alone."""
    out = subprocess.run([sys.executable, __file__, "--measure", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = write_quantized_llama(Path(tmp) / "q", hidden=args.hidden, intermediate=args.intermediate,
                                     layers=args.layers, vocab=args.vocab, dtype=args.dtype)
        result = measure_in_subprocess(path)
    params = result["model_bytes"] / torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    print(f"quantized Llama, {params / 1e6:.0f} M parameters in {result['dtype']} ({result['model_bytes'] / 2**20:.0f} MiB)")
    print(f"load_model peak RSS increment: {result['peak_increment_bytes'] / 2**20:.0f} MiB = {result['ratio']:.2f} x the model")


if __name__ == "__main__":
    main()
