"""Fetch pretrained models and experts (hub id or local path) into ``resources/``, and split CLIP.

``fetch`` brings one model into a directory of its own (the *store*: ``resources/models/<owner--name@revision>``,
one per model and revision, shared by every suite that lists it; suites link to it, never copy),
safetensors weights only:

- a hub id (``owner/name``) goes through ``huggingface_hub.snapshot_download`` into the HF cache
  (so a second fetch, or one with ``HF_HUB_OFFLINE=1``, reads the cache), and the wanted files are
  hard-linked (copied across file systems) into ``out_dir``. The commit the revision resolved to
  is recorded in ``out_dir/fetch.json``: ``config/experts.tsv`` asks for ``main`` because a pinned
  hash cannot be known offline, and the record pins what was actually used.
- a local path (an HF ``save_pretrained`` folder) is linked or copied the same way, with the
  SHA-256 of its weight files recorded instead of a commit.

A repository without safetensors weights (``openai/clip-vit-base-patch32`` may have only
``pytorch_model.bin`` on ``main``) is fetched as ``pytorch_model*.bin``, read with
``torch.load(weights_only=True)`` (tensors only, never a full unpickle) and converted once to
safetensors in the store; both files' SHA-256 are recorded (``converted_from_bin``).

:func:`fetch_to_store` is what the workflow calls: it takes a lock per model (``fcntl`` on a file
beside the store folder, so parallel suites fetching the same expert wait for one download), reuses
a complete store folder, and otherwise fetches; the output is staged beside its destination
(``atomic_output_dir``), so the final rename is atomic on one filesystem. :func:`link_model` puts a
store folder's files into a suite's folder as hard links (symbolic links across filesystems).

Without the model in the cache and without hub access, ``fetch`` raises one
:class:`HubFetchError` naming the model and saying how to give a local path instead.

``split_clip`` turns a full pretrained ``CLIPModel`` (``openai/clip-vit-base-patch32``) into the two
things the CLIP suites use (paper §5.1: zero-shot CLIP with FusionBench's experts):

- ``vision/``: the vision tower as a ``CLIPVisionModel`` checkpoint, the thing that is merged and
  quantized. Its tensor names follow the experts' convention. FusionBench's experts
  ``tanganke/clip-vit-*_<task>`` are ``CLIPVisionModel.save_pretrained`` folders written by
  transformers 4, whose keys carry the ``vision_model.`` prefix (``vision_model.encoder.layers.0...``);
  transformers 5 writes the same model without the prefix. The merge refuses experts whose tensor
  names differ from the pretrained model's (``epmq.merge.registry.check_consistent``), so the
  pretrained tower is written with the experts' prefix: detected from one expert (``like``) when
  given, else ``vision_model.`` (transformers 4's convention). transformers 5 loads both forms
  into ``CLIPVisionModel`` (checked by ``tests/test_hub.py``), and ``LazyCheckpoint.resolve``
  matches E-PMQ's expert tensors to module names in either form. ``align_checkpoint`` rewrites an
  expert into a reference's convention when a source mixes them.
- ``zeroshot/``: what the zero-shot heads need and what stays pretrained: the text tower, the
  text and visual projections and the logit scale (a ``CLIPModel`` checkpoint without the vision
  weights), with the tokenizer and image-processor files.

CLI: ``python -m epmq.hub {fetch,fetch-suite,clip-split,align} ...`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from epmq.io import (
    LazyCheckpoint,
    atomic_output_dir,
    atomic_write_json,
    check_output,
    provenance,
    sha256_file,
)

log = logging.getLogger("epmq.hub")

FETCH_RECORD = "fetch.json"
EXPERTS_TABLE = Path("config/experts.tsv")
# Weights: safetensors only. Everything else a model folder needs: configs, tokenizers, processors.
DEFAULT_ALLOW = (
    "*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "tokenizer*",
    "spiece*",
)
# Never fetched, whatever ``allow`` says: other weight formats, and Meta's original/ folders.
NEVER = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot",
         "original/*", ".git*", ".cache/*", FETCH_RECORD)
VISION_PREFIX = "vision_model."  # transformers 4's CLIPVisionModel keys (FusionBench's experts)


class HubFetchError(ValueError):
    """A model could not be fetched; the message names it and says how to provide it locally."""


# ------------------------------------------------------------------------------------ fetch --
def is_local_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a local folder rather than a hub id ``owner/name``.

    A source is local if it exists, or if it looks like a path: absolute, ``./``, ``../``, ``~``,
    or with more than one ``/`` (hub ids have exactly one). ``local:PATH`` forces a path.
    """
    text = str(source)
    if text.startswith("local:"):
        return True
    if Path(text).expanduser().exists():
        return True
    return text.startswith(("/", "./", "../", "~")) or text.count("/") != 1


