"""WUDI as FusionBench runs it (tanganke/fusion_bench ``method/wudi/wudi.py`` with ``config/method/wudi/wudi.yaml``).

The reference procedure, transcribed from its published code: for every key of the state dict,
stack the task vectors, start from their sum; if the tensor is 2-D (``exclude_keys`` is empty),
run ``iter_num = 400`` Adam steps (lr 1e-5, no weight decay) on
``sum_i ||(tau_m - tau_i) tau_i^T||^2 / ||tau_i||^2`` by autograd; otherwise divide the sum by K.
"""

import pytest
import torch

from epmq.merge import MERGERS
from epmq.merge import operators as ops

SHAPES = {
    "vision_model.embeddings.position_embedding.weight": (5, 6),  # 2-D outside the blocks
    "vision_model.embeddings.class_embedding": (6,),
    "vision_model.encoder.layers.0.self_attn.q_proj.weight": (6, 6),
    "vision_model.encoder.layers.0.self_attn.q_proj.bias": (6,),
    "vision_model.encoder.layers.0.mlp.fc1.weight": (8, 6),
    "vision_model.post_layernorm.weight": (6,),
    "visual_projection.weight": (4, 6),
}


def fusionbench_wudi(pretrained, experts, iter_num=400, lr=1e-5, exclude_keys=()):
    merged = {}
    for key, base in pretrained.items():
        vectors = torch.stack([expert[key] - base for expert in experts])
        tau = torch.nn.Parameter(vectors.sum(dim=0))
        if base.dim() == 2 and key not in exclude_keys:
            optimizer = torch.optim.Adam([tau], lr=lr, weight_decay=0)
            norms = vectors.reshape(len(vectors), -1).norm(dim=-1).square()
            for _ in range(iter_num):
                product = (tau.unsqueeze(0) - vectors) @ vectors.transpose(1, 2)
                loss = (product.square() / norms[:, None, None]).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            merged[key] = base + tau.detach()
        else:
            merged[key] = base + tau.detach() / len(experts)
    return merged


@pytest.fixture(scope="module")
def models():
    generator = torch.Generator().manual_seed(14)
    pretrained = {key: torch.randn(shape, generator=generator, dtype=torch.float64) for key, shape in SHAPES.items()}
    # task vectors of size ~1e-3, where lr 1e-5 moves the merge visibly within 400 steps
    experts = [{key: value + 1e-3 * torch.randn(value.shape, generator=generator, dtype=torch.float64)
                for key, value in pretrained.items()} for _ in range(3)]
    return pretrained, experts


def test_default_wudi_is_fusionbench(models):
    pretrained, experts = models
    ours = MERGERS["wudi"](pretrained, experts)
    reference = fusionbench_wudi(pretrained, experts)
    for key in SHAPES:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-10, atol=1e-12, msg=key)
    # the position embedding and the projection are optimised, not averaged
    for key in ("vision_model.embeddings.position_embedding.weight", "visual_projection.weight"):
        mean = pretrained[key] + ops.mean_task_vector(pretrained[key], [expert[key] for expert in experts])
        assert not torch.allclose(ours[key], mean, rtol=0, atol=1e-9)


def test_the_authors_variant_is_a_named_option(models):
    pretrained, experts = models
    ours = MERGERS["wudi"](pretrained, experts, tensors="block_weights", steps=300)
    block_keys = [key for key, shape in SHAPES.items() if ops.is_block_weight(key, shape)]
    assert block_keys == ["vision_model.encoder.layers.0.self_attn.q_proj.weight",
                          "vision_model.encoder.layers.0.mlp.fc1.weight"]
    # the authors' script = FusionBench's procedure, 300 steps, every other tensor excluded
    excluded = [key for key in SHAPES if key not in block_keys]
    reference = fusionbench_wudi(pretrained, experts, iter_num=300, exclude_keys=excluded)
    for key in SHAPES:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-10, atol=1e-12, msg=key)
