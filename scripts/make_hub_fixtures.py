"""Write a Hugging Face cache (``HF_HOME``) of tiny stand-ins for every model and dataset the paper suites load.

    python scripts/make_hub_fixtures.py --hf-home /tmp/hf-fixtures [--table config/experts.tsv] [--suites S ...]
    HF_HOME=/tmp/hf-fixtures HF_HUB_OFFLINE=1 snakemake paper --configfile config/paper-rehearsal.yaml --cores 2

Models (``$HF_HOME/hub/models--org--name``): for every repository of the experts table, a valid
hub-cache entry (``refs/main`` -> ``snapshots/<commit>/<file>`` -> ``blobs/<hash>``, files named as
in the real repository) holding a tiny model of the real repository's kind and layout:

- ``openai/clip-vit-base-patch32``: a ``CLIPModel`` as ``pytorch_model.bin`` only (no safetensors on
  ``main``), ``openai/clip-vit-large-patch14``: ``model.safetensors`` (and ``pytorch_model.bin``); both
  carry the text and vision ``embeddings.position_ids`` buffers, fp32, with the CLIP tokenizer and
  image-processor files.
- ``tanganke/clip-vit-*_<task>``: ``CLIPVisionModel`` (``vision_model.`` keys, no ``position_ids``),
  ``model.safetensors`` + ``config.json``, no tokenizer.
- ``google/flan-t5-base`` (``model.safetensors``, tokenizer) and ``tanganke/flan-t5-base_glue-*``
  (weights and configs, no tokenizer).
- ``meta-llama/Llama-3.*-Instruct``: bf16, sharded ``model-0000i-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` (2 shards for 3B, 4 for 8B), tokenizer files, ``original/``;
  ``MergeBench/*``: the same layout in fp32 (so the merge must cast them, ``cast_experts``).

Datasets (``$HF_HOME/hub/datasets--org--name``, parquet files under the real repositories' config
and split names with a dataset card listing them) for FusionBench's image datasets, ``nyu-mll/glue``,
the lm-eval tasks' datasets and MergeBench's calibration sets, with the real column names. Offline
(``HF_HUB_OFFLINE=1``), ``datasets.load_dataset`` does not read the hub cache: it reads what an
online ``load_dataset`` prepared under ``$HF_HOME/datasets`` (its ``CachedDatasetModuleFactory``).
So each dataset is also prepared there, by the same parquet builder, repository id and commit an
online load on the login node uses; what is not exercised is only the download itself.

The cache layout itself is written by ``epmq.testing.hub_cache``. Which facts about the real
repositories are verified and which inferred: README, "Dress rehearsal".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: import the project and its tiny paper models
    sys.path.insert(0, str(ROOT))

from epmq.hub.experts_table import read_experts_table  # noqa: E402
from epmq.testing.hub_cache import folder_files, write_dataset, write_repo  # noqa: E402
from epmq.testing.paper_models import (  # noqa: E402
    clip_tokenizer,
    llama_tokenizer,
    perturbed,
    t5_tokenizer,
    tiny_clip_model,
    tiny_llama_model,
    tiny_t5_model,
)

# Repository facts the fixtures reproduce (README "Dress rehearsal": verified or inferred).
BIN_ONLY = {"openai/clip-vit-base-patch32"}  # no model.safetensors on main (inferred from its mirrors)
LLAMA_SHARDS = {"meta-llama/Llama-3.2-3B-Instruct": 2, "meta-llama/Llama-3.1-8B-Instruct": 4}
MERGEBENCH_SHARDS = 2
LLAMA_CONTEXT = 2048
CLIP_IMAGE = {"openai/clip-vit-base-patch32": (32, 8), "openai/clip-vit-large-patch14": (28, 4)}  # (size, patch)


def _save_model(model, folder: Path, *, dtype: torch.dtype | None = None, shards: int = 1) -> None:
    """save_pretrained, in ``dtype``, split into ``shards`` files with an index when > 1."""
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    if shards > 1:
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        keys = list(state)
        weight_map = {}
        for index, part in enumerate(np.array_split(np.arange(len(keys)), shards), start=1):
            name = f"model-{index:05d}-of-{shards:05d}.safetensors"
            save_file({keys[i]: state[keys[i]] for i in part}, str(folder / name), metadata={"format": "pt"})
            weight_map.update({keys[i]: name for i in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _clip_state_with_position_ids(model) -> dict[str, torch.Tensor]:
    """The state dict as transformers < 4.31 wrote it: with both ``embeddings.position_ids`` buffers."""
    state = {key: value.clone() for key, value in model.state_dict().items()}
    for tower in ("text_model", "vision_model"):
        state[f"{tower}.embeddings.position_ids"] = getattr(model, tower).embeddings.position_ids.clone()
    return state


# ------------------------------------------------------------------------------------- models --
def clip_repos(hf_home: Path, entries, tmp: Path) -> None:
    """The CLIP pretrained repositories and FusionBench's vision-tower experts."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    from evals.clip_tasks import TASKS
    from evals.datasets import clip_image_processor

    texts = [t.format(c) for spec in TASKS.values() for c in spec.classnames for t in spec.templates[:2]]
    tokenizer = clip_tokenizer(texts)
    pretrained = sorted({e.source for e in entries if e.role == "pretrained" and e.source in CLIP_IMAGE})
    for number, repo in enumerate(pretrained):
        size, patch = CLIP_IMAGE[repo]
        model = tiny_clip_model(tokenizer, seed=number, image_size=size)
        model.config.vision_config.patch_size = patch
        model = type(model)(model.config).eval()
        folder = tmp / repo
        model.save_pretrained(folder)  # config.json (+ a model.safetensors replaced below)
        (folder / "model.safetensors").unlink()
        tokenizer.save_pretrained(folder)
        clip_image_processor(size).save_pretrained(folder)
        state = _clip_state_with_position_ids(model)
        torch.save(state, folder / "pytorch_model.bin")
        if repo not in BIN_ONLY:
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        write_repo(hf_home, "model", repo, folder_files(folder))
        experts = sorted({e.source for e in entries if e.role == "expert" and e.source.startswith(
            f"tanganke/{repo.split('/')[1]}_")})
        for index, expert_repo in enumerate(experts):
            tower = CLIPVisionModel(model.config.vision_config)
            tower.load_state_dict(perturbed(model.vision_model, seed=100 * number + index).state_dict(), strict=False)
            expert_dir = tmp / expert_repo
            tower.save_pretrained(expert_dir)  # transformers 5: no position_ids (non-persistent), no prefix
            from safetensors.torch import load_file

            weights = load_file(str(expert_dir / "model.safetensors"))
            prefixed = {k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in weights.items()}
            save_file(prefixed, str(expert_dir / "model.safetensors"), metadata={"format": "pt"})
            write_repo(hf_home, "model", expert_repo, folder_files(expert_dir))


