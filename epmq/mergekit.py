"""mergekit YAML configs as the source of experts, base model and merge.

A mergekit config (``mergekit-yaml merge.yml OUT``) names the models, the base model, the merge
method and its parameters. :func:`read_mergekit_config` turns one into a :class:`MergekitPlan`:
the base model, the experts (``models:`` other than the base, in order) and, when the method is one
of our operators with the same semantics, our operator and its parameters. What maps (mergekit's
code, ``mergekit/merge_methods/``, is the reference):

- ``linear``: ``sum_i w_i W_i / sum_i w_i`` (``normalize: true``, the default) is our
  ``simple_average`` exactly when every weight is equal; unequal weights, or ``normalize: false``
  with weights not summing to 1, are refused.
- ``task_arithmetic``: ``W_0 + sum_i w_i tau_i`` (divided by ``sum_i w_i`` with
  ``normalize: true``) is our ``task_arithmetic`` with ``scaling = w`` when every weight is the
  same ``w`` (``w / sum_i w_i`` normalised) and every density is 1.

Everything else is refused by name: ``ties`` (mergekit trims each tensor to its own top
``density`` and weights the disjoint mean by ``weight``; ours follows FusionBench, one top-k
threshold per task over the whole model, unweighted: not the same operator), ``slerp``,
``dare_*``, ``della``, ``model_stock``, ``breadcrumbs``, ``passthrough``... Parameters must be
scalars (no gradients or tensor-name filters), models local folders (mergekit resolves paths from
the working directory; so does this), and the output dtype (``out_dtype`` or ``dtype``) the base
model's, since our merges write the base model's dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from epmq.io import sha256_file

#: top-level keys of a mergekit config this reader understands; the rest (``slices``,
#: ``input_model_parameters``...) is refused
_KNOWN_KEYS = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype",
               "tokenizer_source", "tokenizer", "chat_template", "name"}
#: global parameters each mapped method accepts (mergekit's, with the same meaning)
_GLOBAL_PARAMS = {"linear": {"normalize", "weight"}, "task_arithmetic": {"normalize", "weight", "density", "int8_mask"}}
_FLOAT_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                 "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


@dataclass
class MergekitPlan:
    """What a mergekit config says, in our terms."""

    config: Path
    method: str  # mergekit's merge_method
    base: Path | None
    experts: list[Path]
    weights: list[float]
    densities: list[float | None]
    global_params: dict = field(default_factory=dict)
    dtype: str | None = None

    @property
    def pretrained(self) -> Path:
        """The base model, or (``linear`` has none) the first model: what sets names and shapes."""
        return self.base or self.experts[0]

    def record(self) -> dict:
        """Provenance: which config, its hash and what it mapped to."""
        return {"path": str(self.config.resolve()), "sha256": sha256_file(self.config), "merge_method": self.method}


def read_mergekit_config(path: str | Path) -> MergekitPlan:
    """Parse and check a mergekit YAML config; bad input raises ``ValueError`` naming the key."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from error
    if not isinstance(config, dict) or "merge_method" not in config:
        raise ValueError(f"{path}: not a mergekit config (no merge_method)")
    unknown = sorted(set(config) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"{path}: mergekit key {unknown[0]!r} is not supported (supported: models, base_model, "
                         "merge_method, parameters, dtype, out_dtype)")
    if not isinstance(config.get("models"), list) or not config["models"]:
        raise ValueError(f"{path}: `models:` must be a non-empty list of {{model: FOLDER, parameters: ...}}")
    base = _model_folder(path, config["base_model"], "base_model") if config.get("base_model") else None
    experts, weights, densities = [], [], []
    for position, entry in enumerate(config["models"]):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"{path}: models[{position}] needs a `model:` key")
        folder = _model_folder(path, entry["model"], f"models[{position}]")
        params = entry.get("parameters") or {}
        if base is not None and folder.resolve() == base.resolve():
            continue  # mergekit lists the base among the models too; it contributes no task vector
        experts.append(folder)
        weights.append(_scalar(path, params, "weight", f"models[{position}]", None))
        densities.append(_scalar(path, params, "density", f"models[{position}]", None))
    if not experts:
        raise ValueError(f"{path}: no model besides the base model")
    global_params = config.get("parameters") or {}
    for key, value in global_params.items():
        _scalar(path, global_params, key, "parameters", value)
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype is not None and str(dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"{path}: dtype {dtype!r} is not one of {sorted(_FLOAT_DTYPES)}")
    plan = MergekitPlan(path, str(config["merge_method"]), base, experts, weights, densities, global_params,
                        None if dtype is None else _FLOAT_DTYPES[str(dtype)])
    _check_dtype(plan)
    return plan


