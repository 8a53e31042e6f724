"""Training the image suites' towers: mini-clip8's CLIP-style pretraining from scratch, the
contrastive steps it shares with mini-dino's LiT alignment, and the expert fine-tuning both use.

Every loop is ``epmq.suites.training.train_steps`` with AdamW (decay on >= 2-D weights only, CLIP's
recipe) and a cosine schedule with linear warm-up; what differs (how a batch is drawn and scored)
is passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from epmq.suites.common import stable_seed
from epmq.suites.mini_clip8.data import (
    PixelValues,
    Sources,
    TaskSplit,
    augment,
    epoch_batches,
    pool_name,
    seeded_generator,
    source_splits,
    to_pixel_values,
)
from epmq.suites.training import adamw, cosine_with_warmup, decay_groups, train_steps
from evals import clip_zeroshot as zs

log = logging.getLogger(__name__)


def vision_config(cfg: dict):
    """The tower's ``transformers.CLIPVisionConfig``, from the YAML's ``model``."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**cfg["model"])


def cosine_schedule(spec: dict) -> Callable[[int], float]:
    """The learning-rate factor of a training spec: ``warmup_steps`` linear, then cosine to ``min_lr_ratio``."""
    return lambda step: cosine_with_warmup(step, spec["warmup_steps"], spec["steps"], spec["min_lr_ratio"])