def t5_repos(hf_home: Path, entries, tmp: Path) -> None:
    from evals.glue import TASKS, glue_texts

    rows = [glue_texts(task, _glue_rows(task, 1, 0)[0]) for task in TASKS]
    tokenizer = t5_tokenizer([text for pair in rows for text in pair] + ["yes no maybe entailment"])
    model = tiny_t5_model(tokenizer)
    for entry in entries:
        folder = tmp / entry.source
        if folder.exists():
            continue
        source = model if entry.role == "pretrained" else perturbed(model, seed=len(list(tmp.rglob("config.json"))))
        source.save_pretrained(folder)
        if entry.role == "pretrained":
            tokenizer.save_pretrained(folder)
        write_repo(hf_home, "model", entry.source, folder_files(folder))


def llama_repos(hf_home: Path, entries, tmp: Path) -> None:
    tokenizer = llama_tokenizer(_llm_texts() * 2)
    bases = {}
    for entry in sorted(entries, key=lambda e: e.role != "pretrained"):
        folder = tmp / entry.source
        if folder.exists():
            continue
        if entry.role == "pretrained":
            model = bases.setdefault(entry.suite, tiny_llama_model(tokenizer, seed=len(bases)))
            # lm-eval's generative tasks ask for up to 1024 new tokens (Llama-3's own limit: 131072)
            model.config.max_position_embeddings = LLAMA_CONTEXT
            _save_model(model, folder, dtype=torch.bfloat16, shards=LLAMA_SHARDS.get(entry.source, 2))
            (folder / "original").mkdir()
            (folder / "original" / "params.json").write_text(json.dumps({"dim": model.config.hidden_size}))
            torch.save({}, folder / "original" / "consolidated.00.pth")
        else:
            base = bases[entry.suite]
            expert = perturbed(base.to(torch.float32), seed=len(list(tmp.rglob("config.json"))))
            _save_model(expert, folder, dtype=torch.float32, shards=MERGEBENCH_SHARDS)
        tokenizer.save_pretrained(folder)
        write_repo(hf_home, "model", entry.source, folder_files(folder))


