# Path conventions, wildcard constraints and the functions that turn targets into files.
#
#   results/{suite}/data                            the suite's prepared data
#   results/{suite}/pretrained                      the model that is merged (+ evaluation assets)
#   results/{suite}/experts/{task}                  one expert per task
#   results/{suite}/calib/n{samples}-s{seed}/{task}.safetensors   (one job writes the folder)
#   results/{suite}/merged/{merge}                  fp merged model
#   results/{suite}/quant/{merge}/{method}/w{bits}g{group}n{samples}
#                                                   method = rtn | gptq | awq | epmq-a{alpha} | epmq_fp-a{alpha}
#   results/{suite}/eval/{model}                    one {task}.json per task; model = any of the above
#   results/{suite}/diagnose/{merge}                diagnose.json + diagnose.png (python -m epmq diagnose)
#   results/tables/{target}.{csv,md,tex,html,png}
#
# Offline suites (builder mini-*) are built by jobs; hub suites (hub-*) are fetched by local jobs
# (rules/experts.smk) on the machine that runs Snakemake, since compute nodes often have no internet.
import json
import re
import shlex

from epmq.config import methods_schema
from epmq.workflow import (
    alpha_methods,
    calibration_free_methods,
    expert_methods,
    merge_wildcard,
    method_wildcard,
    one_of,
)
from epmq.suites.base import config_files, load_suite, packaged_config
from snakemake.exceptions import WorkflowError

# what each registered quantization method declares (epmq/quant/base.py: QuantMethod)
ALPHA_METHODS = alpha_methods()
CALIBRATION_FREE = calibration_free_methods()
EXPERT_METHODS = expert_methods()
# quantize parameters nested under a method's name (awq.*): the schema's object-valued keys
METHOD_SECTIONS = [
    key for key, spec in methods_schema()["properties"]["quantize"]["properties"].items() if spec.get("type") == "object"
]
OFFLINE_SUITES = [name for name, s in config["suites"].items() if not s["builder"].startswith("hub-")]
HUB_SUITES = [name for name, s in config["suites"].items() if s["builder"].startswith("hub-")]


# suite and task names: letters, digits, _ . - and never a leading dot (no `..`, no hidden folders)
NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"


wildcard_constraints:
    suite=NAME,
    task=NAME,
    merge=merge_wildcard(),
    method=method_wildcard(),
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


_SUITES = {}


def _suite(suite):
    if suite not in _SUITES:
        path = suite_config_path(suite)
        loaded = load_suite(path)
        bad = [name for name in [*loaded.cfg["tasks"], *loaded.eval_tasks()] if not re.fullmatch(NAME, str(name))]
        if bad:
            raise WorkflowError(f"{path}: task names {bad} are not plain names (letters, digits, _ . -, no leading dot)")
        _SUITES[suite] = loaded
    return _SUITES[suite]


_CONFIG_FILES = {}


def suite_config_files(wildcards):
    """The suite's YAML, the YAMLs it inherits and the experts table it names: inputs of every job
    that reads them, so editing one reruns those jobs (read once per suite: most jobs ask)."""
    if wildcards.suite not in _CONFIG_FILES:
        _CONFIG_FILES[wildcards.suite] = [str(path) for path in config_files(suite_config_path(wildcards.suite))]
    return _CONFIG_FILES[wildcards.suite]


def tasks(suite):
    """The experts' tasks (one expert and one calibration set each)."""
    return list(_suite(suite).cfg["tasks"])


def eval_tasks(suite):
    """The tasks every model is evaluated on (the experts' tasks, or an LLM suite's benchmarks)."""
    return _suite(suite).eval_tasks()


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


def target_suites(target):
    suite = config["targets"][target]["suite"]
    return suite if isinstance(suite, list) else [suite]


def target_models(target, suite):
    """Every model of ``suite`` a target evaluates, as model ids (paths under results/{suite}/)."""
    spec = config["targets"][target]
    models = []
    if "pretrained" in spec["reference_rows"]:
        models.append("pretrained")
    if "finetuned" in spec["reference_rows"]:
        models += [f"experts/{task}" for task in tasks(suite) if task in eval_tasks(suite)]
    for merge in spec["merges"]:
        models.append(f"merged/{merge}")
        if spec["kind"] in ("methods", "suites"):
            models += [quant_model(suite, merge, method) for method in spec["methods"]]
        elif spec["kind"] == "alpha":
            models.append(quant_model(suite, merge, "gptq"))
            models += [quant_model(suite, merge, "epmq", alpha=alpha) for alpha in spec["alphas"]]
        elif spec["kind"] == "bits":
            models += [quant_model(suite, merge, m, bits=b) for m in spec["methods"] for b in spec["bits"]]
        elif spec["kind"] == "samples":
            models += [quant_model(suite, merge, m, samples=n) for m in spec["methods"] for n in spec["samples"]]
    return list(dict.fromkeys(models))


def default_targets():
    names = config.get("default_targets")
    if names is None:
        return list(config["targets"])
    unknown = sorted(set(names) - set(config["targets"]))
    if unknown:
        raise WorkflowError(f"default_targets names unknown targets {unknown}; known: {sorted(config['targets'])}")
    return names


def target_files(target):
    layout = config["targets"][target]["layout"]
    suffixes = ["csv", "md", "tex", "html"] + (["png"] if layout == "plot" else [])
    return [f"results/tables/{target}.{suffix}" for suffix in suffixes]


def target_eval_dirs(wildcards):
    return [
        f"results/{suite}/eval/{model}"
        for suite in target_suites(wildcards.target)
        for model in target_models(wildcards.target, suite)
    ]


