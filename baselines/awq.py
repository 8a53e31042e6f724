"""AWQ (Lin et al., 2024): activation-aware scaling and clipping, then the min-max grid.

Per block, on the inputs of the fp model (references: mit-han-lab/llm-awq ``auto_scale.py`` and
``auto_clip.py``, AutoAWQ; method.md section 4):

1. for each scaling group the adapter declares (linears sharing one input, and the norm or linear
   producing it), search ``s = x_mean^r`` (AutoAWQ's duo scaling divides by ``w_mean^(1-r)``) for
   ``r`` in ``{0, 1/n_grid, ...}``, normalised by ``sqrt(max s * min s)``, minimising the MSE of the
   block's output when the group's weights are replaced by ``Q(W diag s) diag(s)^-1``; then fold
   ``1/s`` into the previous module, which leaves the fp function unchanged;
2. for every linear except queries and keys, search a clip of each (row, group) absmax among
   ``(1 - i/clip_grid)``, ``i < clip_max_shrink * clip_grid``, minimising the group's output error
   on sampled tokens;
3. round to the grid (RTN on the scaled, clipped weight).

The scale search's block-output loss runs 1 + n_grid block forwards per group over the calibration
inputs. ``search_samples`` (default: all, as the references) bounds the samples that loss reads, whole
calibration batches spread evenly over the tasks, for CPU budgets; ``x_mean`` and the clip search
always read every token.

Linears in no scaling group (e.g. CLIP's fc2 after quick_gelu) get steps 2 and 3 only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from epmq.grid import rtn_quantize
from epmq.methods import LayerResult, QuantMethod, register_method


def pseudo_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    return rtn_quantize(weight, bits, group_size, sym).weight.to(weight.dtype)


def weight_magnitude(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's ``w_mean``: per input channel, the mean of |w| normalised by each group's absmax."""
    weight = torch.cat(weights, dim=0).float()
    size = weight.shape[1] if group_size == -1 else group_size
    grouped = weight.abs().reshape(-1, size)
    normalised = grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)
    return normalised.reshape(weight.shape).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """``s = x_mean^r`` (or ``x_mean^r / w_mean^(1-r)``), clamped and normalised to geometric mean 1."""
    if w_mean is None:
        scales = x_mean.pow(ratio).clamp(min=1e-4)
    else:
        scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def fold_scales(previous: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """Multiply the linears' input columns by ``s`` and divide ``previous``'s outputs by ``s``.

    ``previous`` is a norm (weight, optional bias) or a linear (its rows and bias); either way the
    composed function is unchanged.
    """
    scales = scales.to(linears[0].weight.dtype)
    if isinstance(previous, nn.Linear):
        previous.weight.div_(scales[:, None])
    else:
        previous.weight.div_(scales)
    if getattr(previous, "bias", None) is not None:
        previous.bias.div_(scales)
    for linear in linears:
        linear.weight.mul_(scales[None, :])


def search_clip(
    weight: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int, sym: bool,
    grid: int, max_shrink: float, rows_per_batch: int = 256,
) -> torch.Tensor:
    """Best clip threshold per (row, group): minimises ``||Q(clamp(w)) x - w x||^2`` over the group."""
    d_out, d_in = weight.shape
    size = d_in if group_size == -1 else group_size
    if d_in % size:
        raise ValueError(f"AWQ's clip search needs group_size ({group_size}) to divide d_in ({d_in})")
    x = inputs.float().reshape(inputs.shape[0], d_in // size, size)  # tokens x groups x size
    best = torch.empty(d_out, d_in // size, dtype=torch.float32, device=weight.device)
    for start in range(0, d_out, rows_per_batch):
        w = weight[start : start + rows_per_batch].float()
        rows = w.shape[0]
        w_groups = w.reshape(rows, d_in // size, size)
        reference = torch.einsum("rgc,tgc->rtg", w_groups, x)
        absmax = w_groups.abs().amax(dim=2)
        best_error = torch.full_like(absmax, float("inf"))
        best_max = absmax.clone()
        for step in range(int(max_shrink * grid)):
            limit = absmax * (1 - step / grid)
            clipped = torch.maximum(torch.minimum(w_groups, limit[..., None]), -limit[..., None])
            quantized = pseudo_quantize(clipped.reshape(rows, d_in), bits, group_size, sym).reshape(rows, -1, size)
            error = (torch.einsum("rgc,tgc->rtg", quantized, x) - reference).pow(2).mean(dim=1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_max = torch.where(better, limit, best_max)
        best[start : start + rows] = best_max
    return best


def apply_clip(linear: nn.Linear, limits: torch.Tensor) -> None:
    d_out, d_in = linear.weight.shape
    grouped = linear.weight.data.reshape(d_out, limits.shape[1], -1)
    limit = limits[..., None].to(grouped.dtype)
    grouped.copy_(torch.maximum(torch.minimum(grouped, limit), -limit))


def search_subset(inputs: list, samples: int | None) -> list:
    """At least ``samples`` samples of ``inputs`` (calibration batches, in task order) as whole
    batches at even strides, so every task keeps its share; all of them when ``samples`` is None."""
    total = sum(batch.hidden.shape[0] for batch in inputs)
    if samples is None or samples >= total:
        return inputs
    per_batch = total / len(inputs)
    keep = min(len(inputs), max(1, math.ceil(samples / per_batch)))
    stride = len(inputs) / keep
    return [inputs[int(i * stride)] for i in range(keep)]


@register_method("awq")
class AWQ(QuantMethod):
    collects_statistics = False
    quantized_inputs = False  # AWQ searches on fp inputs: later blocks see the fp blocks' outputs

    def __init__(self, params):
        super().__init__(params)
        self.search_log: dict[str, dict] = {}
        #: scales folded into each linear's input columns, and into the output rows of linears that
        #: precede a scaling group (analysis and cross-checks): the fp function is
        #: ``diag(output_scale) W diag(1 / input_scale)`` of the stored weight ``W``
        self.input_scales: dict[str, torch.Tensor] = {}
        self.output_scales: dict[str, torch.Tensor] = {}

    def prepare_block(self, context) -> None:
        p, awq = self.params, self.params["awq"]
        block, adapter = context.block, context.adapter
        with torch.no_grad():
            search_inputs = search_subset(context.all_inputs(), awq["search_samples"])
            targets = [context.hidden(context.run(x)) for x in search_inputs]
            for group in adapter.awq_groups(block):
                self._scale_group(context, group, search_inputs, targets, p, awq)
            if awq["clip"]:
                for name, linear in block.named_modules():
                    if isinstance(linear, nn.Linear) and not name.endswith(adapter.awq_no_clip):
                        inputs = context.linear_inputs(name)
                        tokens = inputs[:: max(1, inputs.shape[0] // awq["clip_tokens"])][: awq["clip_tokens"]]
                        limits = search_clip(linear.weight.detach(), tokens, p["bits"], p["group_size"], p["sym"],
                                             awq["clip_grid"], awq["clip_max_shrink"])
                        apply_clip(linear, limits)

    def _scale_group(self, context, group, search_inputs, targets, p, awq):
        block = context.block
        linears = [block.get_submodule(name) for name in group.linears]
        inputs = context.linear_inputs(group.linears[0])
        x_mean = inputs.abs().float().mean(dim=0)
        w_mean = weight_magnitude([lin.weight for lin in linears], p["group_size"]) if awq["duo_scaling"] else None
        originals = [lin.weight.detach().clone() for lin in linears]

        def loss(scales):
            for linear, original in zip(linears, originals):
                scaled = original * scales[None, :].to(original.dtype)
                linear.weight.copy_(pseudo_quantize(scaled, p["bits"], p["group_size"], p["sym"]) / scales[None, :])
            error = sum(
                float((context.hidden(context.run(x)) - target).float().pow(2).sum())
                for x, target in zip(search_inputs, targets)
            )
            return error / sum(t.numel() for t in targets)

        ones = torch.ones_like(x_mean)
        best = (loss(ones), ones, None)
        rtn_loss = best[0]
        for step in range(awq["n_grid"]):
            ratio = step / awq["n_grid"]
            scales = candidate_scales(x_mean, w_mean, ratio)
            current = loss(scales)
            if current < best[0]:
                best = (current, scales, ratio)
        for linear, original in zip(linears, originals):
            linear.weight.copy_(original)
        previous = block.get_submodule(group.previous)
        fold_scales(previous, linears, best[1])
        if isinstance(previous, nn.Linear):
            self.output_scales[f"{context.prefix}.{group.previous}"] = best[1].detach().cpu()
        for name in group.linears:
            self.input_scales[f"{context.prefix}.{name}"] = best[1].detach().cpu()
            self.search_log[f"{context.prefix}.{name}"] = {
                "awq_ratio": best[2], "objective_before": rtn_loss, "objective_after": best[0]
            }

    def quantize(self, name, weight, stats):
        p = self.params
        return LayerResult(rtn_quantize(weight, p["bits"], p["group_size"], p["sym"]), self.search_log.pop(name, {}))

    def describe(self):
        return {**{key: self.params[key] for key in ("bits", "group_size", "sym")}, "awq": self.params["awq"]}
