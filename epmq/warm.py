"""Warm starts: ``python -m epmq.warm COMMAND ...`` runs COMMAND (Snakemake) while one interpreter,
with torch and the stage modules already imported, forks every ``python -m epmq`` job it starts.

A DAG of many short jobs pays torch's import in each (1.8-2.1 CPU s here, ``bench/startup.py``: a
quarter of a mini-clip8 quantize job's 7.3 CPU s); a forked child starts with it done. Nothing else changes: the job is the
same ``python -m epmq`` command line with its own flags, working directory, standard streams and
exit code, and whenever the job could behave differently from a fresh interpreter it runs as one:

- the server imports only modules that leave it single-threaded (forking a threaded process is
  unsafe), takes the per-job thread variables Snakemake sets for ``--job-threads`` jobs (default 1),
  and silences other libraries' progress bars as a job without a terminal does (``quiet_foreign_bars``);
- a job is forked only if it runs the same Python in the same directory with the same environment,
  up to the variables a shell or Snakemake's ``tmpdir`` resource changes per job (``PER_JOB``):
  what modules read when they are imported is then what the job would have read; anything else
  (a 2-thread job, another suite's variables) starts cold, with one line in its log saying why;
- the child restores torch's generator to its state right after ``import torch`` and forgets the
  cached temporary directory, the two pieces of state the imports leave behind;
- when the job's client dies (Snakemake cancels it), the forked job is terminated too.

The client side (:func:`run_warm`, called by ``python -m epmq``) uses the standard library only,
and finds the server through :data:`ENV`; with no server it returns ``None`` and the job starts cold.
On a cluster the variable is unset and every job starts cold. Results are bit-identical either way:
``tests/test_warm.py`` compares warm and cold jobs, and ``scripts/compare_builds.py`` found every
checkpoint, record and table of a warm ``make main`` identical to a cold one's.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

#: where ``python -m epmq`` finds the server's socket
ENV = "EPMQ_WARM"
#: what may differ between the server's environment and a job's: set by the shell, or by Snakemake's
#: ``tmpdir`` resource (read when a temporary file is first made, never at import)
PER_JOB = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "TMPDIR", "TMP", "TEMP", "TEMPDIR"})
#: the variables Snakemake sets to a job's thread count (snakemake/shell.py); libraries read them
#: when they are loaded, so the server holds the values of the jobs it serves
THREAD_VARIABLES = (
    "OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
)
#: imported before serving: the stages the DAG's torch jobs run and the suites they load. Not the
#: renderer: pandas starts a thread (jemalloc's) when imported, and render jobs are few.
PRELOAD = (
    "epmq.cli", "epmq.quantize", "epmq.merge", "epmq.evaluate", "epmq.suites.command", "epmq.diagnose",
    "epmq.suites.mini_clip8", "epmq.suites.mini_dino", "epmq.suites.mini_text4", "epmq.suites.mini_llm3",
)
_LENGTH = struct.Struct("!I")


# ---------------------------------------------------------------- client (standard library only)

def run_warm(argv: list[str]) -> int | None:
    """Run ``python -m epmq ARGV`` in a child of the warm server; ``None`` if there is none, or it
    sends the job back (the caller then runs it cold)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    from epmq.progress import quiet_foreign_bars

    quiet_foreign_bars()  # what ``epmq.cli.main`` does first: the environment the job's imports see
    request = {
        "argv": argv, "argv0": sys.argv[0], "cwd": os.getcwd(), "executable": sys.executable,
        "env": dict(os.environ),
    }
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:  # the server has stopped, or has not started serving yet
        conn.close()
        return None
    started = None
    with conn:
        message = json.dumps(request).encode()
        message = _LENGTH.pack(len(message)) + message
        try:
            sent = socket.send_fds(conn, [message], [0, 1, 2])  # the streams travel with the first bytes
            conn.sendall(message[sent:])
            for line in conn.makefile("r", encoding="utf-8"):
                reply = json.loads(line)
                if "cold" in reply:
                    print(f"warm start declined ({reply['cold']}): starting cold", file=sys.stderr)
                    return None
                if "exit" in reply:
                    return int(reply["exit"])
                started = reply.get("started")
        except KeyboardInterrupt:
            return 130
        except OSError:
            pass
    if started is None:  # the job never began: run it here
        return None
    print(f"error: the warm-started job (pid {started}) ended without an exit status (killed?)", file=sys.stderr)
    return 1


# ---------------------------------------------------------------- server

def server_environment(socket_path: str, job_threads: int) -> None:
    """Make this process's environment the one a served job has before its imports (module docstring)."""
    from epmq.progress import FOREIGN_BARS_OFF

    os.environ[ENV] = socket_path
    for name in THREAD_VARIABLES:
        os.environ[name] = str(job_threads)
    for name, value in FOREIGN_BARS_OFF.items():
        os.environ.setdefault(name, value)


def preload(modules=PRELOAD):
    """Import torch and ``modules``; return torch's generator state right after ``import torch``."""
    import importlib

    import torch

    fresh_rng = torch.get_rng_state()
    for module in modules:
        importlib.import_module(module)
    return fresh_rng