# ----------------------------------------------------------------------------------- datasets --
def clip_datasets(hf_home: Path, tasks: Iterable[str], train: int, test: int) -> None:
    import datasets
    from PIL import Image

    from evals.clip_tasks import get_task

    by_repo: dict[tuple[str, str | None], dict] = {}
    for task in tasks:
        spec = get_task(task)
        features = datasets.Features({spec.image_column: datasets.Image(),
                                      spec.label_column: datasets.ClassLabel(names=list(spec.classnames))})
        rng = np.random.default_rng(len(by_repo))
        splits = by_repo.setdefault((spec.dataset, spec.dataset_config), {})
        for split, n in ((spec.train_split, train), (spec.test_split, test)):
            images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]
            labels = [int(i % len(spec.classnames)) for i in range(n)]
            splits[split] = ({spec.image_column: images, spec.label_column: labels}, features)
    repos: dict[str, dict] = {}
    for (repo, config), splits in by_repo.items():
        repos.setdefault(repo, {})[config or "default"] = splits
    for repo, configs in repos.items():
        write_dataset(hf_home, repo, configs)


GLUE_COLUMNS = {
    "cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"), "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
}
GLUE_CLASSES = {"cola": 2, "sst2": 2, "mrpc": 2, "qqp": 2, "mnli": 3, "qnli": 2, "rte": 2}


def _glue_rows(task: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat while dogs ran fast and slow birds sang".split()
    rows = []
    for i in range(n):
        row = {column: " ".join(rng.choice(words, 6)) for column in GLUE_COLUMNS[task]}
        row["label"] = float(rng.uniform(0, 5)) if task == "stsb" else int(i % GLUE_CLASSES[task])
        row["idx"] = i
        rows.append(row)
    return rows


def glue_dataset(hf_home: Path, tasks: Iterable[str], train: int, test: int) -> None:
    import datasets

    configs = {}
    for task in tasks:
        label = (datasets.Value("float32") if task == "stsb" else datasets.ClassLabel(num_classes=GLUE_CLASSES[task]))
        features = datasets.Features({**{c: datasets.Value("string") for c in GLUE_COLUMNS[task]},
                                      "label": label, "idx": datasets.Value("int32")})
        evaluation = ["validation_matched", "validation_mismatched"] if task == "mnli" else ["validation"]
        splits = {}
        for number, split in enumerate(["train", *evaluation, "test"]):
            rows = _glue_rows(task, train if split == "train" else test, number)
            splits[split] = ({key: [row[key] for row in rows] for key in features}, features)
        configs[task] = splits
    write_dataset(hf_home, "nyu-mll/glue", configs)


def _llm_texts() -> list[str]:
    return [f"Question: what is {a} plus {b}? Answer: {a + b}. The answer is {a + b}." for a in range(6) for b in range(6)]


def llm_datasets(hf_home: Path, calibration_tasks: Iterable[str], train: int, test: int) -> None:
    """MergeBench's calibration sets and the lm-eval tasks' datasets, with the real columns and splits."""
    import datasets

    from evals.datasets import LLM_CALIBRATION

    def strings(*names):
        return datasets.Features({name: datasets.Value("string") for name in names})

    for task in calibration_tasks:
        spec = LLM_CALIBRATION[task]
        columns = [c for c in (spec["instruction"], spec["input"], spec["output"]) if c]
        rows = {c: [f"{c} {i}: what is {i} plus {i}?" for i in range(train)] for c in columns}
        write_dataset(hf_home, spec["dataset"], {"default": {"train": (rows, strings(*columns))}})
    n = range(test)
    qa = {"question": [f"What is {i} plus {i}?" for i in n], "answer": [f"{i} + {i} = {2 * i}\n#### {2 * i}" for i in n]}
    write_dataset(hf_home, "openai/gsm8k", {"main": {s: (qa, strings("question", "answer")) for s in ("train", "test")}})
    math = {"problem": [f"Compute ${i}+{i}$." for i in n], "solution": [f"$\\boxed{{{2 * i}}}$" for i in n],
            "answer": [str(2 * i) for i in n], "subject": ["Algebra"] * test, "level": [1] * test,
            "unique_id": [f"test/algebra/{i}.json" for i in n]}
    math_features = strings("problem", "solution", "answer", "subject", "unique_id")
    math_features["level"] = datasets.Value("int64")
    write_dataset(hf_home, "HuggingFaceH4/MATH-500", {"default": {"test": (math, math_features)}})
    arc_features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                      "choices": {"text": datasets.Sequence(datasets.Value("string")),
                                                  "label": datasets.Sequence(datasets.Value("string"))},
                                      "answerKey": datasets.Value("string")})
    arc = {"id": [f"arc-{i}" for i in n], "question": [f"What is {i} plus {i}?" for i in n],
           "choices": [{"text": [str(2 * i), str(2 * i + 1), str(i), "0"], "label": ["A", "B", "C", "D"]} for i in n],
           "answerKey": ["A"] * test}
    write_dataset(hf_home, "allenai/ai2_arc", {c: {s: (arc, arc_features) for s in ("train", "validation", "test")}
                                               for c in ("ARC-Challenge", "ARC-Easy")})
    ifeval_features = datasets.Features({"key": datasets.Value("int64"), "prompt": datasets.Value("string"),
                                         "instruction_id_list": datasets.Sequence(datasets.Value("string")),
                                         "kwargs": [{"num_words": datasets.Value("int64"),
                                                     "relation": datasets.Value("string")}]})
    ifeval = {"key": list(n), "prompt": [f"Write about {i} in at least 3 words." for i in n],
              "instruction_id_list": [["length_constraints:number_words"]] * test,
              "kwargs": [[{"num_words": 3, "relation": "at least"}]] * test}
    write_dataset(hf_home, "google/IFEval", {"default": {"train": (ifeval, ifeval_features)}})
    human = {"task_id": [f"HumanEval/{i}" for i in n], "prompt": [f"def add_{i}(a, b):\n" for i in n],
             "canonical_solution": ["    return a + b\n"] * test,
             "test": [f"def check(candidate):\n    assert candidate(1, {i}) == {1 + i}\n" for i in n],
             "entry_point": [f"add_{i}" for i in n]}
    write_dataset(hf_home, "openai/openai_humaneval",
                  {"openai_humaneval": {"test": (human, strings(*human))}})
    mbpp_features = datasets.Features({"task_id": datasets.Value("int64"), "code": datasets.Value("string"),
                                       "prompt": datasets.Value("string"), "source_file": datasets.Value("string"),
                                       "test_imports": datasets.Sequence(datasets.Value("string")),
                                       "test_list": datasets.Sequence(datasets.Value("string")),
                                       "test": datasets.Value("string")})
    mbpp = {"task_id": list(n), "code": ["def add(a, b):\n    return a + b\n"] * test,
            "prompt": ["Write a function add(a, b) that returns their sum."] * test, "source_file": ["x.py"] * test,
            "test_imports": [[]] * test, "test_list": [[f"assert add(1, {i}) == {1 + i}"] for i in n],
            "test": [f"assert add(1, {i}) == {1 + i}\n" for i in n]}
    write_dataset(hf_home, "evalplus/mbppplus", {"default": {"test": (mbpp, mbpp_features)}})


