"""Datasets saved on the local disk, for machines without hub access."""

from __future__ import annotations

import os
from pathlib import Path


def load_local(path: str | os.PathLike, split: str):
    """A split of a local dataset folder.

    Accepted: a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json``; the split is taken
    from it), a ``Dataset.save_to_disk`` folder (taken as the split itself), a folder with one
    such subfolder per split, or anything ``datasets.load_dataset(path, split=...)`` reads (a
    local copy of the hub repository: parquet, json, csv or an image folder).
    """
    import datasets

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"local dataset {path} does not exist")
    if (path / "dataset_dict.json").exists():
        dataset_dict = datasets.load_from_disk(str(path))
        if split not in dataset_dict:
            raise ValueError(f"{path} has splits {list(dataset_dict)}, not {split!r}")
        return dataset_dict[split]
    if (path / "state.json").exists():
        return datasets.load_from_disk(str(path))
    if (path / split / "state.json").exists():
        return datasets.load_from_disk(str(path / split))
    return datasets.load_dataset(str(path), split=split)
