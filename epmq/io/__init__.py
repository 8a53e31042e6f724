"""Checkpoint and file I/O shared by every stage: lazy safetensors access, atomic writes, provenance.

The public face of :mod:`epmq.io`; each concern has its own module:

* :mod:`epmq.io.paths`: which input and output paths a stage accepts;
* :mod:`epmq.io.files`: atomic writes (a failed or interrupted job never leaves a half-written
  result), JSON and hashes;
* :mod:`epmq.io.safetensors_reader`: single tensors of a safetensors checkpoint, read on demand;
* :mod:`epmq.io.run_record`: what produced a result.
"""

from epmq.io.files import (
    atomic_output_dir,
    atomic_write_json,
    atomic_write_text,
    read_json,
    remove_stale_temporaries,
    sha256_file,
    strict_json,
)
from epmq.io.paths import CheckpointError, OutputError, check_output, require_local_dir, warn_duplicates
from epmq.io.run_record import provenance
from epmq.io.safetensors_reader import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, LazyCheckpoint, safetensors_files

__all__ = [
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "CheckpointError",
    "LazyCheckpoint",
    "OutputError",
    "atomic_output_dir",
    "atomic_write_json",
    "atomic_write_text",
    "check_output",
    "provenance",
    "read_json",
    "remove_stale_temporaries",
    "require_local_dir",
    "safetensors_files",
    "sha256_file",
    "strict_json",
    "warn_duplicates",
]
