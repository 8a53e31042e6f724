# Path conventions, wildcard constraints and the functions that turn targets into files.
#
#   results/{suite}/pretrained                      pretrained model (+ head.safetensors)
#   results/{suite}/experts/{task}                  one expert per task
#   results/{suite}/calib/n{samples}-s{seed}/{task}.safetensors
#   results/{suite}/merged/{merge}                  fp merged model
#   results/{suite}/quant/{merge}/{method}/w{bits}g{group}n{samples}
#                                                   method = rtn | gptq | awq | epmq-a{alpha} | epmq_fp-a{alpha}
#   results/{suite}/eval/{model}                    one {task}.json per task; model = any of the above
#   results/tables/{target}.{csv,md,tex,html,png}
import json

from epmq.suites import packaged_config
from epmq.suites.mini_clip8 import load_config as load_suite_config

ALPHA_METHODS = ("epmq", "epmq_fp")
CALIBRATION_FREE = ("rtn",)


wildcard_constraints:
    suite=r"[A-Za-z0-9_.-]+",
    task=r"[A-Za-z0-9_.-]+",
    merge=r"[a-z_]+",
    method=r"(rtn|gptq|awq|(epmq|epmq_fp)-a[0-9.e+-]+)",
    bits=r"\d+",
    group=r"-?\d+",
    samples=r"\d+",
    seed=r"\d+",
    model=r"(pretrained|experts/[^/]+|merged/[^/]+|quant/[^/]+/[^/]+/w\d+g-?\d+n\d+)",
    target=r"[A-Za-z0-9_]+",


def suite_settings(suite):
    return config["suites"][suite]


def suite_config_path(suite):
    return suite_settings(suite)["suite_config"] or str(packaged_config(suite))


def tasks(suite):
    return list(load_suite_config(suite_config_path(suite))["tasks"])


def method_id(method, alpha):
    """The path component and table label of a quantizer setting (alpha only where it matters)."""
    return f"{method}-a{alpha:g}" if method in ALPHA_METHODS else method


def split_method(method_wildcard):
    """``epmq-a0.01`` -> ("epmq", 0.01); ``gptq`` -> ("gptq", None)."""
    name, _, alpha = method_wildcard.partition("-a")
    return name, (float(alpha) if alpha else None)


def quant_model(suite, merge, method, alpha=None, bits=None, group=None, samples=None):
    s = suite_settings(suite)
    alpha = s["alpha"][merge] if alpha is None else alpha
    bits = s["bits"] if bits is None else bits
    group = s["group_size"] if group is None else group
    samples = s["samples"] if samples is None else samples
    return f"quant/{merge}/{method_id(method, alpha)}/w{bits}g{group}n{samples}"


def target_models(target):
    """Every model a target evaluates, as model ids (paths under results/{suite}/)."""
    spec = config["targets"][target]
    suite = spec["suite"]
    models = ["pretrained"] + [f"experts/{task}" for task in tasks(suite)]
    for merge in spec["merges"]:
        models.append(f"merged/{merge}")
        if spec["kind"] == "methods":
            models += [quant_model(suite, merge, method) for method in spec["methods"]]
        elif spec["kind"] == "alpha":
            models.append(quant_model(suite, merge, "gptq"))
            models += [quant_model(suite, merge, "epmq", alpha=alpha) for alpha in spec["alphas"]]
        elif spec["kind"] == "bits":
            models += [quant_model(suite, merge, m, bits=b) for m in spec["methods"] for b in spec["bits"]]
        elif spec["kind"] == "samples":
            models += [quant_model(suite, merge, m, samples=n) for m in spec["methods"] for n in spec["samples"]]
    return list(dict.fromkeys(models))


def target_files(target):
    layout = config["targets"][target]["layout"]
    suffixes = ["csv", "md", "tex", "html"] + (["png"] if layout == "plot" else [])
    return [f"results/tables/{target}.{suffix}" for suffix in suffixes]


def calibration_files(wildcards):
    method, _ = split_method(wildcards.method)
    if method in CALIBRATION_FREE:
        return []
    seed = suite_settings(wildcards.suite)["calib_seed"]
    return [
        f"results/{wildcards.suite}/calib/n{wildcards.samples}-s{seed}/{task}.safetensors"
        for task in tasks(wildcards.suite)
    ]


def expert_dirs(wildcards):
    return [f"results/{wildcards.suite}/experts/{task}" for task in tasks(wildcards.suite)]


def merge_param_flags(wildcards):
    params = suite_settings(wildcards.suite)["merge_params"].get(wildcards.merge, {})
    return " ".join(f"--param {key}={json.dumps(value)}" for key, value in params.items())


def quantize_flags(wildcards):
    method, alpha = split_method(wildcards.method)
    flags = [f"--method {method}", f"--bits {wildcards.bits}", f"--group-size {wildcards.group}"]
    if alpha is not None:
        flags.append(f"--alpha {alpha:g}")
    overrides = suite_settings(wildcards.suite)["quantize_params"]
    flags += [f"--set {key}={json.dumps(value)}" for key, value in overrides.items()]
    return " ".join(flags)


def quantize_experts(wildcards):
    method, _ = split_method(wildcards.method)
    return expert_dirs(wildcards) if method in ALPHA_METHODS else []


def evaluation_tasks(wildcards):
    if wildcards.model.startswith("experts/"):
        return wildcards.model.split("/", 1)[1]
    return " ".join(tasks(wildcards.suite))


def target_eval_dirs(wildcards):
    suite = config["targets"][wildcards.target]["suite"]
    return [f"results/{suite}/eval/{model}" for model in target_models(wildcards.target)]


def target_quant_dirs(wildcards):
    suite = config["targets"][wildcards.target]["suite"]
    return [f"results/{suite}/{model}" for model in target_models(wildcards.target) if model.startswith("quant/")]
