import pytest
import torch

from epmq.grid import rtn_quantize
from epmq.solver import gptq_round, quadratic_objective
from epmq.stats import TaskStatistics, anchor_strength, damped, epmq_target


def merge_instance(seed, d_out=24, d_in=96, k=4, n=160, dtype=torch.float64):
    """Experts fine-tuned from one base, task-arithmetic merge, task inputs with distinct statistics."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d_out, d_in, generator=g, dtype=dtype) * 0.1
    experts = [base + 0.05 * torch.randn(d_out, d_in, generator=g, dtype=dtype) for _ in range(k)]
    merged = base + 0.3 * sum(e - base for e in experts)
    inputs = [
        torch.randn(d_in, n, generator=g, dtype=dtype) * torch.logspace(-1, 1, d_in, dtype=dtype)[torch.randperm(d_in, generator=g)][:, None]
        for _ in range(k)
    ]
    return merged, experts, inputs


def folded(merged, experts, hessians):
    """Task statistics of one linear, each task's Hessian folded whole."""
    statistics = TaskStatistics(["w"], merged.shape[1], fold_experts=True, dtype=hessians[0].dtype, device="cpu")
    for w, h in zip(experts, hessians):
        statistics.add_task(h, {"w": w})
    return statistics


def epmq_objective(q, merged, experts, inputs, lam):
    return float(sum(((q - w) @ x).pow(2).sum() for w, x in zip(experts, inputs)) + lam * (q - merged).pow(2).sum())


@pytest.mark.parametrize("alpha", [0.0, 0.01, 1.0])
def test_objective_is_the_quadratic_form_plus_a_constant(alpha):
    merged, experts, inputs = merge_instance(0)
    hessians = [x @ x.T for x in inputs]
    target, hessian = epmq_target(merged, experts, hessians, alpha)
    lam = anchor_strength(sum(hessians), alpha)
    assert lam == pytest.approx(alpha / merged.shape[1] * sum(float(x.pow(2).sum()) for x in inputs))
    constants = []
    for _ in range(5):
        q = torch.randn_like(merged)
        constants.append(epmq_objective(q, merged, experts, inputs, lam) - quadratic_objective(q, target, hessian))
    scale = abs(epmq_objective(torch.zeros_like(merged), merged, experts, inputs, lam))
    assert max(constants) - min(constants) < 1e-9 * scale


def test_accumulator_reconstructs_the_objective_and_its_minimum():
    merged, experts, inputs = merge_instance(1)
    statistics = folded(merged, experts, [x @ x.T for x in inputs])
    problem = statistics.problem("w", merged, alpha=0.1, percdamp=0.01)
    q = torch.randn_like(merged)
    assert problem.objective(q) == pytest.approx(epmq_objective(q, merged, experts, inputs, problem.lam), rel=1e-9)
    # W* is the continuous minimiser (eq. 20): the gradient vanishes there.
    gradient = sum((problem.target - w) @ x @ x.T for w, x in zip(experts, inputs)) + problem.lam * (problem.target - merged)
    assert gradient.abs().max() < 1e-8 * sum(float((w @ x @ x.T).abs().max()) for w, x in zip(experts, inputs))


def test_one_expert_and_no_anchor_recovers_the_expert():
    merged, experts, inputs = merge_instance(2, k=1, n=400)
    target, _ = epmq_target(merged, experts, [inputs[0] @ inputs[0].T], alpha=0.0)
    assert torch.allclose(target, experts[0], atol=1e-8)


def test_alpha_zero_with_singular_hessian_falls_back_to_damping(caplog):
    merged, experts, inputs = merge_instance(3, d_in=96, n=20)  # 4 tasks x 20 tokens < 96: H_q singular
    target, hessian = epmq_target(merged, experts, [x @ x.T for x in inputs], alpha=0.0)
    assert torch.isfinite(target).all()
    assert torch.linalg.eigvalsh(hessian).min() > 0
    assert "not positive definite" in caplog.text


def test_epmq_beats_gptq_and_rtn_on_its_objective():
    epmq_wins = rtn_wins = 0
    seeds = range(12)
    for seed in seeds:
        merged, experts, inputs = merge_instance(seed, dtype=torch.float32)
        hessians = [x @ x.T for x in inputs]
        problem = folded(merged, experts, hessians).problem("w", merged, alpha=0.01, percdamp=0.01)
        epmq = gptq_round(problem.target, problem.hessian, 4, 32).weight
        gptq = gptq_round(merged, damped(sum(hessians), 0.01), 4, 32).weight
        rtn = rtn_quantize(merged, 4, 32).weight
        epmq_wins += problem.objective(epmq) < problem.objective(gptq)
        rtn_wins += problem.objective(epmq) < problem.objective(rtn)
    assert epmq_wins >= 0.9 * len(seeds)
    assert rtn_wins >= 0.9 * len(seeds)


def test_rejects_mismatched_statistics():
    merged, experts, inputs = merge_instance(4)
    with pytest.raises(ValueError, match="2 expert weights but 1"):
        epmq_target(merged, experts[:2], [inputs[0] @ inputs[0].T], 0.01)
    with pytest.raises(ValueError, match="shape"):
        folded(merged, [experts[0][:, :10]], [inputs[0] @ inputs[0].T])
    with pytest.raises(ValueError, match="shape"):
        folded(merged, [experts[0], experts[1][:10]], [inputs[0] @ inputs[0].T] * 2)
    with pytest.raises(ValueError, match="shape"):
        folded(merged, experts[:1], [inputs[0] @ inputs[0].T]).problem("w", merged[:10], 0.01, 0.01)
    with pytest.raises(ValueError, match="Hessian must be"):
        folded(merged, experts[:1], [inputs[0][:10] @ inputs[0][:10].T])
    with pytest.raises(ValueError, match="NaN"):
        folded(merged, [torch.full_like(merged, float("nan"))], [inputs[0] @ inputs[0].T])
    with pytest.raises(ValueError, match="alpha"):
        anchor_strength(torch.eye(3), -1.0)


def test_batches_and_whole_tasks_fold_the_same_statistics():
    """The engine sums a task's Hessian batch by batch; a whole Hessian gives the same fold."""
    merged, experts, inputs = merge_instance(5)
    by_batch = TaskStatistics(["w"], merged.shape[1], fold_experts=True, dtype=torch.float64, device="cpu")
    for w, x in zip(experts, inputs):
        for batch in x.T.split(40):
            by_batch.add_batch(batch)
        by_batch.end_task({"w": w})
    whole = folded(merged, experts, [x @ x.T for x in inputs])
    assert by_batch.task_tokens == [x.shape[1] for x in inputs]
    assert torch.allclose(by_batch.hessian_sum, whole.hessian_sum, rtol=1e-12)
    assert torch.allclose(by_batch.rhs["w"], whole.rhs["w"], rtol=1e-12)
    assert by_batch.expert_energy["w"] == pytest.approx(whole.expert_energy["w"], rel=1e-12)


def test_statistics_without_experts_refuse_an_e_pmq_problem():
    statistics = TaskStatistics(["w"], 4, fold_experts=True, dtype=torch.float64, device="cpu")
    with pytest.raises(ValueError, match="at least one task"):
        statistics.problem("w", torch.zeros(2, 4), 0.01, 0.01)
    with pytest.raises(ValueError, match="needs expert weights"):
        statistics.add_task(torch.eye(4), None)
