"""GPTQ (Frantar et al., 2023) on the merged weight: the shared solver with ``T = W_m``, ``H = H_q + damp I``."""

import torch

from epmq.grid import rtn_quantize
from epmq.quant.base import LayerResult, QuantMethod, register_method
from epmq.solver import gptq_round, quadratic_objective, zero_dead_columns
from epmq.stats import damped


def gptq_problem(weight: torch.Tensor, hessian_sum: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The solver's ``(T, H)`` for GPTQ, in the reference's order: dead columns (``diag(H_q) == 0``)
    are zeroed and given ``H_jj = 1`` first, then ``percdamp * mean(diag H) I`` is added."""
    target, hessian, _ = zero_dead_columns(weight, hessian_sum)
    return target, damped(hessian, percdamp)


@register_method("gptq")
class GPTQ(QuantMethod):
    label = "w/ GPTQ"

    def quantize(self, name, weight, stats):
        p = self.params
        target, hessian = gptq_problem(weight.to(stats.hessian_sum.device), stats.hessian_sum, p["percdamp"])
        rounded = gptq_round(
            target, hessian, p["bits"], p["group_size"], p["sym"], p["act_order"], p["block_size"], p["static_groups"],
            group_fit=p["group_fit"],
        )
        # Logged objective: the output error ||(Q - W_m) X||^2 per calibration token.
        tokens = max(stats.tokens, 1)
        before = rtn_quantize(target, p["bits"], p["group_size"], p["sym"]).weight
        hessian32 = stats.hessian_sum.float()
        return LayerResult(
            rounded,
            {
                "objective_before": quadratic_objective(before, target, hessian32, torch.float32) / tokens,
                "objective_after": quadratic_objective(rounded.weight, target, hessian32, torch.float32) / tokens,
            },
        )
