"""LiT ("locked-image tuning", Zhai et al., 2022) of mini-dino's pretrained tower: the tower stays
locked while a linear projection into the frozen MiniLM text space and CLIP's learnt logit scale
are trained with mini-clip8's multi-positive contrastive loss against captions of the
pretraining images (paper §5.1: the CLIP protocol on a real pretrained tower)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epmq.suites.common import stable_seed
from epmq.suites.mini_clip8.build import contrastive_steps
from epmq.suites.mini_clip8.data import Sources, epoch_batches, pool_name, source_splits
from epmq.suites.mini_dino.tower import to_pixel_values
from evals import clip_zeroshot as zs


@torch.inference_mode()
def pooled_features(model, images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The tower's pooled output of ``images`` (grey, in [0, 1]), in evaluation batches."""
    batch = cfg["eval"]["batch_size"]
    encode = zs.hf_pooled_encoder(model)
    return torch.cat([encode(to_pixel_values(images[i : i + batch], cfg)) for i in range(0, len(images), batch)])


def caption_bank(cfg: dict, encode: zs.TextEncoder) -> tuple[torch.Tensor, list[list[int]]]:
    """Embeddings of every pretraining caption (template x synonym) and, per concept, its rows.

    Concepts are the labels of each source in ``align.captions`` order (source offsets added)."""
    texts: list[str] = []
    concept_rows: list[list[int]] = []
    for captions in cfg["align"]["captions"].values():
        for synonyms in captions["synonyms"]:
            rows = []
            for word in synonyms:
                for template in captions["templates"]:
                    rows.append(len(texts))
                    texts.append(template.format(word))
            concept_rows.append(rows)
    return encode(texts), concept_rows


def pretraining_features(cfg: dict, model, sources: Sources) -> tuple[torch.Tensor, torch.Tensor]:
    """The locked tower's pooled features of every pretraining image and their concept ids."""
    features, concepts, first = [], [], 0
    for source, captions in cfg["align"]["captions"].items():
        split = source_splits(cfg, source, sources)["pretrain"]
        pool = pool_name(source, "pretrain")
        images = torch.from_numpy(sources[f"{pool}_images"][split]).float().div_(255.0)[:, None]
        features.append(pooled_features(model, images, cfg))
        concepts.append(torch.from_numpy(sources[f"{pool}_labels"][split]) + first)
        first += len(captions["synonyms"])
    return torch.cat(features), torch.cat(concepts)


def align(cfg: dict, features: torch.Tensor, concepts: torch.Tensor, bank: torch.Tensor,
          concept_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """LiT on cached features: train the projection and logit scale; ``(projection, logit_scale, losses)``.

    Each step draws ``batch_size`` images and one caption of each image's concept; captions of the
    same concept are positives (mini-clip8's multi-positive CLIP loss). No gradient clipping."""
    spec = cfg["align"]
    torch.manual_seed(stable_seed(cfg["seed"], "align"))
    projection = torch.nn.Linear(features.shape[1], cfg["projection_dim"], bias=False)
    logit_scale = torch.nn.Parameter(torch.tensor(float(spec["logit_scale_init"])))
    params = list(projection.named_parameters()) + [("logit_scale", logit_scale)]
    generator = torch.Generator().manual_seed(stable_seed(cfg["seed"], "align-batches"))

    def embed(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(projection(features[idx]), dim=-1), concepts[idx]

    batches = epoch_batches(len(concepts), spec["batch_size"], spec["steps"], generator)
    losses = contrastive_steps(spec, params, logit_scale, embed, batches, bank, concept_rows, generator,
                               grad_clip=None, label="LiT alignment")
    return projection.weight.detach().clone().contiguous(), logit_scale.detach().clone().reshape(()), losses