def thread_count() -> int:
    """Threads of this process, native ones included (Linux); 1 where it cannot be told."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def incompatibility(request: dict, baseline_env: dict) -> str | None:
    """Why a job may not be forked from this server (it would differ from a cold start), or ``None``."""
    if request.get("executable") != sys.executable:
        return f"python {request.get('executable')} is not the server's {sys.executable}"
    if request.get("cwd") != os.getcwd():
        return f"working directory {request.get('cwd')} is not the server's {os.getcwd()}"
    env = request.get("env", {})
    for name in sorted((set(env) | set(baseline_env)) - PER_JOB):
        if env.get(name) != baseline_env.get(name):
            return f"environment variable {name} differs"
    return None


def serve_one(conn: socket.socket, baseline_env: dict, fresh_rng) -> int:
    """In a forked child: take the job's request and streams, run it, report its exit code."""
    import atexit
    import signal
    import traceback

    import torch

    for number, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                            (signal.SIGCHLD, signal.SIG_DFL)):
        signal.signal(number, handler)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < _LENGTH.size or len(data) < _LENGTH.size + _LENGTH.unpack_from(data)[0]:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return 1
        data += chunk
    request = json.loads(data[_LENGTH.size:])
    reason = incompatibility(request, baseline_env) if len(fds) == 3 else "standard streams not received"
    if reason:
        conn.sendall((json.dumps({"cold": reason}) + "\n").encode())
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None
    sys.argv = [request["argv0"], *request["argv"]]
    torch.set_rng_state(fresh_rng)
    conn.sendall((json.dumps({"started": os.getpid()}) + "\n").encode())

    finished = threading.Event()

    def end_with_client():
        # the client never writes again: end of file means it is gone (Snakemake cancelled the job)
        if not conn.recv(1) and not finished.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=end_with_client, daemon=True).start()
    from epmq.cli import main

    try:
        code = main(request["argv"])
    except SystemExit as stop:  # what the interpreter does with each kind of exit
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    finished.set()
    conn.sendall((json.dumps({"exit": code}) + "\n").encode())
    return code


def serve(listener: socket.socket, running, baseline_env: dict, fresh_rng) -> int:
    """Fork a child per connection until ``running()`` is false; return how many were forked."""
    children: set[int] = set()
    forked = 0
    while running():
        ready, _, _ = select.select([listener], [], [], 0.2)
        for pid in list(children):
            if os.waitpid(pid, os.WNOHANG)[0]:
                children.discard(pid)
        if not ready:
            continue
        conn, _ = listener.accept()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child never returns into the server loop
            code = 1
            try:
                listener.close()
                code = serve_one(conn, baseline_env, fresh_rng)
            finally:
                os._exit(code)
        conn.close()
        children.add(pid)
        forked += 1
    for pid in children:
        os.waitpid(pid, 0)
    return forked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m epmq.warm", description=__doc__.splitlines()[0].replace("``", "`"),
    )
    parser.add_argument("--job-threads", type=int, default=1,
                        help="serve the jobs Snakemake runs with this many threads (default 1); others start cold")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, e.g. snakemake --profile profiles/local")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("give the command to run, e.g. python -m epmq.warm snakemake --profile profiles/local")
    if args.job_threads < 1:
        parser.error(f"--job-threads must be >= 1, got {args.job_threads}")
    directory = tempfile.mkdtemp(prefix="epmq-warm-")
    socket_path = os.path.join(directory, "socket")
    try:
        # the command starts first, so the server's imports overlap its start-up; until the socket
        # exists its jobs start cold
        try:
            command = subprocess.Popen(args.command, env={**os.environ, ENV: socket_path})
        except OSError as error:
            print(f"error: cannot run {args.command[0]!r}: {error.strerror}", file=sys.stderr)
            return 2
        try:
            return _serve_while(command, socket_path, args.job_threads)
        except KeyboardInterrupt:  # the command got the same interrupt: let it stop
            return command.wait()
    finally:
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        os.rmdir(directory)


def _serve_while(command: subprocess.Popen, socket_path: str, job_threads: int) -> int:
    start = time.perf_counter()
    server_environment(socket_path, job_threads)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        try:
            fresh_rng = preload()
            threads = thread_count()
            if threads != 1:
                raise RuntimeError(f"{threads} threads after the imports: forking would be unsafe")
            listener.bind(socket_path)
            listener.listen(64)
        except (ImportError, OSError, RuntimeError) as error:  # an extra not installed, a too long socket path
            print(f"warm start off ({error}); jobs start cold", file=sys.stderr)
            return command.wait()
        print(f"warm start: torch and {len(PRELOAD)} modules imported in {time.perf_counter() - start:.1f} s; "
              f"forking the {job_threads}-thread jobs", file=sys.stderr)
        forked = serve(listener, lambda: command.poll() is None, dict(os.environ), fresh_rng)
    print(f"warm start: {forked} jobs forked", file=sys.stderr)
    return command.returncode


if __name__ == "__main__":
    raise SystemExit(main())
