"""``hub-clip``: CLIP ViT-B/32 and ViT-L/14 on 8/14/20 tasks, zero-shot (paper §5.1; Tables 1/2, Appendix D).

``pretrain`` fetches the full pretrained CLIPModel and keeps its vision tower (the model that is
merged and quantized, tensor names in the experts' convention) plus ``zeroshot/`` (text tower,
projections, logit scale) and ``heads.safetensors`` (each task's zero-shot head, built once).
Experts are FusionBench's vision towers, or open_clip checkpoints converted to the tower's layout.
Evaluation: zero-shot top-1 on each task's test split.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from epmq.io import atomic_output_dir
from epmq.suites.base import register_suite
from epmq.suites.hub.base import HubSuite, link_expert, split_dir, write_fetch_record


def _move_converted(staging: Path) -> None:
    """Move the parts of ``staging/converted`` (converted beside the output) into ``staging``."""
    for item in (staging / "converted").iterdir():
        shutil.move(str(item), staging / item.name)
    (staging / "converted").rmdir()


@register_suite("hub-clip")
class HubClipSuite(HubSuite):
    """Zero-shot CLIP: the vision tower is merged, the text side builds each task's head."""

    family_keys = ("calib.image_size",)

    def data_splits(self, task, local):
        from evals.datasets import load_clip_task

        return {"train": load_clip_task(task, "train", local), "test": load_clip_task(task, "test", local)}

    def build_pretrained(self, out, data_dir=None):
        """Fetch the pretrained CLIPModel; keep the vision tower and build the zero-shot heads."""
        from epmq.convert import is_open_clip
        from epmq.hub.layout import split_clip
        from evals.clip_eval import build_heads

        cfg = self.cfg
        entry, experts = self.entries()
        local = Path(entry.source.removeprefix("local:")).expanduser()
        if local.exists() and is_open_clip(local):
            raise ValueError(f"{cfg['experts_table']}: the pretrained row of suite {cfg['suite']} is an open_clip checkpoint "
                             f"({entry.source}); it must be a full HF CLIPModel (its text tower builds the zero-shot heads). "
                             "Experts may be open_clip")
        store = self.fetch(entry, f"{cfg['suite']} pretrained")
        first_expert = experts[next(iter(cfg["tasks"]))]
        like = self.fetch(first_expert, f"{cfg['suite']} expert {first_expert.task}")
        with atomic_output_dir(out) as staging:
            # split into a folder beside the output (same filesystem), then move its parts in
            vision, zeroshot = split_clip(store, staging / "split", like=like)
            for item in vision.iterdir():
                shutil.move(str(item), staging / item.name)
            shutil.move(str(zeroshot), staging / "zeroshot")
            shutil.rmtree(staging / "split")
            split = json.loads((staging / "clip_split.json").read_text())
            write_fetch_record(store, staging, dropped_nonpersistent_buffers=split["dropped_nonpersistent_buffers"])
            build_heads(staging / "zeroshot", list(cfg["tasks"]), staging / "heads.safetensors", device=self.device())

    def build_expert(self, pretrained, task, out, data_dir=None):
        """Fetch task ``task``'s expert and link it with the tower's tensor names (``link_expert``).

        An open_clip expert (recognised by its keys, ``visual.conv1.weight``; a local ``.pt``/``.pth``
        state dict, or safetensors from a folder or the hub) is converted to the pretrained tower's
        layout (``epmq.convert``; ``convert.json`` records it, and what the pretrained tower lacks,
        such as open_clip's ``visual.proj``, is dropped and listed there).
        """
        from epmq.convert import is_open_clip, open_clip_checkpoint_to_hf
        from epmq.hub.store import is_local_source

        _, experts = self.entries()
        entry = experts[task]
        local = Path(entry.source.removeprefix("local:")).expanduser()
        if is_local_source(entry.source) and local.exists() and is_open_clip(local):
            # a state-dict file that fetch (folders of safetensors) does not take: converted beside the output
            with atomic_output_dir(out) as staging:
                open_clip_checkpoint_to_hf(local, staging / "converted", like=pretrained)
                _move_converted(staging)
            return
        store = self.fetch(entry, f"{self.cfg['suite']} expert {task}")
        if is_open_clip(store):
            with atomic_output_dir(out) as staging:
                open_clip_checkpoint_to_hf(store, staging / "converted", like=pretrained)
                _move_converted(staging)
                write_fetch_record(store, staging, dropped_nonpersistent_buffers=[], converted_from="open_clip")
            return
        link_expert(store, pretrained, out)

    def calibration_inputs(self, task, samples, seed, train, pretrained):
        """``pixel_values`` from the pretrained model's image processor (``calib.image_size``: CLIP's
        defaults at that size when no suite folder is given)."""
        from evals.datasets import clip_calibration
        from evals.local_data import load_local

        processor = pretrained / "zeroshot" if pretrained else self.cfg["calib"]["image_size"]
        dataset = load_local(train, "train") if train else None
        return clip_calibration(task, processor, samples=samples, seed=seed, dataset=dataset,
                                local_path=None if dataset is not None else self.cfg["datasets"].get(task))

    def evaluate(self, model_dir, tasks, data_dir, suite_dir):
        """Zero-shot top-1 of the vision tower in ``model_dir`` with the pretrained text side's heads."""
        from evals.clip_eval import available_cpus, evaluate_clip

        cfg, suite_dir = self.cfg, Path(suite_dir)
        data = {t: p for t in tasks if (p := split_dir(data_dir, t, "test") or cfg["datasets"].get(t))}
        with tempfile.TemporaryDirectory() as out:
            return evaluate_clip(model_dir, tasks, out, heads_file=suite_dir / "pretrained" / "heads.safetensors",
                                 processor_dir=suite_dir / "pretrained" / "zeroshot", data=data,
                                 batch_size=cfg["eval"]["batch_size"], limit=cfg["eval"]["limit"], device=self.device(),
                                 workers=cfg.get("threads") or available_cpus())
