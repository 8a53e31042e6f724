"""Merge operators in memory: closed forms on hand-made state dicts, TIES's steps, WUDI, radix select."""

from __future__ import annotations

import pytest
import torch

from epmq.config import method_params
from epmq.merge import MERGERS, MergeError, merge_state_dicts
from epmq.merge import operators as ops
from epmq.merge.radix_select import kth_smallest_streamed


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_registry_has_the_config_names():
    assert set(MERGERS) == {"simple_average", "task_arithmetic", "ties", "wudi"}
    assert set(MERGERS) == set(method_params("merge"))


# --- simple averaging and task arithmetic ---------------------------------------------------------


def test_simple_average_is_the_mean_of_the_experts():
    pretrained = {"w": t(1.0, 2.0), "b": t(0.0)}
    experts = [{"w": t(2.0, 2.0), "b": t(1.0)}, {"w": t(1.0, 4.0), "b": t(3.0)}]
    merged = MERGERS["simple_average"](pretrained, experts)
    assert torch.equal(merged["w"], t(1.5, 3.0))
    assert torch.equal(merged["b"], t(2.0))


def test_task_arithmetic_default_scaling_is_0_3():
    pretrained = {"w": t(1.0, 2.0)}
    experts = [{"w": t(2.0, 2.0)}, {"w": t(1.0, 4.0)}]  # tau sum = (1, 2)
    torch.testing.assert_close(MERGERS["task_arithmetic"](pretrained, experts)["w"], t(1.3, 2.6))
    torch.testing.assert_close(MERGERS["task_arithmetic"](pretrained, experts, scaling=2.0)["w"], t(3.0, 6.0))


def test_integer_buffers_are_copied_from_the_pretrained_model():
    pretrained = {"w": t(1.0), "position_ids": torch.arange(3)}
    experts = [{"w": t(2.0), "position_ids": torch.arange(3)}]
    for name in MERGERS:
        merged = MERGERS[name](pretrained, experts)
        assert torch.equal(merged["position_ids"], torch.arange(3)) and merged["position_ids"].dtype == torch.int64


def test_dtype_is_preserved_and_arithmetic_runs_in_float32():
    pretrained = {"w": torch.full((4,), 1.0, dtype=torch.bfloat16)}
    experts = [{"w": torch.full((4,), 1.0 + 2**-7, dtype=torch.bfloat16)}] * 2
    merged = MERGERS["simple_average"](pretrained, experts)["w"]
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, experts[0]["w"])


# --- one expert -----------------------------------------------------------------------------------


@pytest.fixture
def one_expert():
    generator = torch.Generator().manual_seed(0)
    pretrained = {"a": torch.randn(6, 5, generator=generator), "b": torch.randn(7, generator=generator)}
    expert = {key: value + 0.1 * torch.randn(value.shape, generator=generator) for key, value in pretrained.items()}
    return pretrained, expert


def test_one_expert_simple_average_is_the_expert(one_expert):
    pretrained, expert = one_expert
    merged = MERGERS["simple_average"](pretrained, [expert])
    assert all(torch.equal(merged[key], expert[key]) for key in expert)


def test_one_expert_task_arithmetic_with_scaling_1_is_the_expert(one_expert):
    pretrained, expert = one_expert
    merged = MERGERS["task_arithmetic"](pretrained, [expert], scaling=1.0)
    # float32: W_0 + (W_1 - W_0) is W_1 up to one rounding of the difference
    for key in expert:
        torch.testing.assert_close(merged[key], expert[key], rtol=0, atol=1e-6)
    # bf16 inputs computed in float32: the round trip is exact
    low = {key: value.bfloat16() for key, value in pretrained.items()}
    low_expert = {key: value.bfloat16() for key, value in expert.items()}
    merged = MERGERS["task_arithmetic"](low, [low_expert], scaling=1.0)
    assert all(torch.equal(merged[key], low_expert[key]) for key in expert)


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_one_expert_ties_keeping_everything_is_w0_plus_scaled_task_vector(one_expert, merge_func):
    pretrained, expert = one_expert
    merged = MERGERS["ties"](pretrained, [expert], top_k=1.0, scaling=0.7, merge_func=merge_func)
    for key in expert:
        expected = pretrained[key] + 0.7 * (expert[key] - pretrained[key])
        assert torch.equal(merged[key], expected)


# --- TIES -----------------------------------------------------------------------------------------


