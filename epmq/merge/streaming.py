"""Merge safetensors checkpoints tensor by tensor: memory is one output shard plus K input tensors.

The pretrained model and the K experts are read lazily (:class:`epmq.io.LazyCheckpoint`), one
tensor name at a time, so peak memory is the output shard being assembled plus a few copies of
the K experts' largest tensor, not K models. TIES needs whole-model statistics first: its
per-task thresholds come from an exact two-pass radix select over ``|tau_i|``
(:mod:`epmq.merge.radix_select`), then one pass sums the elected signs; each pass reads the
inputs once more. The result is bit-identical to the in-memory path.

The output directory mirrors the pretrained one: its non-weight files (``config.json`` and
the like, and a shard index) are copied, and each of its safetensors files is written under the
same name with the same tensors, merged; ``merge.json`` records the method, the parameters,
the inputs' hashes and provenance. Everything is written to a temporary directory that is
renamed into place only when the merge succeeded.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from epmq.config import method_params
from epmq.io import (
    LazyCheckpoint,
    atomic_output_dir,
    atomic_write_json,
    check_output,
    provenance,
    safetensors_files,
    sha256_file,
    warn_duplicates,
)
from epmq.merge.radix_select import kth_smallest_streamed
from epmq.merge.registry import (
    MERGERS,
    MergeError,
    MergeInputs,
    check_consistent,
    merged_tensor,
)

log = logging.getLogger("epmq.merge")

MERGE_RECORD = "merge.json"
# Weight files of other formats are never copied: a stale unmerged copy could be loaded instead.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".bin.index.json")
_FLOATING_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointInputs(MergeInputs):
    """Inputs read lazily from safetensors checkpoints (directories or single files).

    :class:`LazyCheckpoint` copies each tensor out of a short-lived file mapping, so tensors
    already merged do not stay resident: memory holds the K experts' current tensor, not K models.
    """

    def __init__(self, pretrained: str | os.PathLike, experts: Sequence[str | os.PathLike], cast_experts: bool = False):
        if not experts:
            raise MergeError("at least one expert is needed")
        self.pretrained_name = f"pretrained {pretrained}"
        self.expert_names = [f"expert {path}" for path in experts]
        self._pretrained = LazyCheckpoint(pretrained)
        self._experts = [LazyCheckpoint(path) for path in experts]
        self.keys = self._pretrained.keys()
        # {expert: {"F32->BF16": n}}: floating expert tensors read in the pretrained dtype (cast_experts)
        self.casts = check_consistent(
            self.keys,
            self._pretrained.shape_dtype,
            [(name, expert.keys(), expert.shape_dtype) for name, expert in zip(self.expert_names, self._experts)],
            cast_floating=cast_experts,
        )

    def shape(self, key: str) -> tuple[int, ...]:
        return self._pretrained.shape_dtype(key)[0]

    def is_floating(self, key: str) -> bool:
        return self._pretrained.shape_dtype(key)[1] in _FLOATING_DTYPES

    def _read(self, key: str, source: int | None) -> torch.Tensor:
        if source is None:
            return self._pretrained.get(key)
        tensor = self._experts[source].get(key)
        if self.casts and tensor.is_floating_point():
            # the cast FusionBench applies on load (e.g. MergeBench's Llama experts to bf16), made explicit
            return tensor.to(self._pretrained_dtype(key))
        return tensor

    def _pretrained_dtype(self, key: str) -> torch.dtype:
        return _TORCH_DTYPES[self._pretrained.shape_dtype(key)[1]]

    def kth_smallest(self, rows_of, k):
        def blocks():
            for key in self.iterate(self.floating_keys, "TIES: magnitude histogram pass"):
                yield rows_of(*self.load(key))

        return kth_smallest_streamed(blocks, k)


def merge_checkpoints(
    method: str,
    pretrained: str | os.PathLike,
    experts: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    params: Mapping | None = None,
    *,
    device: torch.device | str | None = None,
    record: Mapping | None = None,
    overwrite: bool = False,
    cast_experts: bool = False,
) -> Path:
    """Merge the expert checkpoints into ``out`` with operator ``method``, streaming; return ``out``.

    ``cast_experts``: experts stored in another floating dtype are cast to the pretrained model's
    dtype as they are read (recorded in ``merge.json`` as ``expert_casts``); without it they are refused.

    ``pretrained`` is an HF ``save_pretrained`` directory (safetensors, single or sharded); the
    experts are directories or ``.safetensors`` files with the same tensors. ``params`` are
    validated and completed from the schema; ``device`` is where WUDI optimises (default CPU).
    ``record`` adds entries to ``merge.json`` (how inputs were converted from open_clip, the
    mergekit config the merge came from).
    Raises :class:`MergeError` (or :class:`epmq.io.CheckpointError`, both ``ValueError``) on bad
    input or a non-finite result, leaving nothing at ``out``. ``out`` is checked first
    (:func:`epmq.io.check_output`): never an input, above one or inside one; an existing non-empty
    directory only if it holds a previous merge's ``merge.json``, or with ``overwrite``.
    """
    if method not in MERGERS:
        raise MergeError(f"unknown merge method {method!r} (known: {', '.join(MERGERS)})")
    params = method_params("merge", method, **dict(params or {}))
    pretrained, experts, out = Path(pretrained), [Path(path) for path in experts], Path(out)
    check_output(out, inputs=[pretrained, *experts], records=[MERGE_RECORD], overwrite=overwrite)
    warn_duplicates(experts, "--experts")
    shards = safetensors_files(pretrained)
    inputs = CheckpointInputs(pretrained, experts, cast_experts=cast_experts)
    if inputs.casts:
        log.info("casting experts to the pretrained dtype: %s", inputs.casts)
    log.info("merging %d experts with %s %s", len(experts), method, params)
    rule = MERGERS[method].prepare(inputs, params, device)

    with atomic_output_dir(out) as staging:
        _copy_non_weight_files(pretrained, staging)
        for shard in shards:
            keys = LazyCheckpoint(shard).keys()
            merged = {key: merged_tensor(rule, inputs, key) for key in inputs.iterate(keys, f"merging {shard.name}")}
            save_file(merged, staging / shard.name, metadata={"format": "pt"})
            del merged  # hold one shard at a time, not this one while the next is assembled
        atomic_write_json(
            staging / MERGE_RECORD,
            {
                "method": method,
                "params": params,
                "pretrained": _identity(pretrained),
                "experts": [_identity(path) for path in experts],
                "cast_experts": cast_experts,
                "expert_casts": inputs.casts,
                "provenance": provenance(device=str(device or "cpu")),
                **dict(record or {}),
            },
        )
    log.info("wrote %s", out)
    return out


def _copy_non_weight_files(source: Path, destination: Path) -> None:
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name != MERGE_RECORD and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, destination / path.name)


def _identity(path: Path) -> dict:
    """What identifies an input checkpoint: its path and the SHA-256 of each safetensors file."""
    files = [path] if path.is_file() else safetensors_files(path)
    return {"path": str(path.resolve()), "sha256": {file.name: sha256_file(file) for file in files}}