def our_merge(plan: MergekitPlan) -> tuple[str, dict]:
    """Our operator and parameters computing the same merge as ``plan``, or ``ValueError`` saying why not."""
    where = f"{plan.config}: merge_method {plan.method!r}"
    extra = sorted(set(plan.global_params) - _GLOBAL_PARAMS.get(plan.method, set()))
    if plan.method in _GLOBAL_PARAMS and extra:
        raise ValueError(f"{where}: parameter {extra[0]!r} has no counterpart in our operator")
    weights = [plan.global_params.get("weight") if w is None else w for w in plan.weights]
    if any(w is None for w in weights) and plan.method in ("linear", "task_arithmetic"):
        raise ValueError(f"{where} needs a `weight` for every model (mergekit requires one)")
    if plan.method == "linear":
        if plan.base is not None:
            raise ValueError(f"{where} with a base_model: mergekit averages the base in with the models; "
                             "our simple_average averages the experts only: drop base_model")
        normalize = plan.global_params.get("normalize", True)
        equal = len(set(weights)) == 1
        if not equal or not (normalize or abs(sum(weights) - 1.0) < 1e-12):
            raise ValueError(f"{where} with weights {weights} (normalize: {normalize}) is a weighted average; "
                             "our simple_average is the plain mean: give every model the same weight")
        return "simple_average", {}
    if plan.method == "task_arithmetic":
        if plan.base is None:
            raise ValueError(f"{where} needs a base_model")
        densities = [plan.global_params.get("density", 1.0) if d is None else d for d in plan.densities]
        if any(d != 1.0 for d in densities):
            raise ValueError(f"{where} with density {densities} sparsifies; our task_arithmetic keeps every entry")
        if len(set(weights)) != 1:
            raise ValueError(f"{where} with unequal weights {weights}: our task_arithmetic has one scaling for all tasks")
        scaling = weights[0] / sum(weights) if plan.global_params.get("normalize", False) else weights[0]
        return "task_arithmetic", {"scaling": float(scaling)}
    if plan.method == "ties":
        raise ValueError(f"{where} is refused: mergekit trims each tensor to its own top `density` and weights the "
                         "disjoint mean; our ties (FusionBench) trims with one threshold per task over the whole "
                         "model: not the same operator. Merge with mergekit and pass the result as --model")
    raise ValueError(f"{where} is not implemented here (ours: linear with equal weights, task_arithmetic "
                     "with equal weights); merge with mergekit and pass the result as --model")


def _model_folder(config: Path, reference, where: str) -> Path:
    if isinstance(reference, dict):  # mergekit's long form {model: ..., lora: ...}
        if set(reference) - {"model"}:
            raise ValueError(f"{config}: {where}: LoRA and other model modifiers are not supported")
        reference = reference["model"]
    reference = str(reference)
    if "+" in reference:
        raise ValueError(f"{config}: {where}: {reference!r} applies a LoRA (model+lora), not supported")
    folder = Path(reference).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{config}: {where}: {reference!r} is not a local model folder (with config.json); "
                         f"fetch it first: python -m epmq.hub fetch --source {reference} --out DIR, and name DIR")
    return folder


def _scalar(config: Path, params: dict, key: str, where: str, default):
    value = params.get(key, default)
    if value is not None and not isinstance(value, (int, float, bool)):
        raise ValueError(f"{config}: {where}: parameter {key!r} is {value!r}; only scalars are supported "
                         "(no gradients or tensor-name filters)")
    return value


def _check_dtype(plan: MergekitPlan) -> None:
    if plan.dtype is None:
        return
    stored = json.loads((plan.pretrained / "config.json").read_text())
    base_dtype = stored.get("dtype") or stored.get("torch_dtype") or "float32"
    if base_dtype != plan.dtype:
        raise ValueError(f"{plan.config}: dtype {plan.dtype} differs from the base model's {base_dtype}; our merges "
                         f"write the base model's dtype: set dtype: {base_dtype}")
