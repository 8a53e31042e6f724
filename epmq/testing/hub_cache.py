"""The Hugging Face cache layout (``HF_HOME``) written by ``scripts/make_hub_fixtures.py``.

- :func:`write_repo`: one model or dataset repository in ``$HF_HOME/hub`` as ``huggingface_hub``
  lays it out: ``refs/main`` -> ``snapshots/<commit>/<file>`` -> ``blobs/<hash>``.
- :func:`write_dataset`: a parquet dataset repository with its dataset card, and the data prepared
  under ``$HF_HOME/datasets`` where an offline ``datasets.load_dataset`` looks for it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_repo(hf_home: Path, repo_type: str, repo_id: str, files: Mapping[str, bytes]) -> Path:
    """One repository in the hub cache: blobs named as the hub names them, a snapshot of symlinks, refs/main.

    LFS files (weights, parquet) are stored under their SHA-256, small files under their git blob
    SHA-1, as ``huggingface_hub`` does. The commit id is derived from the content (deterministic).
    """
    folder = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    lfs = (".safetensors", ".bin", ".parquet", ".pth", ".model", ".msgpack", ".h5")
    digests = {name: (hashlib.sha256(data).hexdigest() if name.endswith(lfs) else _git_blob_sha1(data))
               for name, data in files.items()}
    commit = hashlib.sha1(json.dumps(sorted(digests.items())).encode()).hexdigest()
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = folder / "snapshots" / commit
    for name, data in files.items():
        blob = folder / "blobs" / digests[name]
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``folder``: a repository's files for ``write_repo``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _parquet(table_rows: Mapping[str, list], features) -> bytes:
    import datasets

    buffer = io.BytesIO()
    datasets.Dataset.from_dict(dict(table_rows), features=features).to_parquet(buffer)
    return buffer.getvalue()


def write_dataset(hf_home: Path, repo_id: str, configs: Mapping[str, Mapping[str, tuple[dict, object]]]) -> None:
    """A dataset repository (parquet per config and split, dataset card) and its prepared cache.

    ``configs``: config name -> split -> (columns, features). The card's ``configs:`` section names
    the data files of each config as the hub's parquet repositories do.
    """
    import datasets
    import yaml
    from datasets.data_files import DataFilesDict, DataFilesList
    from datasets.packaged_modules.parquet.parquet import Parquet

    files, card = {}, []
    for config, splits in configs.items():
        data_files = []
        for split, (columns, features) in splits.items():
            path = f"{config}/{split}-00000-of-00001.parquet"
            files[path] = _parquet(columns, features)
            data_files.append({"split": split, "path": path})
        card.append({"config_name": config, "data_files": data_files})
    files["README.md"] = ("---\n" + yaml.safe_dump({"configs": card}, sort_keys=False) + "---\n").encode()
    snapshot = write_repo(hf_home, "dataset", repo_id, files)
    for config, splits in configs.items():
        features = next(iter(splits.values()))[1]
        builder = Parquet(
            cache_dir=str(hf_home / "datasets"), dataset_name=repo_id.split("/")[-1],
            config_name=config, config_id=config, hash=snapshot.name, features=features,
            data_files=DataFilesDict({split: DataFilesList(
                [str(snapshot / config / f"{split}-00000-of-00001.parquet")], [None]) for split in splits}),
        )
        # an online load passes repo_id (its data files are hf:// URLs, which need the hub to resolve):
        # set it afterwards, so the prepared data lands where an offline load looks (<org>___<name>/)
        builder.repo_id = repo_id
        builder._cache_dir_root = str(hf_home / "datasets")
        builder._cache_dir = builder._build_cache_dir()
        builder.download_and_prepare(download_config=datasets.DownloadConfig(local_files_only=True))
