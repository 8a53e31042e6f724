"""Input and output paths a stage accepts: refused outputs, local checkpoint folders, duplicates.

Every stage calls :func:`check_output` before any work, so an output that would lose data fails
at once with one line naming the path, not after hours of computation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or inconsistent; the message names the file and tensor."""


class OutputError(ValueError):
    """An output path that cannot be written safely; the message names the path and the reason."""


def check_output(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    records: Iterable[str] = (),
    overwrite: bool = False,
    is_file: bool = False,
) -> Path:
    """Refuse an output path that would lose data or cannot be written; return it.

    Refused: the current directory or one above it (``--out .``); a path equal to an input, above
    one (replacing it would delete the input) or inside one (the input would change); a place
    under a regular file or in a folder this user cannot write to; and an existing non-empty
    directory that is not a previous output of the same stage, recognised by one of its own
    provenance files ``records``, unless ``overwrite`` (``is_file``: the output is one file, and an
    existing directory there is refused). Every stage calls this before any work.
    """
    out = Path(out)
    target = out.resolve()
    if not out.name or target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise OutputError(f"--out {out}: the output would replace the current directory or one above it")
    for item in inputs:
        source = Path(item).resolve()
        if target == source:
            raise OutputError(f"--out {out} is the input {item}")
        if target in source.parents:
            raise OutputError(f"--out {out} contains the input {item}: replacing it would delete the input")
        if source in target.parents:
            raise OutputError(f"--out {out} is inside the input {item}: the input would change")
    existing = next(parent for parent in [target, *target.parents] if parent.exists() or parent == parent.parent)
    if existing != target:
        if not existing.is_dir():
            raise OutputError(f"--out {out}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"--out {out}: no permission to write in {existing}")
    elif not os.access(target.parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: no permission to write in {target.parent}")
    elif is_file and target.is_dir():
        raise OutputError(f"--out {out} is a directory; this stage writes a file")
    elif not is_file and not target.is_dir() and not overwrite:
        raise OutputError(f"--out {out} is a file; this stage writes a directory (pass --overwrite to replace it)")
    elif not is_file and not overwrite and any(target.iterdir()):
        records = list(records)
        if not any((target / name).is_file() for name in records):
            own = f" (a previous output would hold {' or '.join(records)})" if records else ""
            raise OutputError(
                f"--out {out} is a non-empty directory that this stage did not write{own}; "
                "pass --overwrite to replace it"
            )
    return out


def require_local_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as an existing local directory; a missing one is an error, never read as a hub id."""
    path = Path(path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise CheckpointError(f"{flag} {path} {what} (stages read local checkpoint folders only; "
                              "fetch hub models first with `python -m epmq.hub fetch --source owner/name`)")
    return path


def warn_duplicates(paths: Iterable[str | os.PathLike], flag: str) -> list[Path]:
    """Log a warning for every path given twice (the same folder counted as two inputs); return them."""
    seen: dict[Path, str] = {}
    duplicates = []
    for item in paths:
        key = Path(item).resolve()
        if key in seen:
            logging.getLogger("epmq").warning("%s lists %s twice (as %s and %s)", flag, key, seen[key], item)
            duplicates.append(key)
        seen.setdefault(key, str(item))
    return duplicates
