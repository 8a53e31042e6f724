"""AWQ (Lin et al., 2024): activation-aware scaling and clipping, then the min-max grid.

Per block, on the inputs of the fp model, as mit-han-lab/llm-awq's ``auto_scale.py`` and
``auto_clip.py`` run it (a baseline of paper §5.1; 20 grid points, as in its Appendix E; README
"AWQ" for what differs per family):

1. for each scaling group the adapter declares (linears sharing one input, and the module
   producing it), search ``s = x_mean^r`` (AutoAWQ's duo scaling divides by ``w_mean^(1-r)``) for
   ``r`` in ``{0, 1/n_grid, ..., (n_grid-1)/n_grid}``, normalised by ``sqrt(max s * min s)``,
   minimising the MSE of the output of the module the group *inspects* (the attention for q/k/v,
   the MLP for gate/up, the linear itself otherwise) when the group's weights are replaced by
   ``Q(W diag s) diag(s)^-1``. Every group is searched on the unscaled block, then every scale is
   folded (``1/s`` into the previous module, which leaves the fp function unchanged);
2. for every linear except queries and keys, search a clip of each (row, group) absmax among
   ``(1 - i/clip_grid)``, ``i < clip_max_shrink * clip_grid``, minimising the group's output error
   on the tokens at stride ``n // clip_tokens``; all searches read the scaled, unclipped
   block, then every clip is applied;
3. round to the grid.

``Q`` is llm-awq's pseudo-quantizer, whose range is the group's true min and max
(``grid: true_range``; ``zero_inclusive`` is GPTQ's grid, which widens the range to include 0).
``loss: block`` measures the whole block's output for every group instead.

Memory does not grow with the calibration set: ``x_mean`` is a running per-channel sum, the loss of
every candidate is summed batch by batch (one block forward per batch captures the inspected
modules' inputs and fp outputs; the candidates then re-run only those modules), and the clip
search keeps only its sampled tokens. ``search_samples`` (default: all, as the references) bounds
the samples that loss reads, whole calibration batches spread evenly over the tasks, for CPU
budgets; ``x_mean`` and the clip search always read every batch.

Linears in no scaling group (e.g. CLIP's fc2 after quick_gelu, unless ``scale_activation``) get
steps 2 and 3 only. With ``scale_activation`` the activation before such a linear is wrapped in
:class:`ScaledActivation` (llm-awq's ``ScaledActivation``: ``act(x) / s``), so the linear is scaled too.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from epmq.activations import ScaledActivation
from epmq.grid import rtn_quantize
from epmq.quant.base import LayerResult, QuantMethod, register_method


def pseudo_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool, grid: str) -> torch.Tensor:
    return rtn_quantize(weight, bits, group_size, sym, grid).weight.to(weight.dtype)


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


def candidate_weight(weight: torch.Tensor, scales: torch.Tensor, p: dict, awq: dict) -> torch.Tensor:
    """``Q(W diag s) diag(s)^-1``: the weight a scaling candidate ``s`` leaves for the search's loss."""
    scales = scales[None, :].to(weight.dtype)
    return pseudo_quantize(weight * scales, p["bits"], p["group_size"], p["sym"], awq["grid"]) / scales


def kept_candidates(block: nn.Module, groups: list, candidates: list[list[torch.Tensor]], p: dict, awq: dict) -> list:
    """Per group, its linears' candidate weights for every scale, computed once for all calibration
    batches (the weights do not change during the search), or ``None`` for groups beyond the memory
    budget ``awq.search_cache_mib``, whose candidates are recomputed per batch: the same tensors."""
    budget, kept = awq["search_cache_mib"] * 2**20, []
    for group, scales in zip(groups, candidates):
        weights = [block.get_submodule(name).weight.detach() for name in group.linears]
        size = len(scales) * sum(weight.numel() * weight.element_size() for weight in weights)
        if size > budget:
            kept.append(None)
            continue
        budget -= size
        kept.append([[candidate_weight(weight, s, p, awq) for weight in weights] for s in scales])
    return kept