def test_ties_trim_keeps_entries_at_or_above_each_tasks_threshold():
    vectors = torch.stack([t(3.0, -1.0, 0.5), t(-2.0, 1.0, 1.0)])
    trimmed = ops.ties_trim(vectors, t(1.0, 1.5))
    assert torch.equal(trimmed, torch.stack([t(3.0, -1.0, 0.0), t(-2.0, 0.0, 0.0)]))


def test_ties_elect_and_disjoint_merge():
    trimmed = torch.stack([t(3.0, -1.0, 2.0, 0.0), t(-2.0, -1.0, 2.0, 0.0), t(1.0, 0.0, -1.0, 0.0)])
    elected = ops.ties_elected_sign(trimmed)
    assert torch.equal(elected, t(1.0, -1.0, 1.0, 0.0))
    assert torch.equal(ops.ties_disjoint_merge(trimmed, elected, "sum"), t(4.0, -2.0, 4.0, 0.0))
    assert torch.equal(ops.ties_disjoint_merge(trimmed, elected, "mean"), t(2.0, -1.0, 2.0, 0.0))


def test_ties_threshold_is_global_over_all_tensors_with_ties_kept():
    # pretrained 0, so tau = W. 6 entries per task, top_k 0.5: threshold = 3rd smallest |tau|.
    pretrained = {"a": torch.zeros(4), "b": torch.zeros(2)}
    experts = [
        {"a": t(3.0, -1.0, 0.5, 2.0), "b": t(-4.0, 0.1)},  # sorted |tau|: .1 .5 1 2 3 4 -> threshold 1
        {"a": t(-2.0, 2.0, 0.2, 1.0), "b": t(1.0, -0.3)},  # sorted |tau|: .2 .3 1 1 2 2 -> threshold 1, both 1s kept
    ]
    # trimmed: a = (3,-1,0,2) and (-2,2,0,1); b = (-4,0) and (1,0)
    # elected: a = (+,+,0,+), b = (-,0); sum of elected signs = 2 -> zeros become +
    merged = MERGERS["ties"](pretrained, experts, top_k=0.5, scaling=1.0)
    assert torch.equal(merged["a"], t(3.0, 2.0, 0.0, 3.0))
    assert torch.equal(merged["b"], t(-4.0, 0.0))
    merged = MERGERS["ties"](pretrained, experts, top_k=0.5, scaling=1.0, merge_func="mean")
    assert torch.equal(merged["a"], t(3.0, 2.0, 0.0, 1.5))
    # per-tensor trimming would keep only (3, 2) of expert 0's a and give a[3] = 2: the threshold is global
    merged = MERGERS["ties"](pretrained, experts, top_k=0.5)  # default scaling 0.3
    torch.testing.assert_close(merged["a"], 0.3 * t(3.0, 2.0, 0.0, 3.0))


def test_ties_zero_elected_signs_take_the_sign_of_the_sum_of_elected_signs():
    pretrained = {"w": torch.zeros(3)}
    # entry 0 cancels exactly (elected sign 0); the other entries elect +, so the majority is +
    positive = [{"w": t(2.0, 1.0, 1.0)}, {"w": t(-2.0, 1.0, 1.0)}]
    assert torch.equal(MERGERS["ties"](pretrained, positive, top_k=1.0, scaling=1.0)["w"], t(2.0, 2.0, 2.0))
    negative = [{"w": t(2.0, -1.0, -1.0)}, {"w": t(-2.0, -1.0, -1.0)}]
    assert torch.equal(MERGERS["ties"](pretrained, negative, top_k=1.0, scaling=1.0)["w"], t(-2.0, -2.0, -2.0))
    # the elected signs sum to exactly 0: the zero sign stays 0 and keeps nothing
    balanced = [{"w": t(2.0, 1.0, -1.0)}, {"w": t(-2.0, 1.0, -1.0)}]
    assert torch.equal(MERGERS["ties"](pretrained, balanced, top_k=1.0, scaling=1.0)["w"], t(0.0, 2.0, -2.0))


def test_ties_defaults_come_from_the_schema():
    generator = torch.Generator().manual_seed(1)
    pretrained = {"w": torch.randn(50, generator=generator)}
    experts = [{"w": torch.randn(50, generator=generator)} for _ in range(3)]
    explicit = MERGERS["ties"](pretrained, experts, top_k=0.2, scaling=0.3, merge_func="sum")
    assert torch.equal(MERGERS["ties"](pretrained, experts)["w"], explicit["w"])


