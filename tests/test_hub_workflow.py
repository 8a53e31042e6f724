"""The paper-scale DAG path offline: a 'hub' of local folders (a tiny CLIPModel, FusionBench-style
experts, local datasets) named in an experts table, run through the Snakemake workflow."""

import csv
import json

import pytest
from safetensors import safe_open

from evals.clip_tasks import get_task
from evals.datasets import clip_image_processor
from epmq.testing.paper_models import (
    clip_tokenizer,
    perturbed,
    save_with_prefix,
    tiny_clip_model,
)
from tests.test_paper_evals import _image_dataset
from tests.test_workflow import ROOT, snakemake

TASKS = ["eurosat", "mnist"]


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    import datasets
    from transformers import CLIPVisionModel

    root = tmp_path_factory.mktemp("hub-workflow")
    texts = [t.format(c) for task in TASKS for c in get_task(task).classnames for t in get_task(task).templates]
    tokenizer = clip_tokenizer(texts)
    model = tiny_clip_model(tokenizer)
    clip_dir = root / "hub" / "clip"
    model.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    clip_image_processor(32).save_pretrained(clip_dir)
    rows = [f"tiny-clip\tpretrained\t-\t{clip_dir}\tmain\tlocal test model"]
    data = {}
    for index, task in enumerate(TASKS):
        tower = CLIPVisionModel(model.config.vision_config)
        tower.load_state_dict(perturbed(model.vision_model, seed=10 + index).state_dict())
        expert = save_with_prefix(tower, root / "hub" / f"expert-{task}", "vision_model.")
        rows.append(f"tiny-clip\texpert\t{task}\t{expert}\tmain\tlocal test expert")
        spec = get_task(task)
        data[task] = root / "data" / task
        datasets.DatasetDict({spec.train_split: _image_dataset(task, 24, index),
                              spec.test_split: _image_dataset(task, 20, 100 + index)}).save_to_disk(str(data[task]))
    table = root / "experts.tsv"
    table.write_text("suite\trole\ttask\tsource\trevision\tnote\n" + "\n".join(rows) + "\n")
    suite_yaml = root / "tiny-clip.yaml"
    # every key spelled out, no `base:`: a self-contained suite YAML in the work directory
    suite_yaml.write_text(json.dumps({
        "suite": "tiny-clip", "builder": "hub-clip", "experts_table": str(table), "models_dir": str(root / "models"),
        "tasks": TASKS, "datasets": {task: str(path) for task, path in data.items()},
        "eval": {"batch_size": 16, "limit": None, "device": "cpu"}, "calib": {"image_size": 224},
    }))
    config = root / "config.yaml"
    config.write_text(json.dumps({
        "threads": 1,
        "suites": {"tiny-clip": {"builder": "hub-clip", "suite_config": str(suite_yaml), "bits": 4, "group_size": 32,
                                 "samples": 8, "alpha": {"task_arithmetic": 0.01}}},
        "targets": {"table_1": {"suite": "tiny-clip", "kind": "methods", "caption": "tiny hub CLIP",
                                "merges": ["task_arithmetic"], "methods": ["rtn", "gptq", "awq", "epmq"]}},
    }))
    return root, config


@pytest.mark.slow
def test_hub_suite_runs_through_the_workflow(local_hub):
    root, config = local_hub
    work = root / "work"
    work.mkdir()
    out = snakemake("table_1", "--configfile", str(config), "--directory", str(work), "--cores", "2", cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    suite = work / "results" / "tiny-clip"
    fetch = json.loads((suite / "experts" / "mnist" / "fetch.json").read_text())
    assert fetch["source"].endswith("expert-mnist")
    assert (suite / "pretrained" / "heads.safetensors").exists() and (suite / "pretrained" / "zeroshot").is_dir()
    merged_keys = json.loads((suite / "merged" / "task_arithmetic" / "merge.json").read_text())
    assert merged_keys["method"] == "task_arithmetic"
    rows = list(csv.DictReader((work / "results" / "tables" / "table_1.csv").open()))
    assert {r["method"] for r in rows} == {"pretrained", "finetuned", "fp", "rtn", "gptq", "awq", "epmq"}
    assert {r["task"] for r in rows} == set(TASKS)
    assert all(0 <= float(r["accuracy"]) <= 100 for r in rows)
    with safe_open(str(next((suite / "calib").glob("*/eurosat.safetensors"))), framework="pt") as calib:
        assert calib.get_tensor("sample_indices").shape == (8,) and calib.metadata()["samples"] == "8"
    assert "w/ E-PMQ" in (work / "results" / "tables" / "table_1.md").read_text()