def _wanted(relative: str, allow: Sequence[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    if any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in NEVER):
        return False
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in allow)


def _materialise(source_dir: Path, destination: Path, allow: Sequence[str], link: bool = True) -> list[str]:
    """Hard-link (else copy) the wanted files of ``source_dir`` into ``destination``; return their names."""
    names = []
    for path in sorted(source_dir.rglob("*")):
        relative = path.relative_to(source_dir).as_posix()
        if not path.is_file() or not _wanted(relative, allow):
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()  # HF cache snapshots hold symlinks into blobs/
        try:
            if not link:
                raise OSError
            os.link(real, target)
        except OSError:
            shutil.copy2(real, target)
        names.append(relative)
    return names


def _missing_message(source: str, revision: str, label: str | None, reason: str) -> str:
    what = f"{label} ({source}@{revision})" if label else f"{source}@{revision}"
    return (
        f"cannot fetch {what}: {reason}. Either run the fetch where the Hugging Face hub is reachable "
        f"(it fills the cache, then later fetches work offline), or download the model elsewhere and set "
        f"its `source` column in {EXPERTS_TABLE} to the local folder (an HF save_pretrained directory "
        f"with *.safetensors weights)."
    )


def _snapshot(repo_id: str, revision: str, allow, label, local_files_only, token, cache_dir, ignore=NEVER) -> Path:
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=list(allow), ignore_patterns=list(ignore),
            cache_dir=cache_dir, local_files_only=bool(local_files_only), token=token,
        )
    except hub_errors.GatedRepoError as error:
        raise HubFetchError(_missing_message(
            repo_id, revision, label, "the repository is gated: accept its licence on the hub and log in "
            "(`hf auth login` or HF_TOKEN)")) from error
    except hub_errors.RepositoryNotFoundError as error:
        raise HubFetchError(_missing_message(
            repo_id, revision, label, "no such repository on the hub (or it is private: set HF_TOKEN)")) from error
    except hub_errors.RevisionNotFoundError as error:
        raise HubFetchError(_missing_message(repo_id, revision, label, f"the hub has no revision {revision!r}")) from error
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled,
            getattr(hub_errors, "IncompleteSnapshotError", hub_errors.LocalEntryNotFoundError)) as error:
        raise HubFetchError(_missing_message(
            repo_id, revision, label, "it is not in the local Hugging Face cache and the hub cannot be reached "
            "(HF_HUB_OFFLINE=1 or no network)")) from error
    except (hub_errors.HfHubHTTPError, OSError) as error:
        raise HubFetchError(_missing_message(repo_id, revision, label, f"download failed ({error})")) from error
    return Path(path)