# --- WUDI -----------------------------------------------------------------------------------------


def reference_wudi(vectors: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The WUDI authors' formulation: autograd on the summed, norm-weighted interference loss."""
    merged = torch.nn.Parameter(vectors.sum(dim=0))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    norms = vectors.reshape(len(vectors), -1).norm(dim=1).square()
    for _ in range(steps):
        loss = (((merged.unsqueeze(0) - vectors) @ vectors.transpose(1, 2)).square() / norms.view(-1, 1, 1)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


@pytest.mark.parametrize("shape", [(12, 5), (5, 12)])  # Gram form (d_in < d_out) and direct form
def test_wudi_matches_the_authors_autograd_formulation(shape):
    generator = torch.Generator().manual_seed(2)
    vectors = torch.randn(3, *shape, generator=generator, dtype=torch.float64) * 0.1
    merged, losses = ops.wudi_task_vector(vectors, steps=20, lr=1e-3)
    torch.testing.assert_close(merged, reference_wudi(vectors, 20, 1e-3), rtol=1e-9, atol=1e-12)
    assert losses[0] == pytest.approx(float(ops.wudi_loss(vectors.sum(0), vectors)), rel=1e-9)


def test_wudi_lowers_its_loss_and_is_deterministic():
    generator = torch.Generator().manual_seed(3)
    vectors = torch.randn(4, 16, 8, generator=generator) * 0.05
    merged, losses = ops.wudi_task_vector(vectors, steps=200, lr=1e-3)
    assert losses[-1] < 0.5 * losses[0]
    increases = sum(later > earlier * (1 + 1e-6) for earlier, later in zip(losses, losses[1:]))
    assert increases <= 0.05 * len(losses)  # Adam may overshoot a little
    assert float(ops.wudi_loss(merged, vectors)) < losses[-1] * 1.01
    again, losses_again = ops.wudi_task_vector(vectors, steps=200, lr=1e-3)
    assert torch.equal(merged, again) and losses == losses_again


def test_wudi_merger_optimises_block_weights_only_and_averages_the_rest():
    generator = torch.Generator().manual_seed(4)
    shapes = {
        "encoder.layers.0.self_attn.q_proj.weight": (8, 6),  # block weight: optimised
        "encoder.layers.0.self_attn.q_proj.bias": (8,),  # 1-D: mean task vector
        "embeddings.position_embedding.weight": (5, 6),  # 2-D outside the blocks: mean task vector
        "encoder.layers.0.layer_norm1.weight": (6,),
    }
    pretrained = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    experts = [{key: value + 0.1 * torch.randn(value.shape, generator=generator) for key, value in pretrained.items()}
               for _ in range(3)]
    merged = MERGERS["wudi"](pretrained, experts, tensors="block_weights", steps=30, lr=1e-3)
    for key in shapes:
        mean = pretrained[key] + ops.mean_task_vector(pretrained[key], [expert[key] for expert in experts])
        block = ops.is_block_weight(key, shapes[key])
        assert block == (key == "encoder.layers.0.self_attn.q_proj.weight")
        assert torch.equal(merged[key], mean) != block
    key = "encoder.layers.0.self_attn.q_proj.weight"
    vectors = ops.task_vectors(pretrained[key], [expert[key] for expert in experts])
    expected, _ = ops.wudi_task_vector(vectors, steps=30, lr=1e-3)
    assert torch.equal(merged[key], pretrained[key] + expected)
    # deterministic, with the schema's defaults (400 steps at lr 1e-5, no scaling)
    again = MERGERS["wudi"](pretrained, experts, tensors="block_weights", steps=30, lr=1e-3)
    assert all(torch.equal(merged[name], again[name]) for name in shapes)
    default = MERGERS["wudi"](pretrained, experts)
    expected, losses = ops.wudi_task_vector(vectors, steps=400, lr=1e-5)
    assert len(losses) == 400 and torch.equal(default[key], pretrained[key] + expected)


def test_wudi_ignores_an_expert_identical_to_the_pretrained_model():
    pretrained = {"layers.0.fc.weight": torch.ones(4, 3)}
    experts = [{"layers.0.fc.weight": torch.ones(4, 3)}, {"layers.0.fc.weight": torch.full((4, 3), 1.5)}]
    merged = MERGERS["wudi"](pretrained, experts, steps=10, lr=1e-3)["layers.0.fc.weight"]
    assert bool(torch.isfinite(merged).all())


@pytest.mark.parametrize(
    ("key", "shape", "block"),
    [
        # CLIPVisionModel
        ("vision_model.encoder.layers.11.self_attn.k_proj.weight", (768, 768), True),
        ("vision_model.encoder.layers.0.mlp.fc1.weight", (3072, 768), True),
        ("vision_model.encoder.layers.0.mlp.fc1.bias", (3072,), False),
        ("vision_model.embeddings.position_embedding.weight", (50, 768), False),
        ("vision_model.embeddings.patch_embedding.weight", (768, 3, 32, 32), False),
        ("vision_model.post_layernorm.weight", (768,), False),
        # T5
        ("encoder.block.0.layer.0.SelfAttention.q.weight", (768, 768), True),
        ("decoder.block.3.layer.2.DenseReluDense.wi_1.weight", (2048, 768), True),
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 12), False),
        ("shared.weight", (32128, 768), False),
        ("lm_head.weight", (32128, 768), False),
        # Llama
        ("model.layers.5.mlp.gate_proj.weight", (256, 64), True),
        ("model.layers.5.input_layernorm.weight", (64,), False),
        ("model.embed_tokens.weight", (1000, 64), False),
        # BERT
        ("encoder.layer.2.attention.self.query.weight", (384, 384), True),
        ("embeddings.word_embeddings.weight", (30522, 384), False),
        ("pooler.dense.weight", (384, 384), False),
    ],
)
def test_wudi_block_rule(key, shape, block):
    assert ops.is_block_weight(key, shape) == block


