"""Merge operators (simple averaging, task arithmetic, TIES, WUDI), in memory and streaming.

- ``MERGERS[name](pretrained, experts, **params)`` merges state dicts in memory; ``name`` is a
  config name of ``epmq/schemas/methods.schema.yaml`` and ``params`` default from it.
- :func:`merge_checkpoints` merges safetensors checkpoints one tensor at a time into an HF
  checkpoint directory with a ``merge.json`` record (the CLI and the workflow use it).
- ``python -m epmq merge ...``: :func:`add_arguments` and :func:`run`.
"""

from epmq.merge.command import add_arguments, run
from epmq.merge.registry import (
    MERGERS,
    MergeError,
    MergeInputs,
    Merger,
    StateDictInputs,
    merge_state_dicts,
    register_merge,
)
from epmq.merge.streaming import MERGE_RECORD, CheckpointInputs, merge_checkpoints

__all__ = [
    "MERGERS",
    "MERGE_RECORD",
    "CheckpointInputs",
    "MergeError",
    "MergeInputs",
    "Merger",
    "StateDictInputs",
    "add_arguments",
    "merge_checkpoints",
    "merge_state_dicts",
    "register_merge",
    "run",
]