def fetch(
    source: str | os.PathLike,
    revision: str | None = "main",
    out_dir: str | os.PathLike = ".",
    allow: Sequence[str] = DEFAULT_ALLOW,
    *,
    label: str | None = None,
    require_weights: bool = True,
    local_files_only: bool | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    link: bool = True,
) -> Path:
    """Bring model ``source`` (hub id or local folder) at ``revision`` into ``out_dir``; return ``out_dir``.

    Only files matching ``allow`` (and none of :data:`NEVER`) are taken: safetensors weights,
    configs, tokenizer and processor files. ``out_dir/fetch.json`` records the source, the
    requested revision, the resolved commit (hub) or the weights' SHA-256 (local), the files and
    provenance. ``local_files_only=None`` follows ``HF_HUB_OFFLINE``. ``label`` (e.g.
    ``"clip-b32-ta8 expert sun397"``) is put into error messages. Written atomically.
    """
    revision = revision or "main"
    text = str(source)
    out_dir = Path(out_dir)
    local = is_local_source(text)
    if local_files_only is None:
        from huggingface_hub import constants

        local_files_only = bool(constants.HF_HUB_OFFLINE)
    if local:
        folder = Path(text.removeprefix("local:")).expanduser()
        if not folder.is_dir():
            raise HubFetchError(
                f"local model folder {folder} (for {label or text}) does not exist; fix its `source` column "
                f"in {EXPERTS_TABLE}, or use a hub id owner/name"
            )
        folder = folder.resolve()
        if out_dir.exists() and out_dir.resolve() == folder:
            raise HubFetchError(f"local source {folder} is the fetch's own output folder; point `source` elsewhere")
        upstream = folder / FETCH_RECORD
        record = {
            "kind": "local",
            "source": str(folder),
            "revision_requested": revision,
            "resolved_commit": json.loads(upstream.read_text()).get("resolved_commit") if upstream.exists() else None,
        }
    else:
        folder = _snapshot(text, revision, allow, label, local_files_only, token, cache_dir)
        record = {
            "kind": "hub",
            "source": text,
            "revision_requested": revision,
            # snapshot_download returns <cache>/models--owner--name/snapshots/<commit>
            "resolved_commit": folder.name,
            "cache_folder": str(folder),
        }
    with atomic_output_dir(out_dir) as staging:
        names = _materialise(folder, staging, allow, link=link)
        weights = [name for name in names if name.endswith(".safetensors")]
        converted = None
        if require_weights and not weights:
            bin_folder = folder
            if record["kind"] == "hub" and not _bin_files(folder):
                with contextlib.suppress(HubFetchError):
                    bin_folder = _snapshot(text, revision, BIN_WEIGHTS, label, local_files_only, token, cache_dir,
                                           ignore=("original/*",))
            if _bin_files(bin_folder):
                converted = convert_bin_checkpoint(bin_folder, staging, label=label or text)
                names += sorted(converted["safetensors"])
                weights = list(converted["safetensors"])
        if require_weights and not weights:
            hint = (" (a safetensors conversion may exist under another revision, e.g. the hub's refs/pr/N:"
                    " put it in the `revision` column)") if record["kind"] == "hub" else ""
            raise HubFetchError(_missing_message(
                text, revision, label, f"the snapshot has no *.safetensors and no pytorch_model*.bin weights{hint}"))
        files = {}
        for name in names:
            entry: dict = {"bytes": (staging / name).stat().st_size}
            if converted and name in converted["safetensors"]:
                entry["sha256"] = converted["safetensors"][name]
            elif record["kind"] == "hub":
                # LFS blobs are named by their SHA-256 in the cache; small files by their git hash.
                entry["blob"] = Path(os.path.realpath(folder / name)).name
            elif name.endswith(".safetensors"):
                entry["sha256"] = sha256_file(staging / name)
            files[name] = entry
        record.update(files=files, allow=list(allow), label=label, provenance=_provenance())
        if converted:
            record["converted_from_bin"] = converted
        atomic_write_json(staging / FETCH_RECORD, record)
    log.info("fetched %s@%s (%s) -> %s", text, revision, record["resolved_commit"] or "local", out_dir)
    return out_dir


BIN_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "*.json", "*.txt", "tokenizer*", "spiece*",
               "*.model", "*.tiktoken", "*.jinja")
BIN_INDEX = "pytorch_model.bin.index.json"


def _bin_files(folder: Path) -> list[Path]:
    """The ``pytorch_model*.bin`` weight files of a folder: those of its index when sharded."""
    index = folder / BIN_INDEX
    if index.exists():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(folder.glob("pytorch_model*.bin"))


