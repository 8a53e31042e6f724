"""profiles/slurm as Snakemake 9 and snakemake-executor-plugin-slurm read it: cluster settings from
EPMQ_SLURM_* keep the profile's resources, one GPU request per job, keep-going, and retries that
scale memory and runtime with the attempt. Dry runs only: the real SLURM run is
tests/test_slurm_rehearsal.py."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from snakemake.cli import get_argument_parser
from snakemake_executor_plugin_slurm.submit_string import get_submit_command
from snakemake_executor_plugin_slurm.utils import set_gres_string

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "slurm"
GPU_RULES = {"merge", "quantize", "evaluate"}
LOGIN_RULES = {"hub_data", "hub_pretrained", "hub_expert"}  # localrules: never submitted
SITE = {
    "EPMQ_SLURM_ACCOUNT": "proj42",
    "EPMQ_SLURM_PARTITION": "cpu",
    "EPMQ_SLURM_GPU_PARTITION": "gpu",
    "EPMQ_SLURM_GPU_MODEL": "h200",
    "EPMQ_SLURM_GPU_CONSTRAINT": "a100|h100",
}


def snakemake(*args, cwd, env=None):
    if "--directory" in args:  # config/experts.tsv is read (and declared) relative to the working directory
        workdir = Path(args[args.index("--directory") + 1])
        workdir.mkdir(parents=True, exist_ok=True)
        if not (workdir / "config").exists():
            (workdir / "config").symlink_to(ROOT / "config")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EPMQ_SLURM_")}
    env = {**clean, **(env or {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
                           "--profile", str(PROFILE), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def planned_jobs(config, *targets, tmp_path, attempt=1, env=None):
    """(rule, output, resources) of every job a dry run of the SLURM profile plans in an empty directory."""
    out = snakemake("--configfile", str(ROOT / "config" / config), "--directory", str(tmp_path), "--dry-run",
                    "--printshellcmds", "--attempt", str(attempt), *targets, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = []
    for block in re.split(r"\n(?=rule \w+:)", out.stdout):
        rule = re.match(r"rule (\w+):", block)
        output = re.search(r"^\s+output: (.*)$", block, re.M)
        resources = re.search(r"^\s+resources: (.*)$", block, re.M)
        if rule and resources:
            pairs = (item.split("=", 1) for item in resources.group(1).split(", "))
            jobs.append((rule.group(1), output.group(1) if output else "",
                         {key: int(v) if v.isdigit() else v for key, v in pairs}))
    assert jobs, out.stdout[-3000:]
    return jobs


def sbatch_line(resources, threads=1):
    """The sbatch command line snakemake-executor-plugin-slurm builds for a job with these resources."""
    job = SimpleNamespace(resources=SimpleNamespace(**resources, get=resources.get), threads=threads)
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "rule", "workdir": "/w",
              "account": f" -A {resources['slurm_account']}" if "slurm_account" in resources else "",
              "partition": f" -p {resources['slurm_partition']}" if "slurm_partition" in resources else ""}
    return get_submit_command(job, params) + set_gres_string(job)


def test_profile_keeps_going_and_retries():
    args = get_argument_parser(profiles=[str(PROFILE)]).parse_args([])
    assert args.keep_going is True
    assert args.retries >= 1
    assert args.executor == "slurm"


def test_cluster_settings_from_the_environment_keep_the_profile(tmp_path):
    jobs = planned_jobs("paper.yaml", "table_1", tmp_path=tmp_path, env=SITE)
    submitted = [(rule, res) for rule, _, res in jobs if rule not in LOGIN_RULES]
    assert {rule for rule, _ in submitted} >= GPU_RULES | {"suite_calib", "aggregate", "render"}
    for rule, res in submitted:
        line = sbatch_line(res)
        assert " -A proj42" in line, (rule, line)
        gpu_requests = re.findall(r"--gpus\S*|--gres\S*", line)
        if rule in GPU_RULES:
            # the profile's sizes survive next to the cluster's settings
            assert res["mem_mb"] >= 32000 and res["runtime"] >= 120 and res["gpu"] == 1, (rule, res)
            assert " -p gpu" in line and "-C 'a100|h100'" in line, line
            assert gpu_requests == ["--gpus=h200:1"], line  # one GPU request, of the chosen model
        else:
            assert " -p cpu" in line and gpu_requests == [] and " -C " not in line, line


@pytest.fixture(scope="module")
def paper_jobs(tmp_path_factory):
    """The jobs of table_1 on the paper config, without cluster settings: first and second attempt."""
    return {attempt: planned_jobs("paper.yaml", "table_1", tmp_path=tmp_path_factory.mktemp("paper"), attempt=attempt)
            for attempt in (1, 2)}


def test_without_cluster_settings_each_gpu_job_asks_for_one_gpu_once(paper_jobs):
    for rule, _, res in paper_jobs[1]:
        if rule in GPU_RULES:
            line = sbatch_line(res)
            assert re.findall(r"--gpus\S*|--gres\S*", line) == ["--gpus=1"], line
            assert " -A " not in line and " -p " not in line and " -C " not in line


@pytest.mark.parametrize("config", ["paper.yaml", "smoke.yaml"])
def test_a_retry_gets_attempt_times_the_memory_and_runtime(tmp_path, config, paper_jobs):
    # every submitted job, also of rules that declare their own mem_mb/runtime (their values beat
    # default-resources, so the profile must scale them too); smoke.yaml has the offline suites' rules
    attempts = paper_jobs if config == "paper.yaml" else {
        attempt: planned_jobs(config, tmp_path=tmp_path / str(attempt), attempt=attempt) for attempt in (1, 2)}
    first = {(rule, output): res for rule, output, res in attempts[1]}
    second = {(rule, output): res for rule, output, res in attempts[2]}
    assert first.keys() == second.keys()
    submitted = {rule for rule, _ in first} - LOGIN_RULES
    assert submitted >= GPU_RULES
    for (rule, output), one in first.items():
        if rule in submitted:
            two = second[rule, output]
            assert (two["mem_mb"], two["runtime"]) == (2 * one["mem_mb"], 2 * one["runtime"]), (rule, one, two)


def test_a_cluster_run_parses_without_a_core_count(tmp_path):
    # no --cores on a cluster: a rule reading `workflow.cores` stops the run before anything starts
    out = snakemake("--configfile", str(ROOT / "config" / "smoke.yaml"), "--directory", str(tmp_path), "--summary",
                    cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_cluster_setting_that_could_reach_a_shell_is_refused(tmp_path):
    out = snakemake("--configfile", str(ROOT / "config" / "paper.yaml"), "--directory", str(tmp_path), "--dry-run",
                    "table_1", cwd=ROOT, env={"EPMQ_SLURM_ACCOUNT": "proj; rm -rf ~"})
    assert out.returncode == 2
    assert "EPMQ_SLURM_ACCOUNT" in out.stderr
