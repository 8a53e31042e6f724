"""Issue 13, item 6: every rule that runs on the cluster uses as many threads as the CPUs it asks SLURM for."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"


def cluster_rules() -> dict[str, bool]:
    """Each named rule that is not a local rule -> whether it declares ``threads:``."""
    rules, local = {}, set()
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        for block in re.findall(r"^localrules:\n((?:[ \t]+\w+,?\n)+)", text, flags=re.M):
            local.update(re.findall(r"\w+", block))
        for name, body in re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", text, flags=re.M):
            if re.search(r"^\s+localrule:\s*True", body, flags=re.M):
                local.add(name)
            rules[name] = bool(re.search(r"^\s+threads:", body, flags=re.M))
    return {name: threaded for name, threaded in rules.items() if name not in local}


def test_the_rule_parser_sees_the_workflow():
    rules = cluster_rules()
    assert {"merge", "quantize", "evaluate", "aggregate"} <= set(rules)
    assert not {"hub_data", "hub_pretrained", "hub_expert", "paper"} & set(rules)
    assert rules["merge"] and not rules["aggregate"]


def test_threads_match_cpus_per_task_for_every_cluster_rule():
    profile = yaml.safe_load(PROFILE.read_text())
    default_cpus = profile["default-resources"]["cpus_per_task"]
    set_threads = profile.get("set-threads", {})
    wrong = {}
    for rule, threaded in cluster_rules().items():
        cpus = profile.get("set-resources", {}).get(rule, {}).get("cpus_per_task", default_cpus)
        # a rule declaring threads (from config or the core count) gets its number from the profile
        threads = set_threads.get(rule) if threaded else set_threads.get(rule, 1)
        if threads != cpus:
            wrong[rule] = {"threads": threads, "cpus_per_task": cpus}
    assert not wrong, f"{PROFILE}: threads differ from cpus_per_task: {wrong}"
