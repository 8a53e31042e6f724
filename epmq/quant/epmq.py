"""E-PMQ (paper Algorithm 1): expert-guided targets with merged-weight anchoring, on GPTQ's solver.

``epmq`` rounds ``W* = R H^-1`` with ``H = H_q + lam I``; ``epmq_fp`` keeps ``W*`` unrounded. Since
the engine runs each block on the outputs of the blocks already replaced, the later layers of
``epmq_fp`` see inputs produced by the unrounded ``W*`` layers before them: it is E-PMQ's
*sequential continuous relaxation*, not the E-PMQ model minus its rounding (whose later targets are
computed on the outputs of rounded layers).
"""

import torch

from epmq.grid import rtn_quantize
from epmq.quant.base import LayerResult, QuantMethod, register_method
from epmq.solver import gptq_round


@register_method("epmq")
class EPMQ(QuantMethod):
    label = "w/ E-PMQ"
    needs_experts = True
    takes_alpha = True
    round_target = True

    def problem(self, name, weight, stats):
        p = self.params
        return stats.problem(name, weight, p["alpha"], p["percdamp"])

    def quantize(self, name, weight, stats):
        p = self.params
        problem = self.problem(name, weight, stats)
        tokens = max(stats.tokens, 1)
        rtn = rtn_quantize(weight, p["bits"], p["group_size"], p["sym"]).weight
        record = {
            "lam": problem.lam,
            "fallback_damping": problem.fallback_damping,
            # The E-PMQ objective (eq. 12) per calibration token, at the fp merged weight,
            # at its RTN rounding (before) and at the result (after).
            "objective_merged": problem.objective(weight, torch.float32) / tokens,
            "objective_before": problem.objective(rtn, torch.float32) / tokens,
        }
        if not self.round_target:
            record["objective_after"] = problem.objective(problem.target, torch.float32) / tokens
            return LayerResult(problem.target.float(), record)
        rounded = gptq_round(
            problem.target, problem.hessian, p["bits"], p["group_size"], p["sym"], p["act_order"], p["block_size"],
            p["static_groups"], hessian_factor=problem.factor, group_fit=p["group_fit"],
        )
        record["objective_after"] = problem.objective(rounded.weight, torch.float32) / tokens
        return LayerResult(rounded, record)

    def describe(self):
        return {**super().describe(), "alpha": self.params["alpha"]}


@register_method("epmq_fp")
class EPMQUnrounded(EPMQ):
    """E-PMQ's sequential continuous relaxation: every target ``W*`` left in full precision, each
    computed on the outputs of the unrounded ``W*`` layers before it (an analysis row, not a quantizer)."""

    label = "E-PMQ's sequential continuous relaxation (W*, fp)"
    round_target = False

    def describe(self):
        return {"alpha": self.params["alpha"], "percdamp": self.params["percdamp"], "hessian_dtype": self.params["hessian_dtype"]}