def fold_scales(block: nn.Module, previous_name: str, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """Multiply the linears' input columns by ``s`` and divide ``previous``'s outputs by ``s``.

    ``previous`` is a norm (weight, optional bias), a linear (its rows and bias) or an activation,
    which is wrapped in a :class:`ScaledActivation`; either way the composed function is unchanged.
    """
    previous = block.get_submodule(previous_name)
    scales = scales.to(linears[0].weight.dtype)
    if isinstance(previous, nn.Linear):
        previous.weight.div_(scales[:, None])
    elif hasattr(previous, "weight"):
        previous.weight.div_(scales)
    else:
        parent, _, attribute = previous_name.rpartition(".")
        setattr(block.get_submodule(parent), attribute, ScaledActivation(previous, scales))
    if isinstance(getattr(previous, "bias", None), torch.Tensor):
        previous.bias.div_(scales)
    for linear in linears:
        linear.weight.mul_(scales[None, :])


def search_clip(
    weight: torch.Tensor, inputs: torch.Tensor, bits: int, group_size: int, sym: bool,
    grid: int, max_shrink: float, quantizer_grid: str = "true_range", rows_per_batch: int = 256,
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
            quantized = pseudo_quantize(clipped.reshape(rows, d_in), bits, group_size, sym, quantizer_grid)
            error = (torch.einsum("rgc,tgc->rtg", quantized.reshape(rows, -1, size), x) - reference).pow(2).mean(dim=1)
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


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Hooks:
    """Forward hooks on submodules of a block for one pass, removed on exit."""

    def __init__(self):
        self.handles = []

    def pre(self, module, hook, with_kwargs=False):
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def post(self, module, hook):
        self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _counted_tokens(context, name, batch, x):
    """The tokens of ``x`` (a linear's input) that count in its statistics (padding left out)."""
    mask = context.adapter.input_mask(context.stack, name, batch)
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        x = x[mask]
    return x.reshape(-1, x.shape[-1])


def _each_linear_input(context, names, consume) -> None:
    """Run every calibration batch through the block, calling ``consume(name, x)`` with the counted
    tokens ``x`` (n x d_in) that reach each linear of ``names``."""
    batch = {}

    def hook(name):
        def call(module, args):
            consume(name, _counted_tokens(context, name, batch["current"], args[0]))

        return call

    with _Hooks() as hooks:
        for name in names:
            hooks.pre(context.block.get_submodule(name), hook(name))
        for block_input in context.all_inputs():
            batch["current"] = block_input.batch
            context.run(block_input)


def input_means_and_counts(context, first_linears: list[str], names: list[str]):
    """Per-channel ``mean |x|`` of each of ``first_linears``' inputs, and every linear's token count,
    streamed over every calibration batch (llm-awq's ``get_act_scale``)."""
    sums = {name: None for name in first_linears}
    counts = dict.fromkeys(names, 0)

    def accumulate(name, x):
        counts[name] += x.shape[0]
        if name in sums:
            total = x.abs().sum(dim=0, dtype=torch.float64)
            sums[name] = total if sums[name] is None else sums[name] + total

    _each_linear_input(context, names, accumulate)
    for name, count in counts.items():
        if not count:
            raise ValueError(f"no calibration token reaches {context.prefix}.{name} (every mask is zero)")
    means = {name: (sums[name] / counts[name]).float() for name in first_linears}
    return means, counts


def sampled_tokens(context, counts: dict[str, int], tokens: int) -> dict[str, torch.Tensor]:
    """The inputs of each linear at stride ``n // tokens`` over its ``n`` counted tokens (llm-awq's
    ``input_feat[:, 0::n // n_sample_token]``: between ``tokens`` and ``2 tokens - 1`` of them;
    stride 1 below ``tokens``, where llm-awq fails), gathered batch by batch."""
    strides = {name: max(1, count // tokens) for name, count in counts.items()}
    chunks = {name: [] for name in counts}
    seen = dict.fromkeys(counts, 0)

    def gather(name, x):
        first = -seen[name] % strides[name]
        rows = torch.arange(first, x.shape[0], strides[name], device=x.device)
        chunks[name].append(x[rows].clone())
        seen[name] += x.shape[0]

    _each_linear_input(context, list(counts), gather)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


@register_method("awq")
class AWQ(QuantMethod):
    label = "w/ AWQ"
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
        groups = adapter.awq_groups(block)
        if awq["scale_activation"]:
            groups = groups + adapter.awq_activation_groups(block)
        names = [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]
        with torch.no_grad():
            x_means, counts = input_means_and_counts(context, [group.linears[0] for group in groups], names)
            best = self._search_scales(context, groups, x_means, p, awq)
            for group, scales in zip(groups, best):
                linears = [block.get_submodule(name) for name in group.linears]
                fold_scales(block, group.previous, linears, scales)
                if group.previous in names:
                    self.output_scales[f"{context.prefix}.{group.previous}"] = scales.detach().cpu()
                for name in group.linears:
                    self.input_scales[f"{context.prefix}.{name}"] = scales.detach().cpu()
            if awq["clip"]:
                clipped = [name for name in names if not name.endswith(adapter.awq_no_clip)]
                tokens = sampled_tokens(context, {name: counts[name] for name in clipped}, awq["clip_tokens"])
                limits = {
                    name: search_clip(block.get_submodule(name).weight.detach(), tokens.pop(name), p["bits"],
                                      p["group_size"], p["sym"], awq["clip_grid"], awq["clip_max_shrink"], awq["grid"])
                    for name in clipped
                }
                for name, limit in limits.items():
                    apply_clip(block.get_submodule(name), limit)

    def _search_scales(self, context, groups, x_means, p, awq) -> list[torch.Tensor]:
        """The best scales of every group, each searched on the unscaled block; the loss of every
        candidate is summed batch by batch."""
        block = context.block
        inspected = ["" if awq["loss"] == "block" else group.inspected for group in groups]
        candidates = []
        for group in groups:
            linears = [block.get_submodule(name) for name in group.linears]
            w_mean = weight_magnitude([lin.weight for lin in linears], p["group_size"]) if awq["duo_scaling"] else None
            x_mean = x_means[group.linears[0]]
            candidates.append([candidate_scales(x_mean, w_mean, step / awq["n_grid"]) for step in range(awq["n_grid"])])
        kept = kept_candidates(block, groups, candidates, p, awq)
        losses = [[0.0] * awq["n_grid"] for _ in groups]
        elements = [0] * len(groups)
        captured: dict[str, list] = {}

        def keep_input(name):
            def hook(module, args, kwargs):
                captured[name] = [args, kwargs, None]

            return hook

        def keep_output(name):
            def hook(module, args, kwargs, output):
                captured[name][2] = _hidden(output)

            return hook

        for block_input in search_subset(context.all_inputs(), awq["search_samples"]):
            captured.clear()
            with _Hooks() as hooks:
                for name in dict.fromkeys(inspected):
                    module = block.get_submodule(name)
                    hooks.pre(module, keep_input(name), with_kwargs=True)
                    hooks.post(module, keep_output(name))
                context.run(block_input)
            for position, (group, name) in enumerate(zip(groups, inspected)):
                args, kwargs, target = captured[name]
                module = block.get_submodule(name)
                elements[position] += target.numel()
                with self._restored(block, group.linears) as linears:
                    for step, scales in enumerate(candidates[position]):
                        weights = kept[position][step] if kept[position] else [
                            candidate_weight(original, scales, p, awq) for _, original in linears
                        ]
                        for (linear, _), weight in zip(linears, weights):
                            linear.weight.copy_(weight)
                        error = (_hidden(module(*args, **kwargs)) - target).float().pow(2).sum()
                        losses[position][step] += float(error)
        best = []
        for position, group in enumerate(groups):
            mean_losses = [loss / max(elements[position], 1) for loss in losses[position]]
            step = min(range(len(mean_losses)), key=mean_losses.__getitem__)  # first minimum, as llm-awq
            best.append(candidates[position][step])
            for name in group.linears:
                self.search_log[f"{context.prefix}.{name}"] = {
                    "awq_ratio": step / awq["n_grid"], "objective_before": mean_losses[0],
                    "objective_after": mean_losses[step],
                }
        return best

    @staticmethod
    @contextlib.contextmanager
    def _restored(block, names):
        """The named linears with copies of their weights, restored on exit."""
        linears = [(block.get_submodule(name), block.get_submodule(name).weight.detach().clone()) for name in names]
        try:
            yield linears
        finally:
            for linear, original in linears:
                linear.weight.copy_(original)

    def quantize(self, name, weight, stats):
        p = self.params
        return LayerResult(rtn_quantize(weight, p["bits"], p["group_size"], p["sym"], p["awq"]["grid"]),
                           self.search_log.pop(name, {}))

    def describe(self):
        return {**{key: self.params[key] for key in ("bits", "group_size", "sym")}, "awq": self.params["awq"]}