def convert_bin_checkpoint(folder: Path, destination: Path, *, label: str) -> dict:
    """Convert ``pytorch_model*.bin`` of ``folder`` to safetensors in ``destination``; return the record.

    Each file is read with ``torch.load(weights_only=True)``: only tensors and plain containers are
    unpickled, anything else is refused. A single ``pytorch_model.bin`` becomes ``model.safetensors``,
    shards ``pytorch_model-0000i-of-0000n.bin`` become ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json``. Tensors that share storage (tied weights) are stored once each.
    Record: ``{"bin": {name: sha256}, "safetensors": {name: sha256}}``.
    """
    import torch

    bins = _bin_files(folder)
    record: dict = {"bin": {}, "safetensors": {}, "loader": "torch.load(weights_only=True)"}
    weight_map = {}
    for path in bins:
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:  # files of the pre-zip format cannot be memory-mapped
                if "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError for anything but tensors; RuntimeError for a bad zip
            raise HubFetchError(f"{label}: {path.name} cannot be read as a weights-only torch checkpoint "
                                f"(the snapshot has no *.safetensors weights): {str(error).splitlines()[0]}") from error
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise HubFetchError(f"{label}: {path.name} is not a state dict of tensors")
        name = "model.safetensors" if len(bins) == 1 else path.name.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        save_file({key: value.detach().clone().contiguous() for key, value in state.items()}, str(destination / name),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
        del state
        record["bin"][path.name] = sha256_file(path)
        record["safetensors"][name] = sha256_file(destination / name)
    if len(bins) > 1:
        atomic_write_json(destination / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    log.info("%s: converted %s to safetensors", label, ", ".join(record["bin"]))
    return record


@contextlib.contextmanager
def model_lock(folder: str | os.PathLike):
    """Hold an exclusive lock for one store folder (a ``.<name>.lock`` file beside it) while fetching it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_to_store(source: str, revision: str, root: str | os.PathLike, *, label: str | None = None, **kwargs) -> Path:
    """The store folder of ``source@revision`` under ``root``, fetched once (under its lock) and then reused."""
    folder = Path(root) / resource_name(source, revision)
    with model_lock(folder):
        record = folder / FETCH_RECORD
        if record.exists():
            done = json.loads(record.read_text())
            wanted = str(Path(str(source).removeprefix("local:")).expanduser().resolve()) if is_local_source(source) else source
            if done.get("source") == wanted and done.get("revision_requested") == revision:
                log.info("%s@%s: in the store (%s)", source, revision, folder)
                return folder
        return fetch(source, revision, folder, label=label, **kwargs)


def link_model(store: str | os.PathLike, destination: str | os.PathLike, skip: Sequence[str] = ()) -> list[str]:
    """Hard-link (symlink across filesystems) every file of ``store`` into ``destination``, except ``skip``."""
    store, destination = Path(store), Path(destination)
    names = []
    for path in sorted(store.rglob("*")):
        relative = path.relative_to(store).as_posix()
        if not path.is_file() or relative in skip:
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            target.symlink_to(path.resolve())
        names.append(relative)
    return names


def nonpersistent_buffers(model_dir: str | os.PathLike) -> set[str]:
    """State-dict names of the non-persistent buffers of the model class ``model_dir/config.json`` names.

    The model is built on the meta device (no memory). transformers registers CLIP's
    ``embeddings.position_ids`` with ``persistent=False`` since 4.31, so checkpoints written before
    carry it and later ones do not; such buffers are not part of a model's weights.
    """
    import torch
    import transformers

    if not (Path(model_dir) / "config.json").exists():
        return set()  # a bare weights folder: no class to ask, nothing is known to be non-persistent
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is None:
        return set()
    with torch.device("meta"):
        model = cls(config)
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() for name in module._non_persistent_buffers_set}


def is_nonpersistent(key: str, buffers: set[str]) -> bool:
    """Whether checkpoint key ``key`` is one of ``buffers`` (matching with or without leading prefixes)."""
    return any(key == name or key.endswith("." + name) or name.endswith("." + key) for name in buffers)


def _provenance() -> dict:
    import huggingface_hub

    return provenance(huggingface_hub=huggingface_hub.__version__)


# ------------------------------------------------------------------------- experts table --
COLUMNS = ("suite", "role", "task", "source", "revision", "note")
ROLES = ("pretrained", "expert")


@dataclass(frozen=True)
class ModelEntry:
    """One row of ``config/experts.tsv``."""

    suite: str
    role: str  # pretrained | expert
    task: str  # "-" for the pretrained model
    source: str  # hub id owner/name, or a local folder
    revision: str
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.suite} {self.role}" + ("" if self.role == "pretrained" else f" {self.task}")

    @property
    def placeholder(self) -> bool:
        return self.note.lower().startswith("placeholder")


def read_experts_table(path: str | os.PathLike = EXPERTS_TABLE, suite: str | None = None) -> list[ModelEntry]:
    """Rows of the experts table (``#`` lines are comments), checked; only ``suite``'s when given.

    Each suite must have exactly one pretrained row and unique expert tasks.
    """
    path = Path(path)
    with path.open(newline="") as handle:
        lines = [line for line in handle if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(lines, delimiter="\t")
    if tuple(reader.fieldnames or ())[: len(COLUMNS) - 1] != COLUMNS[:-1]:
        raise ValueError(f"{path}: header must be {' '.join(COLUMNS)} (tab-separated), got {reader.fieldnames}")
    entries = []
    for number, row in enumerate(reader, start=2):
        values = {key: (row.get(key) or "").strip() for key in COLUMNS}
        if values["role"] not in ROLES:
            raise ValueError(f"{path} row {number}: role must be one of {ROLES}, got {values['role']!r}")
        if not values["source"] or not values["suite"] or not values["task"]:
            raise ValueError(f"{path} row {number}: suite, task and source are required")
        entries.append(ModelEntry(**{**values, "revision": values["revision"] or "main"}))
    suites = {entry.suite for entry in entries}
    for name in suites:
        rows = [entry for entry in entries if entry.suite == name]
        pretrained = [entry for entry in rows if entry.role == "pretrained"]
        if len(pretrained) != 1:
            raise ValueError(f"{path}: suite {name} has {len(pretrained)} pretrained rows (needs exactly 1)")
        tasks = [entry.task for entry in rows if entry.role == "expert"]
        if len(tasks) != len(set(tasks)):
            raise ValueError(f"{path}: suite {name} lists a task twice")
    if suite is not None:
        entries = [entry for entry in entries if entry.suite == suite]
        if not entries:
            raise ValueError(f"{path}: no rows for suite {suite!r} (suites: {', '.join(sorted(suites))})")
    return entries


def resource_name(source: str, revision: str = "main") -> str:
    """Folder name of a fetched model under ``resources/models``: ``owner--name@revision`` (``/`` in a
    revision such as ``refs/pr/3`` becomes ``--``), or ``local--NAME-HASH`` for a local folder."""
    if any(part in ("", ".", "..") for part in str(revision).split("/")) or "\\" in str(revision):
        raise HubFetchError(f"revision {revision!r} of {source} is not a branch, tag or commit (no '..', no leading '/')")
    if is_local_source(source):
        folder = Path(str(source).removeprefix("local:")).expanduser().resolve()
        # two local folders with the same name must not share a cache folder
        return f"local--{folder.name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"
    return f"{source.replace('/', '--')}@{revision.replace('/', '--')}"


def fetch_suite(table: str | os.PathLike, suite: str, root: str | os.PathLike = "resources/models", **kwargs) -> dict[str, Path]:
    """Fetch every model of ``suite`` (each distinct source once); return ``{label: folder}``."""
    folders: dict[str, Path] = {}
    done: dict[tuple[str, str], Path] = {}
    for entry in read_experts_table(table, suite):
        key = (entry.source, entry.revision)
        if key not in done:
            done[key] = fetch(entry.source, entry.revision, Path(root) / resource_name(*key), label=entry.label, **kwargs)
        folders[entry.label] = done[key]
    return folders


# ------------------------------------------------------------------------------ CLIP split --
_TOKENIZER_AND_PROCESSOR = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                            "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
                            "processor_config.json")


def vision_key_prefix(checkpoint: str | os.PathLike) -> str:
    """``"vision_model."`` if a CLIP vision checkpoint's keys carry that prefix, else ``""``."""
    keys = LazyCheckpoint(checkpoint).keys()
    prefixed = sum(key.startswith(VISION_PREFIX) for key in keys)
    if prefixed and prefixed != len(keys):
        raise ValueError(f"{checkpoint}: some keys carry {VISION_PREFIX!r} and some do not")
    return VISION_PREFIX if prefixed else ""


def split_clip(
    clip_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    like: str | os.PathLike | None = None,
    prefix: str | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/vision`` (CLIPVisionModel) and ``out_dir/zeroshot`` (text side) from a CLIPModel folder.

    The vision tower's keys get ``prefix``: given, or that of the expert checkpoint ``like``, or
    ``vision_model.`` (see the module docstring). Non-persistent buffers stored in the file
    (``position_ids`` of older checkpoints) are dropped and listed in ``clip_split.json``: experts
    saved by newer transformers lack them, and only parameters and persistent buffers are compared
    and merged. Returns the two folders.
    """
    from transformers import CLIPConfig

    clip_dir, out_dir = Path(clip_dir), Path(out_dir)
    config = json.loads((clip_dir / "config.json").read_text())
    if config.get("model_type") != "clip":
        raise ValueError(f"{clip_dir} is not a full CLIPModel (model_type {config.get('model_type')!r}); "
                         "the pretrained CLIP source must be e.g. openai/clip-vit-base-patch32")
    prefix_from = "argument" if prefix is not None else (f"expert {like}" if like is not None else "default (transformers 4)")
    if prefix is None:
        prefix = vision_key_prefix(like) if like is not None else VISION_PREFIX
    checkpoint = LazyCheckpoint(clip_dir)
    buffers = nonpersistent_buffers(clip_dir)
    dropped = [key for key in checkpoint.keys() if is_nonpersistent(key, buffers)]
    kept = [key for key in checkpoint.keys() if key not in dropped]
    vision_keys = [key for key in kept if key.startswith(VISION_PREFIX)]
    text_keys = [key for key in kept if not key.startswith(VISION_PREFIX)]
    if not vision_keys or "visual_projection.weight" not in checkpoint or "logit_scale" not in checkpoint:
        raise ValueError(f"{clip_dir}: expected vision_model.*, visual_projection.weight and logit_scale tensors")
    upstream = clip_dir / FETCH_RECORD
    origin = {
        "clip_dir": str(clip_dir.resolve()),
        "resolved_commit": json.loads(upstream.read_text()).get("resolved_commit") if upstream.exists() else None,
        "vision_key_prefix": prefix,
        "prefix_from": prefix_from,
        # in the file, but not weights of transformers' CLIPModel (position_ids, see nonpersistent_buffers)
        "dropped_nonpersistent_buffers": dropped,
    }
    with atomic_output_dir(out_dir) as staging:
        vision, zeroshot = staging / "vision", staging / "zeroshot"
        vision.mkdir()
        zeroshot.mkdir()
        vision_config = CLIPConfig.from_pretrained(clip_dir).vision_config
        vision_config.architectures = ["CLIPVisionModel"]
        vision_config.save_pretrained(vision)
        state = {prefix + key[len(VISION_PREFIX):]: checkpoint.get(key).contiguous() for key in vision_keys}
        save_file(state, str(vision / "model.safetensors"), metadata={"format": "pt"})
        del state
        save_file({key: checkpoint.get(key).contiguous() for key in text_keys}, str(zeroshot / "model.safetensors"),
                  metadata={"format": "pt"})
        shutil.copy2(clip_dir / "config.json", zeroshot / "config.json")
        for name in _TOKENIZER_AND_PROCESSOR:
            if (clip_dir / name).exists():
                shutil.copy2(clip_dir / name, zeroshot / name)
                if name == "preprocessor_config.json":
                    shutil.copy2(clip_dir / name, vision / name)
        atomic_write_json(vision / "clip_split.json", {**origin, "part": "vision", "provenance": provenance()})
        atomic_write_json(zeroshot / "clip_split.json", {**origin, "part": "zeroshot", "provenance": provenance()})
    return out_dir / "vision", out_dir / "zeroshot"


def align_checkpoint(src: str | os.PathLike, like: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Rewrite checkpoint ``src`` with the tensor names of ``like`` (same architecture, other convention).

    Names are matched exactly or, failing that, by a unique match after dropping leading dotted
    components (``vision_model.``, ``model.``; as ``LazyCheckpoint.resolve``). Tensors of ``src``
    that ``like`` lacks are dropped only when they duplicate a kept tensor (tied embeddings);
    anything else, and any tensor of ``like`` that ``src`` lacks, is an error. Non-weight files are
    copied from ``src``.
    """
    import torch

    src, like, out_dir = Path(src), Path(like), Path(out_dir)
    source, reference = LazyCheckpoint(src), LazyCheckpoint(like)
    state, used = {}, set()
    for key in reference.keys():
        try:
            stored = source.resolve(key)
        except ValueError as error:
            raise ValueError(f"cannot align {src} to {like}: {error}") from error
        state[key] = source.get(stored).contiguous()
        used.add(stored)
    for key in source.keys():
        if key in used:
            continue
        tensor = source.get(key)
        if not any(value.shape == tensor.shape and torch.equal(value, tensor) for value in state.values()):
            raise ValueError(f"cannot align {src} to {like}: {src} has tensor {key!r} that {like} lacks")
    with atomic_output_dir(out_dir) as staging:
        for path in sorted(src.iterdir()):
            if path.is_file() and not path.name.endswith((".safetensors", ".safetensors.index.json")):
                shutil.copy2(path, staging / path.name)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(staging / "align.json", {"src": str(src), "like": str(like), "provenance": provenance()})
    return out_dir


# ------------------------------------------------------------------------------------- CLI --
def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="hub_command", required=True)
    one = commands.add_parser("fetch", help="fetch one model (hub id or local folder)")
    one.add_argument("--source", required=True, help="hub id owner/name or local folder")
    one.add_argument("--revision", default="main")
    one.add_argument("--out", required=True, type=Path)
    one.add_argument("--overwrite", action="store_true", help="replace a non-empty --out this command did not write")
    one.add_argument("--label", default=None, help="what the model is, for error messages")
    one.add_argument("--allow", nargs="+", default=list(DEFAULT_ALLOW), help="file patterns to take")
    suite = commands.add_parser("fetch-suite", help="fetch every model of one suite of the experts table")
    suite.add_argument("--table", type=Path, default=EXPERTS_TABLE)
    suite.add_argument("--suite", required=True)
    suite.add_argument("--root", type=Path, default=Path("resources/models"))
    split = commands.add_parser("clip-split", help="CLIPModel folder -> vision/ (CLIPVisionModel) + zeroshot/")
    split.add_argument("--clip", required=True, type=Path)
    split.add_argument("--out", required=True, type=Path)
    split.add_argument("--overwrite", action="store_true", help="replace a non-empty --out this command did not write")
    split.add_argument("--like", type=Path, default=None, help="an expert checkpoint whose key convention to follow")
    split.add_argument("--prefix", default=None, help="key prefix of the vision tower ('none' for no prefix)")
    align = commands.add_parser("align", help="rewrite a checkpoint with another's tensor names")
    align.add_argument("--src", required=True, type=Path)
    align.add_argument("--like", required=True, type=Path)
    align.add_argument("--out", required=True, type=Path)
    align.add_argument("--overwrite", action="store_true", help="replace a non-empty --out this command did not write")


#: per command: the provenance file a previous output of it holds, and the inputs its --out must spare
_OUTPUTS = {
    "fetch": (FETCH_RECORD, lambda a: [a.source.removeprefix("local:")] if is_local_source(a.source) else []),
    "clip-split": ("vision/clip_split.json", lambda a: [a.clip] + ([a.like] if a.like else [])),
    "align": ("align.json", lambda a: [a.src, a.like]),
}


def run(args: argparse.Namespace) -> int:
    try:
        if args.hub_command in _OUTPUTS:
            record, inputs = _OUTPUTS[args.hub_command]
            check_output(args.out, inputs=inputs(args), records=[record], overwrite=args.overwrite)
        if args.hub_command == "fetch":
            fetch(args.source, args.revision, args.out, tuple(args.allow), label=args.label)
        elif args.hub_command == "fetch-suite":
            for label, folder in fetch_suite(args.table, args.suite, args.root).items():
                print(f"{label}\t{folder}")
        elif args.hub_command == "clip-split":
            prefix = "" if args.prefix == "none" else args.prefix
            split_clip(args.clip, args.out, like=args.like, prefix=prefix)
        elif args.hub_command == "align":
            align_checkpoint(args.src, args.like, args.out)
    except ValueError as error:  # HubFetchError and bad inputs: one clear line
        print(f"epmq hub: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epmq.hub", description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