# -------------------------------------------------------------------------------- captions --
def caption_attributes(params: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
    """Index of each image's attribute combination (see ``attribute_phrases``) from augmentation params."""
    position = torch.zeros_like(params["dx_px"], dtype=torch.long)  # 0 = centred
    dx, dy, far = params["dx_px"], params["dy_px"], spec["position"]["threshold_px"]
    horizontal = dx.abs() >= dy.abs()
    position = torch.where(horizontal & (dx <= -far), 1, position)
    position = torch.where(horizontal & (dx >= far), 2, position)
    position = torch.where(~horizontal & (dy <= -far), 3, position)
    position = torch.where(~horizontal & (dy >= far), 4, position)
    zoom = torch.bucketize(params["zoom"], torch.tensor(spec["zoom"]["thresholds"]))
    tilt = torch.bucketize(params["tilt_deg"], torch.tensor(spec["tilt"]["thresholds_deg"]))
    n_zoom, n_tilt = len(spec["zoom"]["words"]), len(spec["tilt"]["words"])
    return (position * n_zoom + zoom) * n_tilt + tilt


def attribute_phrases(spec: dict) -> list[str]:
    """The caption suffix of every attribute combination, in ``caption_attributes`` order."""
    p = spec["position"]["words"]
    positions = [p["center"], p["left"], p["right"], p["top"], p["bottom"]]
    phrases = []
    for position in positions:
        for zoom in spec["zoom"]["words"]:
            for tilt in spec["tilt"]["words"]:
                words = [w for w in (zoom, position, tilt) if w]
                phrases.append(", ".join(words))
    return phrases


@dataclass
class PretrainingCaptions:
    """mini-clip8's caption bank and the images it describes.

    A caption names the object (a synonym of its label, in a pretraining template) and describes
    how the augmented image shows it (position, zoom, tilt), as web captions do; the tower must
    encode all of it. Concept = (label, attribute combination): captions of the same concept (other
    synonyms or templates) are positives, every other caption a negative. One template per
    (synonym, combination), drawn once, keeps the bank small enough to embed."""

    texts: list[str]
    concept_rows: list[list[int]]  # per concept id = (first label id + label) * n_combos + combo: its texts
    pools: list[tuple[np.ndarray, np.ndarray, int]]  # per source: images, labels, first label id
    phrases: list[str]  # per attribute combination


def pretraining_captions(cfg: dict, sources: Sources) -> PretrainingCaptions:
    """The caption bank of ``pretrain.captions`` and each source's pretraining images."""
    spec = cfg["pretrain"]
    phrases = attribute_phrases(spec["captions"]["attributes"])
    rng = np.random.default_rng(stable_seed(cfg["seed"], "caption-templates"))
    texts: list[str] = []
    concept_rows: list[list[int]] = []
    pools: list[tuple[np.ndarray, np.ndarray, int]] = []
    n_labels = 0
    for source, captions in spec["captions"]["sources"].items():
        split = source_splits(cfg, source, sources)["pretrain"]
        pool = pool_name(source, "pretrain")
        pools.append((sources[f"{pool}_images"][split], sources[f"{pool}_labels"][split], n_labels))
        for synonyms in captions["synonyms"]:
            for phrase in phrases:
                rows = []
                for word in synonyms:
                    template = captions["templates"][rng.integers(len(captions["templates"]))]
                    rows.append(len(texts))
                    texts.append(template.format(word) + (", " + phrase if phrase else ""))
                concept_rows.append(rows)
            n_labels += 1
    return PretrainingCaptions(texts, concept_rows, pools, phrases)


# ----------------------------------------------------------------------- contrastive steps --
def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, concepts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with several positives: captions of the same concept are not negatives."""
    logits = scale * img @ txt.T
    positive = concepts[:, None] == concepts[None, :]
    i2t = -(torch.logsumexp(logits.masked_fill(~positive, -torch.inf), 1) - torch.logsumexp(logits, 1))
    t2i = -(torch.logsumexp(logits.T.masked_fill(~positive.T, -torch.inf), 1) - torch.logsumexp(logits.T, 1))
    return 0.5 * (i2t.mean() + t2i.mean())


def contrastive_steps(spec: dict, params: list[tuple[str, torch.nn.Parameter]], logit_scale: torch.nn.Parameter,
                      embed: Callable[[object], tuple[torch.Tensor, torch.Tensor]], batches: Iterable,
                      bank: torch.Tensor, concept_rows: list[list[int]], generator: torch.Generator, *,
                      grad_clip: float | None, label: str) -> list[float]:
    """Align image embeddings with a caption bank; the per-step losses.

    Per batch, ``embed`` gives the normalised image embeddings and their concepts; one caption of
    each image's concept is drawn from ``generator``; ``contrastive_loss`` at the learnt scale,
    which is clamped to ``[0, logit_scale_max]`` (log space) after every step, as CLIP does."""
    n_rows = torch.tensor([len(rows) for rows in concept_rows])
    first_row = torch.tensor([rows[0] for rows in concept_rows])

    def loss_of(batch) -> torch.Tensor:
        img, concepts = embed(batch)
        rows = first_row[concepts] + (torch.rand(len(concepts), generator=generator) * n_rows[concepts]).long()
        return contrastive_loss(img, bank[rows], concepts, logit_scale.exp())

    def clamp_scale(step: int, loss: torch.Tensor) -> None:
        with torch.no_grad():
            logit_scale.clamp_(0, spec["logit_scale_max"])
        if step % 100 == 0 or step == spec["steps"] - 1:
            log.info("%s step %d/%d loss %.4f scale %.2f", label, step + 1, spec["steps"], loss, logit_scale.exp())

    optimizer = adamw(decay_groups(params, spec["weight_decay"]), spec)
    return train_steps(loss_of, batches, optimizer, schedule=cosine_schedule(spec), clip_params=[p for _, p in params],
                       grad_clip=grad_clip, after_step=clamp_scale, label=label, total=spec["steps"])


def pretrain_tower(cfg: dict, captions: PretrainingCaptions, bank: torch.Tensor):
    """mini-clip8's tower, projection and logit scale trained from scratch on ``captions`` (embedded
    as ``bank``); ``(model, projection, logit_scale, losses)``.

    Each step draws each source's share of the batch with replacement, augments it, and scores it
    against one caption of each image's concept (``contrastive_steps``)."""
    from transformers import CLIPVisionModel

    spec = cfg["pretrain"]
    torch.manual_seed(cfg["seed"])
    model = CLIPVisionModel(vision_config(cfg))
    projection = torch.nn.Linear(cfg["model"]["hidden_size"], cfg["projection_dim"], bias=False)
    logit_scale = torch.nn.Parameter(torch.tensor(float(spec["logit_scale_init"])))
    params = list(model.named_parameters()) + list(projection.named_parameters()) + [("logit_scale", logit_scale)]
    generator = seeded_generator(cfg, "pretrain")
    sources = spec["captions"]["sources"]
    shares = [int(round(spec["batch_size"] * sources[s]["batch_fraction"])) for s in sources]
    shares[0] = spec["batch_size"] - sum(shares[1:])
    attributes, n_combos = spec["captions"]["attributes"], len(captions.phrases)

    def embed(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for (pool_images, pool_labels, first), share in zip(captions.pools, shares):
            idx = torch.randint(len(pool_labels), (share,), generator=generator).numpy()
            images.append(torch.from_numpy(pool_images[idx]).float().div_(255.0)[:, None])
            labels.append(torch.from_numpy(pool_labels[idx]) + first)
        images, labels = torch.cat(images), torch.cat(labels)
        images, done = augment(images, spec["augment"], generator, return_params=True)
        concepts = labels * n_combos + caption_attributes(done, attributes)
        pixel_values = to_pixel_values(images, cfg)
        return F.normalize(projection(model(pixel_values=pixel_values).pooler_output), dim=-1), concepts

    model.train()
    losses = contrastive_steps(spec, params, logit_scale, embed, range(spec["steps"]), bank, captions.concept_rows,
                               generator, grad_clip=spec["grad_clip"], label="pretraining")
    return model, projection, logit_scale, losses


# ------------------------------------------------------------------------------- experts --
def finetune_tower(cfg: dict, model: torch.nn.Module, params: list[tuple[str, torch.nn.Parameter]], split: TaskSplit,
                   head: dict[str, torch.Tensor], task: str, pixel_values: PixelValues = to_pixel_values) -> list[float]:
    """Fine-tune ``params`` of the tower on one task's split; the per-step losses.

    The loss is cross-entropy of the task's frozen zero-shot head on the tower's projected,
    normalised features at the pretrained logit scale (the projection frozen too): the paper's CLIP
    experts. Batches are epoch-wise shuffled, augmented with ``finetune.augment``."""
    spec = cfg["finetune"]
    projection, classifier = head["visual_projection.weight"], head[f"heads.{task}"]
    scale = head["logit_scale"].exp()
    generator = seeded_generator(cfg, "finetune", task)
    pooled = zs.hf_pooled_encoder(model)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        pixels = pixel_values(augment(split.images[idx], spec["augment"], generator), cfg)
        features = zs.image_features(pooled(pixels), projection)
        return F.cross_entropy(scale * features @ classifier.T, split.labels[idx])

    model.train()
    optimizer = adamw(decay_groups(params, spec["weight_decay"]), spec)
    batches = epoch_batches(len(split), spec["batch_size"], spec["steps"], generator)
    return train_steps(loss_of, batches, optimizer, schedule=cosine_schedule(spec), clip_params=[p for _, p in params],
                       grad_clip=spec["grad_clip"], label=f"fine-tuning {task}", total=spec["steps"])