def target_quant_dirs(wildcards):
    return [
        f"results/{suite}/{model}"
        for suite in target_suites(wildcards.target)
        for model in target_models(wildcards.target, suite)
        if model.startswith("quant/")
    ]


def calibration_dir(suite, samples):
    """The folder of a suite's calibration sets of ``samples`` samples (one ``{task}.safetensors`` each)."""
    return f"results/{suite}/calib/n{samples}-s{suite_settings(suite)['calib_seed']}"


def calibration_inputs(wildcards):
    """A quantizer's calibration folder (none for calibration-free methods)."""
    method, _ = split_method(wildcards.method)
    return [] if method in CALIBRATION_FREE else [calibration_dir(wildcards.suite, wildcards.samples)]


def calibration_files(folders, suite):
    """The per-task files of calibration ``folders``, in task order (the order the experts come in)."""
    return [f"{folder}/{task}.safetensors" for folder in folders for task in tasks(suite)]


def expert_dirs(wildcards):
    return [f"results/{wildcards.suite}/experts/{task}" for task in tasks(wildcards.suite)]


def merge_param_flags(wildcards):
    params = suite_settings(wildcards.suite)["merge_params"].get(wildcards.merge, {})
    flags = [f"--param {shlex.quote(f'{key}={json.dumps(value)}')}" for key, value in params.items()]
    if suite_settings(wildcards.suite)["cast_experts"]:
        flags.append("--cast-experts")
    return " ".join(flags)


def quantize_flags(wildcards):
    method, alpha = split_method(wildcards.method)
    flags = [f"--method {method}", f"--bits {wildcards.bits}", f"--group-size {wildcards.group}"]
    if alpha is not None:
        flags.append(f"--alpha {alpha:g}")
    overrides = suite_settings(wildcards.suite)["quantize_params"]
    # a method's own section (awq.*) reaches that method only, so it reruns no other job
    flags += [
        f"--set {shlex.quote(f'{key}={json.dumps(value)}')}"
        for key, value in overrides.items()
        if key.split(".")[0] not in METHOD_SECTIONS or key.split(".")[0] == method
    ]
    return " ".join(flags)


def quantize_experts(wildcards):
    method, _ = split_method(wildcards.method)
    return expert_dirs(wildcards) if method in EXPERT_METHODS else []


def model_eval_tasks(suite, model):
    """The tasks a model (an id under results/{suite}/) is evaluated on: an expert on its own task."""
    if model.startswith("experts/"):
        return [model.split("/", 1)[1]]
    return eval_tasks(suite)


def evaluation_tasks(wildcards):
    """The tasks one model is evaluated on (a list: the shell command quotes each with ``:q``)."""
    return model_eval_tasks(wildcards.suite, wildcards.model)


def evaluation_inputs(wildcards, prefix=""):
    """What evaluating a model of the suite reads besides the model: its config, data, the pretrained
    model's evaluation assets (heads, tokenizer, processor) and the experts (mini-text4 keeps per-task
    heads in them); ``prefix`` names them apart from a producing rule's own inputs."""
    return {
        f"{prefix}suite_config": suite_config_files(wildcards),
        f"{prefix}data": f"results/{wildcards.suite}/data",
        f"{prefix}pretrained": f"results/{wildcards.suite}/pretrained",
        f"{prefix}experts": expert_dirs(wildcards),
    }


# Models evaluated by the job that wrote them (config `evaluate_in_producer`): the experts of offline
# suites, merged and quantized models, whose jobs run `python -m epmq <stage> ... --then evaluate ...`:
# one process start instead of two. The producing rule then also outputs the model's eval folder and
# reads what evaluation reads; without it (the paper configs) evaluation is its own job, so that a
# failed evaluation never deletes a finished quantization.
EVALUATE_IN_PRODUCER = config["evaluate_in_producer"]


def evaluated_here(model):
    """A producing rule's extra output (its own is named ``model``): the eval folder of ``model`` (a
    pattern under results/{suite}/)."""
    return {"evaluation": directory(f"results/{{suite}}/eval/{model}")} if EVALUATE_IN_PRODUCER else {}


def evaluated_here_inputs(wildcards):
    return evaluation_inputs(wildcards, prefix="eval_") if EVALUATE_IN_PRODUCER else {}


def then_evaluate(wildcards, output, threads):
    """The `--then evaluate ...` that follows a producing stage (empty when evaluation is its own job)."""
    if not EVALUATE_IN_PRODUCER:
        return ""
    suite_dir = f"results/{wildcards.suite}"
    model = output.model
    words = [
        "--then", "evaluate", "--suite-config", suite_config_path(wildcards.suite), "--suite-dir", suite_dir,
        "--model", model, "--data", f"{suite_dir}/data", "--threads", str(threads),
        "--tasks", *model_eval_tasks(wildcards.suite, model.removeprefix(f"{suite_dir}/")),
        "--out-dir", output.evaluation,
    ]
    return " ".join(shlex.quote(word) for word in words)


def diagnose_quantized(wildcards):
    """The suite's default-grid RTN, GPTQ and E-PMQ models of this merge."""
    methods = ["rtn", "gptq"] + (["epmq"] if wildcards.merge in suite_settings(wildcards.suite)["alpha"] else [])
    return [f"results/{wildcards.suite}/{quant_model(wildcards.suite, wildcards.merge, m)}" for m in methods]


def diagnose_calibration(wildcards):
    return [calibration_dir(wildcards.suite, suite_settings(wildcards.suite)["samples"])]