# ------------------------------------------------------------------------------------------ CLI --
#: per suite builder: the writers of its model repositories and of its datasets
FAMILIES = {"hub-clip": (clip_repos, clip_datasets), "hub-t5": (t5_repos, glue_dataset),
            "hub-llama": (llama_repos, llm_datasets)}


def make_fixtures(hf_home: str | os.PathLike, table: str | os.PathLike = ROOT / "config" / "experts.tsv",
                  suites: Iterable[str] | None = None, train: int = 16, test: int = 8) -> Path:
    """Write every fixture of ``suites`` (default: all of ``table``) into ``hf_home``; return it."""
    import tempfile

    from epmq.suites.base import load_suite, packaged_config

    hf_home = Path(hf_home)
    entries = read_experts_table(table)
    names = sorted({e.suite for e in entries}) if suites is None else list(suites)
    entries = [e for e in entries if e.suite in names]
    configs = {name: load_suite(packaged_config(name)).cfg for name in names}
    with tempfile.TemporaryDirectory(dir=hf_home.parent if hf_home.parent.exists() else None) as tmp:
        tmp = Path(tmp)
        for builder, (repos, datasets) in FAMILIES.items():
            family = [name for name, cfg in configs.items() if cfg["builder"] == builder]
            if family:
                repos(hf_home, [e for e in entries if e.suite in family], tmp)
                datasets(hf_home, sorted({task for name in family for task in configs[name]["tasks"]}), train, test)
    return hf_home


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-home", required=True, type=Path, help="the HF_HOME to write (hub/ and datasets/)")
    parser.add_argument("--table", type=Path, default=ROOT / "config" / "experts.tsv")
    parser.add_argument("--suites", nargs="*", default=None, help="only these suites (default: every suite of the table)")
    parser.add_argument("--train", type=int, default=16, help="examples per training split")
    parser.add_argument("--test", type=int, default=8, help="examples per evaluation split")
    args = parser.parse_args(None if argv is None else list(argv))
    args.hf_home.mkdir(parents=True, exist_ok=True)
    make_fixtures(args.hf_home, args.table, args.suites, args.train, args.test)
    print(args.hf_home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
