"""Our GPTQ versus llm-compressor's GPTQ: time of the quantization stage on the same Llama and data.

Both start from the same fp model object and calibration token ids and end with quantized weights
(calibration forward passes, Hessians, rounding); model construction and loading are outside both
timings. Settings: 4 bits, group 32, asymmetric, damping 0.01, no act-order; our run uses the
matching variants (static groups, one pass per block) and then our defaults. Rounds alternate and
the best time of each is compared. The last line is ``ours/reference time ratio: R``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epmq.config import method_params  # noqa: E402
from epmq.engine import CalibrationTask, quantize_model  # noqa: E402
from epmq.catalog import get_method  # noqa: E402
from epmq.testing.reference_quantizers.gptq import run_llmcompressor_gptq  # noqa: E402


def build_model(hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.05)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = build_model(args.hidden, args.layers)
    ids = torch.randint(0, 1024, (args.samples, args.length), generator=torch.Generator().manual_seed(1))
    tasks = [CalibrationTask("calib", [{"input_ids": ids[i : i + 8]} for i in range(0, args.samples, 8)])]
    common = dict(bits=4, group_size=32, sym=False, act_order=False, percdamp=0.01)

    def ours(**variant):
        method = get_method("gptq", method_params("quantize", **common, **variant))
        copy_ = copy.deepcopy(model)
        start = time.perf_counter()
        quantize_model(copy_, method, tasks)
        return time.perf_counter() - start

    def reference():
        result = run_llmcompressor_gptq(model, ids, bits=4, group_size=32, sym=False, act_order=False,
                                        dampening_frac=0.01, batch_size=8, num_threads=args.threads)
        return result.seconds

    torch.set_num_threads(args.threads)
    print(f"Llama hidden {args.hidden}, {args.layers} layers, {args.samples}x{args.length} tokens, "
          f"{args.threads} threads, best of {args.repeats}")
    runs = {"reference": reference, "ours (matched variants)": lambda: ours(static_groups=True, true_sequential=False),
            "ours (defaults)": ours}
    times = {name: [] for name in runs}
    for round_ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(run())
            print(f"  round {round_ + 1}: {name:24s} {times[name][-1]:.2f} s")
    best = {name: min(values) for name, values in times.items()}
    print(f"ours (defaults)/reference time ratio: {best['ours (defaults)'] / best['reference']:.3f}")
    print(f"ours/reference time ratio: {best['ours (matched variants)'] / best['reference']:.3f}")


if __name__ == "__main__":
    main()
