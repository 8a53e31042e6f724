"""Our GPTQ and AWQ against llm-compressor's, in numbers: per-layer relative output errors.

The same setting as tests/test_reference_crosscheck.py (which asserts the bounds): the small
outlier Llama, 16 calibration sequences of 32 tokens, 4 bits, group size 32, damping 0.01. Prints,
summed over the 14 linears, ``||(W_eff - W) X|| / ||W X||`` for the reference, ours with the
reference's variants, ours with our defaults and our other variants (GPTQ: grids fitted on the
error-updated columns; AWQ: llm-awq's procedure, the default, and the block-output loss), RTN for
AWQ, and the worst per-layer ratio.

    python bench/reference_errors.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epmq.config import method_params  # noqa: E402
from epmq.engine import CalibrationTask, quantize_model  # noqa: E402
from epmq.grid import rtn_quantize  # noqa: E402
from epmq.catalog import get_method  # noqa: E402
from epmq.testing.reference_quantizers.awq import run_llmcompressor_awq  # noqa: E402
from epmq.testing.reference_quantizers.crosscheck import BITS, DAMP, GROUP, ours, relative_output_errors  # noqa: E402
from epmq.testing.reference_quantizers.gptq import run_llmcompressor_gptq  # noqa: E402
from epmq.testing.models import outlier_llama  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model = outlier_llama()
    ids = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(5))
    tasks = [CalibrationTask("calib", [{"input_ids": ids[i : i + 4]} for i in range(0, 16, 4)])]

    for act_order in (False, True):
        reference = run_llmcompressor_gptq(model, ids, bits=BITS, group_size=GROUP, sym=False, act_order=act_order,
                                           dampening_frac=DAMP)
        ref = relative_output_errors(model, tasks, reference.weights)
        matched = relative_output_errors(
            model, tasks, ours(model, tasks, act_order=act_order, static_groups=True, true_sequential=False))
        default = relative_output_errors(model, tasks, ours(model, tasks, act_order=act_order))
        current = relative_output_errors(model, tasks, ours(model, tasks, act_order=act_order, group_fit="current"))
        worst = max(abs(matched[name] / ref[name] - 1) for name in ref)
        print(f"GPTQ act_order={act_order}: summed error llm-compressor {sum(ref.values()):.4f}, ours matched "
              f"{sum(matched.values()):.4f}, ours defaults (grids fitted at block start, IST-DASLab) "
              f"{sum(default.values()):.4f}, ours group_fit=current {sum(current.values()):.4f}; "
              f"largest per-layer |matched/reference - 1| {worst:.4f}")

    reference = run_llmcompressor_awq(model, ids, bits=BITS, group_size=GROUP, sym=False)
    ref_in = {linear: s for smooth, s in reference.awq_scales.items() for linear in reference.awq_mappings[smooth]}
    ref_out = {smooth: s for smooth, s in reference.awq_scales.items() if smooth.endswith("_proj")}
    ref = relative_output_errors(model, tasks, reference.weights, ref_in, ref_out)
    rtn = relative_output_errors(
        model, tasks, {name: rtn_quantize(model.get_submodule(name).weight.detach(), BITS, GROUP).weight for name in ref})

    def ours_awq(**awq):
        method = get_method("awq", method_params("quantize", bits=BITS, group_size=GROUP, awq=awq))
        result = quantize_model(copy.deepcopy(model), method, tasks)
        weights = {name: layer.weight for name, layer in result.replacements.items()}
        return relative_output_errors(model, tasks, weights, method.input_scales, method.output_scales)

    matched = ours_awq(duo_scaling=True, clip=False, grid="zero_inclusive")
    default, block = ours_awq(), ours_awq(loss="block", grid="zero_inclusive")
    print(f"AWQ: summed error llm-compressor {sum(ref.values()):.4f}, ours matched to it "
          f"{sum(matched.values()):.4f}, ours defaults (llm-awq) {sum(default.values()):.4f}, ours block-output "
          f"loss with GPTQ's grid (the previous default) {sum(block.values()):.4f}, RTN {sum(rtn.values()):.4f}; "
          f"worst per-layer ratio to llm-compressor: matched {max(matched[n] / ref[n] for n in ref):.3f}, "
          f"defaults {max(default[n] / ref[n] for n in ref):.3f}, block {max(block[n] / ref[n] for n in ref):.3f}")


if __name__ == "__main__":
    main()
