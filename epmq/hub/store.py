"""The model store: fetch a pretrained model or expert (hub id or local path) into ``resources/models``.

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
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file

from epmq.hub.experts_table import EXPERTS_TABLE
from epmq.io import atomic_output_dir, atomic_write_json, provenance, sha256_file

log = logging.getLogger("epmq.hub")

FETCH_RECORD = "fetch.json"
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


def _provenance() -> dict:
    import huggingface_hub

    return provenance(huggingface_hub=huggingface_hub.__version__)
