"""Atomic writes, JSON and hashes shared by every stage.

Every stage writes its output into a temporary sibling directory and renames it into place only
when everything succeeded, so a failed or interrupted job never leaves a half-written result that
Snakemake (or a user) could mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from epmq.io.paths import CheckpointError, OutputError


def _temporary_prefixes(final: Path) -> tuple[str, str]:
    return f".{final.name}.tmp-", f".{final.name}.old-"


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Delete what interrupted writes of ``final`` left beside it (``.NAME.tmp-PID-*``, ``.NAME.old-PID``)
    when the process that made it is gone; return what was removed."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    for path in final.parent.iterdir():
        for prefix in _temporary_prefixes(final):
            if path.name.startswith(prefix) and not _process_alive(path.name[len(prefix):].split("-")[0]):
                _remove(path)
                removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _process_alive(pid_text: str) -> bool:
    if not pid_text.isdigit():
        return False  # not written by this version: no owner to wait for
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # an earlier write of this process that failed half-way
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM (Snakemake, Slurm and ``kill`` stop jobs with it) into SystemExit while a
    temporary exists, so the cleanup below runs instead of the process dying on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``final`` only if the block succeeds.

    Temporaries of ``final`` left by interrupted runs are removed first; SIGTERM removes this one.
    """
    final = Path(final)
    if not final.name:
        raise OutputError(f"output path {final} names no directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp_prefix, old_prefix = _temporary_prefixes(final)
    with _terminate_as_exit():
        tmp = Path(tempfile.mkdtemp(prefix=f"{tmp_prefix}{os.getpid()}-", dir=final.parent))
        try:
            yield tmp
            if final.exists():
                old = final.with_name(f"{old_prefix}{os.getpid()}")
                final.rename(old)
                tmp.rename(final)
                _remove(old)  # a file too, where --overwrite replaced one
            else:
                tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with _terminate_as_exit():
        fd, tmp = tempfile.mkstemp(prefix=f"{_temporary_prefixes(path)[0]}{os.getpid()}-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def strict_json(payload: object, where: str | os.PathLike) -> str:
    """``payload`` as standard JSON; NaN and Infinity (not JSON) are refused, naming ``where``."""
    try:
        return json.dumps(payload, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    except ValueError as error:
        raise ValueError(f"{where}: refusing to write NaN/Infinity into JSON ({error})") from error


def atomic_write_json(path: str | os.PathLike, payload: object) -> None:
    atomic_write_text(path, strict_json(payload, path))


def read_json(path: str | os.PathLike) -> object:
    """A JSON file's content; a file that is not valid JSON is an error naming it."""
    def refuse(name):
        raise ValueError(f"{name} is not a JSON value")

    try:
        return json.loads(Path(path).read_text(), parse_constant=refuse)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
