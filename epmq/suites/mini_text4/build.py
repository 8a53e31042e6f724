"""mini-text4's two training runs of an expert (LP-FT): a linear probe on the frozen pretrained
encoder, then the whole encoder fine-tuned against that head. Both are ``train_steps``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epmq.suites.common import stable_seed
from epmq.suites.mini_text4.model import pooled_features
from epmq.suites.training import adamw, decay_groups, linear_with_warmup, train_steps


def fit_linear_probe(cfg: dict, features: torch.Tensor, labels: torch.Tensor, n_classes: int, task: str) -> dict[str, torch.Tensor]:
    """L2-regularised logistic-regression head on fixed features (full-batch Adam, seeded init).

    The L2 penalty keeps the probe from separating the few hundred training e-mails perfectly:
    a probe with zero training loss would leave the frozen-head fine-tuning no gradient."""
    spec = cfg["finetune"]["probe"]
    generator = torch.Generator().manual_seed(stable_seed(cfg["seed"], "probe", task))
    weight = (torch.randn(n_classes, features.shape[1], generator=generator) * spec["init_std"]).requires_grad_()
    bias = torch.zeros(n_classes, requires_grad=True)

    def loss_of(_step) -> torch.Tensor:  # full batch: every step reads every feature
        return F.cross_entropy(features @ weight.T + bias, labels) + spec["l2"] * weight.square().sum()

    train_steps(loss_of, range(spec["steps"]), torch.optim.Adam([weight, bias], lr=spec["lr"]),
                label=f"linear probe {task}")
    return {"weight": weight.detach().clone().contiguous(), "bias": bias.detach().clone().contiguous()}


def decays(name: str, p: torch.Tensor) -> bool:
    """AdamW decays the encoder's matrices, not its biases and LayerNorms (BERT's recipe)."""
    return p.ndim >= 2 and "LayerNorm" not in name


def finetune_encoder(cfg: dict, model, tokens: dict[str, torch.Tensor], labels: torch.Tensor,
                     head: dict[str, torch.Tensor], task: str) -> tuple[dict[str, torch.Tensor], list[float], int]:
    """``finetune.epochs`` passes of AdamW over the split in seeded batches (linear warm-up then
    linear decay, gradient clipping), the head frozen unless ``finetune.train_head``; the model
    is trained in place. Returns (head after training, per-step losses, steps)."""
    spec = cfg["finetune"]
    weight = torch.nn.Parameter(head["weight"].clone(), requires_grad=spec["train_head"])
    bias = torch.nn.Parameter(head["bias"].clone(), requires_grad=spec["train_head"])
    head_params = [("head.weight", weight), ("head.bias", bias)] if spec["train_head"] else []
    optimizer = adamw(decay_groups(list(model.named_parameters()) + head_params, spec["weight_decay"], decays), spec)
    generator = torch.Generator().manual_seed(stable_seed(cfg["seed"], "batches", task))
    batches = [b for _ in range(spec["epochs"]) for b in torch.randperm(len(labels), generator=generator).split(spec["batch_size"])]
    warmup = int(round(spec["warmup_fraction"] * len(batches)))
    params = [p for p in model.parameters() if p.requires_grad] + [p for _, p in head_params]

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        width = int(tokens["attention_mask"][idx].sum(1).max())
        batch = {k: v[idx, :width] for k, v in tokens.items()}
        logits = pooled_features(model, batch, cfg["model"]["normalize"]) @ weight.T + bias
        return F.cross_entropy(logits, labels[idx])

    model.train()
    losses = train_steps(loss_of, batches, optimizer, schedule=lambda s: linear_with_warmup(s, len(batches), warmup),
                         clip_params=params, grad_clip=spec["grad_clip"], label=f"fine-tuning {task}")
    model.eval()
    return {"weight": weight.detach().clone().contiguous(), "bias": bias.detach().clone().contiguous()}, losses, len(batches)
