"""CLIP zero-shot evaluation of a merged or quantized vision tower on the paper's tasks (paper §5.1-5.3).

Only the vision tower is merged and quantized; the text tower, both projections and the logit
scale stay pretrained. They come from the ``zeroshot/`` folder written by
``epmq.hub.layout.split_clip`` (or any full ``CLIPModel`` folder):

- heads (:func:`build_heads`): for each task, every class name in every prompt template of
  ``evals.clip_tasks`` through the pretrained text tower and text projection, each embedding
  L2-normalised, averaged over templates, renormalised (``evals.clip_zeroshot.build_zeroshot_head``;
  texts tokenized with padding, as FusionBench's ``HFCLIPClassifier``). Written once to a
  ``heads.safetensors`` (``visual_projection.weight``, ``logit_scale``, ``heads.<task>``), the
  format the mini suite's evaluator reads too.
- images: the task's test split through the CLIP image processor (a batch at a time, in
  ``workers`` DataLoader processes, pinned when the tower is on CUDA, so decoding and resizing
  overlap the forward passes), the vision tower (loaded with
  ``epmq.checkpoint.load_model``, so plain, merged and quantized checkpoints all work), the pooled
  output through the pretrained visual projection, L2-normalised; top-1 accuracy of
  ``exp(logit_scale) * image @ heads.T`` with its binomial standard error.

Result per task (``<out_dir>/<task>.json``): {task, metric: "top1", accuracy (%), stderr (%), n,
model, heads, split, dataset, provenance}.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from epmq.progress import progress

log = logging.getLogger(__name__)


def load_text_tower(zeroshot_dir: str | Path):
    """(CLIPTextModelWithProjection, tokenizer) of a CLIPModel folder (vision weights not needed)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPTextModelWithProjection

    from epmq.io import LazyCheckpoint

    zeroshot_dir = Path(zeroshot_dir)
    config = CLIPConfig.from_pretrained(zeroshot_dir)
    text_config = config.text_config
    text_config.projection_dim = config.projection_dim  # CLIPTextConfig's own default would be 512
    model = CLIPTextModelWithProjection(text_config)
    checkpoint = LazyCheckpoint(zeroshot_dir)
    state = {key: checkpoint.get(key) for key in checkpoint.keys()
             if key.startswith("text_model.") or key == "text_projection.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [key for key in unexpected if not key.endswith("position_ids")]  # a buffer transformers 4 saved
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{zeroshot_dir}: text tower does not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    tokenizer = AutoTokenizer.from_pretrained(str(zeroshot_dir))
    return model.eval(), tokenizer


def text_encoder(model, tokenizer, batch_size: int = 256):
    """texts -> projected text embeddings [N, projection_dim] (not normalised)."""
    max_length = model.config.max_position_embeddings
    device = next(model.parameters()).device

    @torch.inference_mode()
    def encode(texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            inputs = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt")
            inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            out.append(model(**inputs).text_embeds.float().cpu())
        return torch.cat(out)

    return encode


def build_heads(zeroshot_dir: str | Path, tasks: Sequence[str], out_file: str | Path | None = None,
                device: str = "cpu") -> dict[str, torch.Tensor]:
    """Zero-shot heads of ``tasks`` plus the visual projection and logit scale; saved to ``out_file``."""
    from safetensors.torch import save_file

    from epmq.io import LazyCheckpoint
    from evals.clip_tasks import get_task
    from evals.clip_zeroshot import build_zeroshot_head

    model, tokenizer = load_text_tower(zeroshot_dir)
    encode = text_encoder(model.to(device), tokenizer)
    checkpoint = LazyCheckpoint(zeroshot_dir)
    heads = {
        "visual_projection.weight": checkpoint.get("visual_projection.weight").float(),
        "logit_scale": checkpoint.get("logit_scale").float().reshape(()),
    }
    for task in tasks:
        spec = get_task(task)
        heads[f"heads.{task}"] = build_zeroshot_head(encode, spec.classnames, spec.templates).contiguous()
    if out_file is not None:
        out_file = Path(out_file)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
        save_file(heads, str(tmp), metadata={"format": "pt", "zeroshot_dir": str(zeroshot_dir), "tasks": ",".join(tasks)})
        tmp.replace(out_file)
    return heads


def load_vision_encoder(model_dir: str | Path, device: str = "cpu"):
    """pixel_values -> pooled output of a CLIP vision checkpoint (plain, merged or quantized)."""
    from epmq.checkpoint import load_model

    model = load_model(model_dir).to(device).eval()
    vision = getattr(model, "vision_model", model)

    @torch.inference_mode()
    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        return vision(pixel_values=pixel_values.to(device, non_blocking=True)).pooler_output.float().cpu()

    return encode


def available_cpus() -> int:
    """CPUs this process may run on (the job's allocation under SLURM, not the node's count)."""
    return len(os.sched_getaffinity(0))


class ImageBatches(torch.utils.data.Dataset):
    """Batch ``index`` of the first ``n`` rows of ``dataset``, preprocessed: (pixel_values, labels).

    One item is a whole batch, so each worker runs the image processor on a batch at once.
    """

    def __init__(self, dataset, processor, n: int, batch_size: int):
        self.dataset, self.processor, self.n, self.batch_size = dataset, processor, n, batch_size

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from evals.datasets import pixel_values

        rows = self.dataset[index * self.batch_size : min((index + 1) * self.batch_size, self.n)]
        return pixel_values(self.processor, rows["image"]), torch.tensor([int(label) for label in rows["label"]])


def image_batches(dataset, processor, *, batch_size: int = 128, limit: int | None = None, workers: int = 0,
                  pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Preprocessed batches of a task's images, in order, prepared by ``workers`` processes (0: this one)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.utils.data.DataLoader(ImageBatches(dataset, processor, n, batch_size), batch_size=None,
                                       num_workers=workers, pin_memory=pin_memory)


@torch.inference_mode()
def evaluate_task(encode, heads: Mapping[str, torch.Tensor], task: str, dataset, processor, *,
                  batch_size: int = 128, limit: int | None = None, workers: int = 0, pin_memory: bool = False) -> dict:
    """Top-1 accuracy of one task: ``dataset`` has ``image`` (PIL) and ``label`` columns."""
    from evals import clip_zeroshot as zs

    predictions, labels = [], []
    batches = image_batches(dataset, processor, batch_size=batch_size, limit=limit, workers=workers, pin_memory=pin_memory)
    for pixels, batch_labels in progress(batches, f"evaluating {task}", unit="batch"):
        features = zs.image_features(encode(pixels), heads["visual_projection.weight"])
        logits = zs.zeroshot_logits(features, heads[f"heads.{task}"], heads["logit_scale"])
        predictions.append(logits.argmax(dim=-1))
        labels.append(batch_labels)
    accuracy, stderr, count = zs.accuracy(torch.cat(predictions), torch.cat(labels))
    return {"metric": "top1", "accuracy": accuracy, "stderr": stderr, "n": count}


def evaluate_clip(
    model_dir: str | Path,
    tasks: Sequence[str],
    out_dir: str | Path,
    *,
    heads_file: str | Path | None = None,
    zeroshot_dir: str | Path | None = None,
    processor_dir: str | Path | None = None,
    data: Mapping[str, str | Path] | None = None,
    datasets: Mapping[str, object] | None = None,
    batch_size: int = 128,
    limit: int | None = None,
    device: str = "cpu",
    workers: int = 0,
) -> dict[str, dict]:
    """Evaluate a vision tower on ``tasks``; write ``<out_dir>/<task>.json``; return the results.

    ``workers`` processes preprocess the images (0: the main process does it between batches).

    Heads come from ``heads_file`` (built with :func:`build_heads` if it does not exist yet and
    ``zeroshot_dir`` is given) or straight from ``zeroshot_dir``. The image processor is read
    from ``processor_dir`` (default: ``zeroshot_dir``, then ``model_dir``). ``data`` maps tasks to
    local dataset folders, ``datasets`` to in-memory datasets; otherwise the hub is used.
    """
    from safetensors.torch import load_file

    from epmq.io import atomic_write_json, provenance
    from evals.clip_tasks import get_task
    from evals.datasets import clip_image_processor, load_clip_task

    started = time.time()
    if heads_file is not None and Path(heads_file).exists():
        heads = load_file(str(heads_file))
        absent = [task for task in tasks if f"heads.{task}" not in heads]
        if absent:
            raise ValueError(f"{heads_file} has no heads for {absent}")
    elif zeroshot_dir is not None:
        heads = build_heads(zeroshot_dir, tasks, heads_file, device=device)
    else:
        raise ValueError("need heads_file (existing) or zeroshot_dir to build the zero-shot heads")
    processor_source = processor_dir or zeroshot_dir or model_dir
    processor = clip_image_processor(processor_source)
    encode = load_vision_encoder(model_dir, device)
    results = {}
    for task in tasks:
        spec = get_task(task)
        dataset = (datasets or {}).get(task)
        if dataset is None:
            dataset = load_clip_task(task, "test", (data or {}).get(task))
        result = evaluate_task(encode, heads, task, dataset, processor, batch_size=batch_size, limit=limit,
                               workers=workers, pin_memory=torch.device(device).type == "cuda")
        results[task] = {"task": task, **result, "model": str(model_dir), "heads": str(heads_file or zeroshot_dir),
                         "split": spec.test_split, "dataset": str((data or {}).get(task) or spec.dataset)}
        log.info("%s: %.2f%% +- %.2f (n=%d)", task, result["accuracy"], result["stderr"], result["n"])
    record = provenance(eval_seconds=round(time.time() - started, 2), processor=str(processor_source))
    for task, result in results.items():
        atomic_write_json(Path(out_dir) / f"{task}.json", {**result, "provenance": record})
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="vision tower checkpoint (CLIPVisionModel, merged or quantized); omit to only build --heads")
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--out-dir", default=None, help="one <task>.json per task (required with --model)")
    parser.add_argument("--heads", default=None, help="heads.safetensors (built from --zeroshot if absent)")
    parser.add_argument("--zeroshot", default=None, help="zeroshot/ folder of epmq.hub.layout.split_clip (or a CLIPModel folder)")
    parser.add_argument("--processor", default=None, help="folder with preprocessor_config.json (default: --zeroshot)")
    parser.add_argument("--data", nargs="*", default=[], metavar="TASK=PATH", help="local dataset folders")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="first N test images only (smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=None,
                        help="image preprocessing processes (default: the CPUs this job may use)")


def run(args: argparse.Namespace) -> int:
    from evals.glue import parse_data

    if args.model is None:  # heads only: one job builds them, the evaluations read them
        if not (args.zeroshot and args.heads):
            raise ValueError("without --model, pass --zeroshot and --heads to build the heads file")
        build_heads(args.zeroshot, args.tasks, args.heads, device=args.device)
        return 0
    if args.out_dir is None:
        raise ValueError("--out-dir is required with --model")
    evaluate_clip(args.model, args.tasks, args.out_dir, heads_file=args.heads, zeroshot_dir=args.zeroshot,
                  processor_dir=args.processor, data=parse_data(args.data), batch_size=args.batch_size,
                  limit=args.limit, device=args.device,
                  workers=available_cpus() if args.workers is None else args.workers)
    return 0


if __name__ == "__main__":
    import sys

    from epmq.cli import run_module

    raise SystemExit(run_module(sys.modules[__name__]))