# --- errors in memory -----------------------------------------------------------------------------


def test_in_memory_merges_refuse_bad_inputs():
    pretrained = {"w": torch.zeros(2), "v": torch.zeros(3)}
    with pytest.raises(MergeError, match="at least one expert"):
        MERGERS["ties"](pretrained, [])
    with pytest.raises(MergeError, match="expert 1 lacks tensor 'v'"):
        MERGERS["ties"](pretrained, [pretrained, {"w": torch.zeros(2)}])
    with pytest.raises(MergeError, match="expert 0 has tensor 'x'"):
        MERGERS["ties"](pretrained, [{**pretrained, "x": torch.zeros(1)}])
    with pytest.raises(MergeError, match=r"'v' of expert 0 has shape \[4\]"):
        MERGERS["simple_average"](pretrained, [{"w": torch.zeros(2), "v": torch.zeros(4)}])
    with pytest.raises(MergeError, match="'w' of expert 0 has dtype torch.float16"):
        MERGERS["simple_average"](pretrained, [{"w": torch.zeros(2, dtype=torch.float16), "v": torch.zeros(3)}])
    with pytest.raises(MergeError, match="'v' of expert 0 contains NaN or Inf"):
        MERGERS["wudi"](pretrained, [{"w": torch.zeros(2), "v": t(0.0, float("nan"), 0.0)}])
    with pytest.raises(MergeError, match="produced NaN or Inf in tensor 'w'"):
        MERGERS["task_arithmetic"]({"w": t(3e38)}, [{"w": t(-3e38)}], scaling=2.0)
    with pytest.raises(MergeError, match="unknown merge method"):
        merge_state_dicts("dare", pretrained, [pretrained])
    with pytest.raises(ValueError, match="invalid configuration"):
        MERGERS["ties"](pretrained, [pretrained], top_k=1.5)


# --- radix select: the exactness of streaming TIES's thresholds -------------------------------------


def test_radix_select_equals_kthvalue_exactly():
    generator = torch.Generator().manual_seed(5)
    blocks = [
        torch.randn(3, 0, generator=generator),
        torch.randn(3, 700, generator=generator).mul(100).round().div(64),  # many ties, zeros, exact repeats
        torch.randn(3, 300, generator=generator) * 1e-40,  # subnormals
        torch.randn(3, 1, generator=generator) * 1e30,
        torch.zeros(3, 50),
        torch.randn(3, 211, generator=generator).bfloat16().float(),
    ]
    blocks = [block.abs() for block in blocks]
    matrix = torch.cat(blocks, dim=1)
    count = matrix.shape[1]
    for k in [1, 2, 50, 51, count // 2, count - int(count * 0.2), count - 1, count]:
        expected = torch.kthvalue(matrix, k, dim=1).values
        assert torch.equal(kth_smallest_streamed(lambda: iter(blocks), k), expected), k
    with pytest.raises(ValueError, match="outside"):
        kth_smallest_streamed(lambda: iter(blocks), count + 1)
