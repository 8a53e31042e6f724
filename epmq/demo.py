"""``python -m epmq demo``: E-PMQ vs GPTQ vs RTN on one synthetic merged layer, in seconds.

K experts are fine-tuned copies of one base weight, merged by task arithmetic; each task has its
own input statistics. The table shows each method's E-PMQ objective (eq. 12, per token) and its
average output error against the experts, ``sum_i ||(Q - W_i) X_i||^2 / n``.
"""

from __future__ import annotations

import argparse

import torch

from epmq.config import method_params
from epmq.grid import rtn_quantize
from epmq.solver import gptq_round
from epmq.stats import TaskStatistics, damped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-out", type=int, default=256)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens per task")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    params = method_params("quantize")
    g = torch.Generator().manual_seed(args.seed)
    base = torch.randn(args.d_out, args.d_in, generator=g) * 0.05
    experts = [base + 0.02 * torch.randn(args.d_out, args.d_in, generator=g) for _ in range(args.experts)]
    merged = base + 0.3 * sum(e - base for e in experts)
    inputs = [
        torch.randn(args.tokens, args.d_in, generator=g) * (torch.rand(args.d_in, generator=g) ** 2 * 3 + 0.1)
        for _ in range(args.experts)
    ]
    # the engine's statistics: each task's Hessian summed from its inputs, then folded
    statistics = TaskStatistics(["layer"], args.d_in, fold_experts=True, dtype=getattr(torch, params["hessian_dtype"]),
                                device=merged.device)
    for expert, x in zip(experts, inputs):
        statistics.add_batch(x)
        statistics.end_task({"layer": expert})
    tokens = args.tokens * args.experts
    grid = (params["bits"], params["group_size"], params["sym"])
    candidates = {"fp merged": merged, "rtn": rtn_quantize(merged, *grid).weight,
                  "gptq": gptq_round(merged, damped(statistics.hessian_sum, params["percdamp"]), *grid).weight}
    for alpha in (0.01, 1.0):
        problem = statistics.problem("layer", merged, alpha, params["percdamp"])
        candidates[f"epmq alpha={alpha:g}"] = gptq_round(problem.target, problem.hessian, *grid).weight
    reference = statistics.problem("layer", merged, params["alpha"], params["percdamp"])
    print(f"one {args.d_out}x{args.d_in} layer, {args.experts} experts, {args.tokens} tokens/task, "
          f"{params['bits']}-bit, group {params['group_size']}; objective at alpha={params['alpha']:g}")
    print(f"{'method':18s} {'E-PMQ objective':>16s} {'error vs experts':>17s}")
    for name, weight in candidates.items():
        expert_error = sum(float(((weight - e) @ x.T).pow(2).sum()) for e, x in zip(experts, inputs)) / tokens
        print(f"{name:18s} {reference.objective(weight) / tokens:16.4f} {expert_error:17.4f}")
    return 0
