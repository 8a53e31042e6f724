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
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or inconsistent; the message names the file and tensor."""


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, payload: object) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


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
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / shard for shard in shards]
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
        stored = self.resolve(key)
        shape, dtype_name = self._headers[stored]
        if tuple(out.shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {stored!r} has shape {shape}, expected {tuple(out.shape)}")
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
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


#: safetensors dtype names of the tensors :meth:`LazyCheckpoint.read_into` reads byte for byte
_SAFETENSORS_DTYPES = {
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
