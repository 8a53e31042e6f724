"""Lazy safetensors access: the files of a checkpoint folder and single tensors read on demand."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from epmq.io.files import read_json
from epmq.io.paths import CheckpointError

if TYPE_CHECKING:
    import torch

# torch is imported where a tensor is made, not here: aggregate and render write files through
# epmq.io and would pay torch's import (seconds, per job) for nothing

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


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


@functools.cache  # read_into runs once per tensor: build the table once
def _safetensors_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype names of the tensors :meth:`LazyCheckpoint.read_into` reads byte for byte."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }
