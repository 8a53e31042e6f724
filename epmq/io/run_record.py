"""Provenance: what produced a result (library versions, code commit, host, time)."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from pathlib import Path


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(**extra: object) -> dict:
    """What produced a result: library versions, code commit, host and time, plus ``extra``."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from epmq import __version__

    try:  # read from the installed metadata: importing transformers costs seconds per job
        transformers_version = version("transformers")
    except PackageNotFoundError:
        transformers_version = None

    record = {
        "epmq_version": __version__,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "transformers": transformers_version,
        "python": platform.python_version(),
        "host": platform.node(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    record.update(extra)
    return record
