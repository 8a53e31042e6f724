"""Checkpoint and file I/O shared by every stage: lazy safetensors access, atomic writes, provenance.

Every stage writes its output into a temporary sibling directory and renames it into place only
when everything succeeded, so a failed or interrupted job never leaves a half-written result that
Snakemake (or a user) could mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:
    import torch

# torch is imported where a tensor is made, not here: aggregate and render write files through this
# module and would pay torch's import (seconds, per job) for nothing

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


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


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF ``save_pretrained`` directory (single file or sharded)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        shards = sorted(set(map(str, weight_map.values())))
        files = [directory / shard for shard in shards]
        outside = [shard for shard, file in zip(shards, files) if file.resolve().parent != directory.resolve()]
        if outside:
            raise CheckpointError(f"{index} names shards outside its folder: {outside[:3]}")
    elif (directory / SAFETENSORS_SINGLE).exists():
        files = [directory / SAFETENSORS_SINGLE]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {directory} (only safetensors checkpoints are read)")
    for file in files:
        if not file.exists():
            raise CheckpointError(f"missing shard {file.name} listed in {index}")
    return files


class LazyCheckpoint:
    """Read single tensors of a safetensors checkpoint on demand, without loading the whole model.

    Works for a directory (single file or sharded with an index) or for one ``.safetensors`` file.
    Each read opens the file, copies the one tensor out and unmaps the file again, so pages of
    tensors already used do not stay resident: reading K experts layer by layer holds one layer of
    each at most.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        self._files = [path] if path.is_file() else safetensors_files(path)
        self._where: dict[str, int] = {}
        self._headers: dict[str, tuple[tuple[int, ...], str]] = {}
        self.metadata: dict[str, str] = {}
        for position, file in enumerate(self._files):
            with self._open(file) as handle:
                if position == 0:
                    self.metadata = handle.metadata() or {}
                for key in handle.keys():
                    if key in self._where:
                        raise CheckpointError(f"tensor {key!r} appears in two shards of {path}")
                    self._where[key] = position
                    view = handle.get_slice(key)
                    self._headers[key] = (tuple(view.get_shape()), view.get_dtype())
        self._resolved: dict[str, str] = {}
        self._ranges: dict[Path, dict[str, tuple[int, int]]] = {}

    @staticmethod
    @contextlib.contextmanager
    def _open(file: Path):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as error:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"cannot read {file}: {error} (truncated or not a safetensors file?)") from error
        with handle:
            yield handle

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def resolve(self, key: str) -> str:
        """The stored key for a module's parameter ``key``, tolerating a different model prefix.

        HF checkpoints of one architecture differ by a leading prefix (``vision_model.`` in
        transformers 4 CLIPVisionModel files, none in transformers 5; ``model.`` in causal LMs), so
        a key also matches a stored key that equals it after dropping leading dotted components
        from one of the two. The match must be unique.
        """
        if key in self._where:
            return key
        if key not in self._resolved:
            matches = [k for k in self._where if k.endswith("." + key) or key.endswith("." + k)]
            if len(matches) != 1:
                found = "no tensor" if not matches else f"{len(matches)} tensors ({matches[:3]})"
                raise CheckpointError(f"{found} in {self.path} match parameter {key!r}")
            self._resolved[key] = matches[0]
        return self._resolved[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored as ``key`` (or as its prefix variant, see :meth:`resolve`)."""
        stored = self.resolve(key)
        try:
            with self._open(self._files[self._where[stored]]) as handle:
                return handle.get_tensor(stored).clone()
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f"cannot read tensor {stored!r} from {self.path}: {error}") from error

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        """Shape and safetensors dtype string of a tensor, read from the header only."""
        return self._headers[self.resolve(key)]

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Copy the tensor stored as ``key`` into ``out`` (same shape; any dtype), and return ``out``.

        When ``out`` is a contiguous CPU tensor of the stored dtype, the bytes are read from the file
        straight into its memory: no mapping and no intermediate tensor, so filling a model this
        way costs no more memory than the model. Otherwise they go through one tensor of the
        stored dtype.
        """
        import torch

        stored = self.resolve(key)
        shape, dtype_name = self._headers[stored]
        if tuple(out.shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {stored!r} has shape {shape}, expected {tuple(out.shape)}")
        dtype = _safetensors_dtypes().get(dtype_name)
        if dtype is None:
            return out.copy_(self.get(key))
        direct = out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        target = out if direct else torch.empty(shape, dtype=dtype)
        file = self._files[self._where[stored]]
        begin, end = self._byte_ranges(file)[stored]
        view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
        if len(view) != end - begin:
            raise CheckpointError(f"{file}: tensor {stored!r} spans {end - begin} bytes, its shape needs {len(view)}")
        with open(file, "rb", buffering=0) as handle:
            handle.seek(begin)
            done = 0
            while done < len(view):
                count = handle.readinto(view[done:])
                if not count:
                    raise CheckpointError(f"{file} ends inside tensor {stored!r} (truncated?)")
                done += count
        return out if direct else out.copy_(target)

    def _byte_ranges(self, file: Path) -> dict[str, tuple[int, int]]:
        """Absolute byte range of every tensor in ``file``, from its safetensors header."""
        if file not in self._ranges:
            with open(file, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
            base = 8 + length
            self._ranges[file] = {key: (base + entry["data_offsets"][0], base + entry["data_offsets"][1])
                                  for key, entry in header.items() if key != "__metadata__"}
        return self._ranges[file]


def _safetensors_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype names of the tensors :meth:`LazyCheckpoint.read_into` reads byte for byte."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }


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
