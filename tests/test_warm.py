"""Warm starts (``python -m epmq.warm COMMAND``): jobs forked from one interpreter with torch imported
behave like cold ones (output, exit code, streams), decline when they could not, and die with
their client; plus ``scripts/compare_builds.py``, the check that a build's results are unchanged."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from epmq.warm import PER_JOB, THREAD_VARIABLES, incompatibility

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["demo", "--d-out", "64", "--d-in", "64", "--experts", "2", "--tokens", "256", "--seed", "3"]


def under_warm_server(driver: str, tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the Python ``driver`` as the command of a warm server; it starts once the server serves."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        import os, subprocess, sys, time
        deadline = time.time() + 60
        while not os.path.exists(os.environ["EPMQ_WARM"]) and time.time() < deadline:
            time.sleep(0.05)
        from epmq.warm import THREAD_VARIABLES
        os.environ.update({name: "1" for name in THREAD_VARIABLES})  # what Snakemake sets for a 1-thread job
        def job(*argv, env=None, **kwargs):
            return subprocess.run([sys.executable, "-m", "epmq", *argv], capture_output=True, text=True,
                                  env=env, **kwargs)
    """) + textwrap.dedent(driver))
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    return subprocess.run([sys.executable, "-m", "epmq.warm", sys.executable, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_warm_jobs_match_cold_ones(tmp_path):
    out = tmp_path / "out.json"
    result = under_warm_server(f"""
        import json
        cold_env = {{k: v for k, v in os.environ.items() if k != "EPMQ_WARM"}}
        warm, cold = job(*{DEMO!r}), job(*{DEMO!r}, env=cold_env)
        bad = job("aggregate", "--eval-dirs", "/nonexistent/eval", "--out", "x.csv")
        chained = job(*{DEMO!r}, "--then", *{DEMO!r})
        other = job(*{DEMO!r}, env={{**os.environ, "EPMQ_SOME_SETTING": "1" * 100_000}})  # a request over 64 KiB
        tmp = job(*{DEMO!r}, env={{**os.environ, "TMPDIR": {str(tmp_path)!r}}})
        json.dump({{name: [r.returncode, r.stdout, r.stderr] for name, r in
                   dict(warm=warm, cold=cold, bad=bad, chained=chained, other=other, tmp=tmp).items()}},
                  open({str(out)!r}, "w"))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = json.loads(out.read_text())
    assert jobs["cold"][0] == jobs["warm"][0] == 0
    assert jobs["warm"][1] == jobs["cold"][1] and "epmq alpha=0.01" in jobs["warm"][1]
    assert "declined" not in jobs["warm"][2] + jobs["chained"][2]
    assert jobs["chained"][0] == 0 and jobs["chained"][1] == jobs["cold"][1] * 2
    code, _, err = jobs["bad"]
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err
    code, stdout, err = jobs["other"]  # another environment: declined, then run cold, same answer
    assert code == 0 and stdout == jobs["cold"][1]
    assert "warm start declined (environment variable EPMQ_SOME_SETTING differs): starting cold" in err
    assert jobs["tmp"][0] == 0 and "declined" not in jobs["tmp"][2]  # TMPDIR is a per-job variable
    assert "warm start: 5 jobs forked" in result.stderr  # warm, bad, chained, other (declined), tmp


def test_cancelling_the_client_stops_the_forked_job(tmp_path):
    out = tmp_path / "out.json"
    result = under_warm_server(f"""
        import json, signal
        server = os.getppid()
        def forked():
            pids = []
            for entry in os.listdir("/proc"):
                try:
                    stat = open(f"/proc/{{entry}}/stat").read().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                if entry.isdigit() and int(stat[1]) == server and int(entry) != os.getpid():
                    pids.append(int(entry))
            return pids
        client = subprocess.Popen([sys.executable, "-m", "epmq", "demo", "--d-out", "2048", "--d-in", "2048",
                                   "--experts", "8", "--tokens", "200000"], stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not forked() and time.time() < deadline:
            time.sleep(0.05)
        running = forked()
        time.sleep(1)
        client.send_signal(signal.SIGTERM)
        client.wait()
        deadline = time.time() + 30
        while forked() and time.time() < deadline:
            time.sleep(0.05)
        json.dump(dict(running=running, left=forked()), open({str(out)!r}, "w"))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert len(record["running"]) == 1 and record["left"] == []


def test_without_a_server_jobs_start_cold(tmp_path):
    env = {**os.environ, "EPMQ_WARM": str(tmp_path / "no-server" / "socket")}
    cold = subprocess.run([sys.executable, "-m", "epmq", *DEMO], cwd=ROOT, capture_output=True, text=True)
    orphan = subprocess.run([sys.executable, "-m", "epmq", *DEMO], cwd=ROOT, capture_output=True, text=True, env=env)
    assert orphan.returncode == 0 and orphan.stdout == cold.stdout and orphan.stderr == cold.stderr


def test_the_server_imports_leave_it_fork_safe():
    """One thread (native ones counted), torch's generator as after ``import torch``, no log handler."""
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import logging, sys
        from epmq.warm import preload, server_environment, thread_count
        assert "torch" not in sys.modules
        server_environment("/nonexistent/socket", 1)
        fresh = preload()
        import torch
        print(thread_count(), torch.equal(fresh, torch.get_rng_state()), len(logging.getLogger().handlers))
    """)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["1", "True", "0"]


def test_a_job_is_forked_only_where_it_would_start_the_same():
    env = {"PATH": "/bin", "EPMQ_WARM": "/s"}
    request = {"executable": sys.executable, "cwd": os.getcwd(), "env": {**env, **{name: "x" for name in PER_JOB}}}
    assert incompatibility(request, env) is None
    assert "OMP_NUM_THREADS differs" in incompatibility({**request, "env": {**env, "OMP_NUM_THREADS": "2"}}, env)
    assert "PATH differs" in incompatibility({**request, "env": {"EPMQ_WARM": "/s"}}, env)
    assert "working directory" in incompatibility({**request, "cwd": "/"}, env)
    assert "python" in incompatibility({**request, "executable": "/usr/bin/python9"}, env)


@pytest.mark.parametrize("argv, message", [([], "give the command to run"),
                                           (["/nonexistent/command"], "error: cannot run '/nonexistent/command'")])
def test_the_server_needs_a_command_it_can_run(argv, message):
    result = subprocess.run([sys.executable, "-m", "epmq.warm", *argv], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr


def test_without_a_socket_the_command_still_runs_and_its_exit_code_is_kept(tmp_path):
    deep = tmp_path / ("d" * 100)  # a socket path longer than AF_UNIX allows
    deep.mkdir()
    result = subprocess.run([sys.executable, "-m", "epmq.warm", sys.executable, "-c", "raise SystemExit(3)"],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(deep)})
    assert result.returncode == 3
    assert "warm start off (" in result.stderr and "jobs start cold" in result.stderr
    assert list(deep.iterdir()) == []  # its folder removed


# ------------------------------------------------------------------------ compare_builds --

def build(root: Path, weight: torch.Tensor, metadata: dict, accuracy: float, seconds: float) -> Path:
    results = root / "results"
    (results / "model").mkdir(parents=True)
    save_file({"w": weight}, results / "model" / "model.safetensors", metadata=metadata)
    record = {"accuracy": accuracy, "model": str(results / "model"), "provenance": {"created_utc": str(seconds)},
              "seconds": seconds}
    (results / "eval.json").write_text(json.dumps(record))
    return results


def compare(before: Path, after: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/compare_builds.py"), str(before), str(after)],
                          capture_output=True, text=True)


def test_compare_builds_ignores_timings_and_checkout_paths_only(tmp_path):
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    before = build(tmp_path / "a", weight, {"x": "1", "y": "2"}, 80.0, 1.0)
    same = build(tmp_path / "b", weight.clone(), {"y": "2", "x": "1"}, 80.0, 2.0)
    result = compare(before, same)
    assert result.returncode == 0 and "identical: compared 1 .json, 1 .safetensors" in result.stdout
    moved = weight.clone()
    moved[0, 0] = -0.0  # equal as a number, not as bits
    for name, after in (("weight", build(tmp_path / "c", moved, {"x": "1", "y": "2"}, 80.0, 1.0)),
                        ("accuracy", build(tmp_path / "d", weight, {"x": "1", "y": "2"}, 80.5, 1.0)),
                        ("metadata", build(tmp_path / "e", weight, {"x": "1", "y": "3"}, 80.0, 1.0))):
        result = compare(before, after)
        assert result.returncode == 1, name
        assert "1 differences" in result.stdout, name
