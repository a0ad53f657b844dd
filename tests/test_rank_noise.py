"""The rank-level (two-batch) noise estimator of McCandlish et al. 2018, App. A.1, against its formulas."""

import dataclasses
import math

import pytest
import torch

from persample import GradStats, noise


def _parts(sizes, seed=0, dim=6):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(sum(sizes), dim, generator=g, dtype=torch.float64) + 0.3
    losses = torch.rand(sum(sizes), generator=g, dtype=torch.float64)
    records, start = [], 0
    for n in sizes:
        rec = GradStats.from_per_example({"w": grads[start : start + n]}, losses[start : start + n])
        records.append(dataclasses.replace(rec, part_sizes=(n,), part_mean_sq_norms=(float(rec.mean_sq_norm),)))
        start += n
    return grads, GradStats.merge_all(records)


def test_two_batch_estimator_is_its_formula():
    est = noise.two_batch_noise_scale(4, 2.5, 12, 1.5)
    assert est.grad_sq == pytest.approx((12 * 1.5 - 4 * 2.5) / (12 - 4), rel=1e-15)
    assert est.trace_cov == pytest.approx((2.5 - 1.5) / (1 / 4 - 1 / 12), rel=1e-15)
    assert est.b_simple == pytest.approx(est.trace_cov / est.grad_sq, rel=1e-15)
    assert (est.estimator, est.b_small, est.n) == ("rank", 4.0, 12)


def test_per_example_estimator_is_the_two_batch_one_with_b_small_one():
    grads, stats = _parts([5, 5], seed=1)
    per_example = noise.gradient_noise_scale(stats)
    m = float(grads.pow(2).sum(1).mean())
    two = noise.two_batch_noise_scale(1, m, 10, float(stats.mean_sq_norm))
    assert per_example.estimator == "per-example" and per_example.b_small == 1.0
    assert two.grad_sq == pytest.approx(per_example.grad_sq, rel=1e-12)
    assert two.trace_cov == pytest.approx(per_example.trace_cov, rel=1e-12)


@pytest.mark.parametrize("sizes", [[4, 4], [2, 5, 3]])
def test_rank_estimator_is_the_formula_on_the_ranks_mean_gradients(sizes):
    grads, stats = _parts(sizes, seed=2)
    est = noise.rank_noise_scale(stats)
    bounds = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
    small = [float(grads[a:b].mean(0).pow(2).sum()) for a, b in zip(bounds, bounds[1:])]
    b_small = len(sizes) / sum(1 / n for n in sizes)
    big = float(grads.mean(0).pow(2).sum())
    n = sum(sizes)
    s = sum(small) / len(small)
    assert est.b_small == pytest.approx(b_small, rel=1e-15)
    assert est.grad_sq == pytest.approx((n * big - b_small * s) / (n - b_small), rel=1e-12)
    assert est.trace_cov == pytest.approx((s - big) / (1 / b_small - 1 / n), rel=1e-12)
    row = noise.diagnostics(stats, per_layer=False)
    assert row["rank_b_simple"] == pytest.approx(est.b_simple, rel=1e-12)


def test_rank_estimator_is_unbiased_with_unequal_batches():
    """Monte Carlo: g_i ~ N(μ, diag(σ²)); the harmonic-mean B_small keeps both estimates unbiased."""
    g = torch.Generator().manual_seed(3)
    mu = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    sigma = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    sizes, trials = [2, 7, 3], 40_000
    draws = mu + sigma * torch.randn(trials, sum(sizes), 3, generator=g, dtype=torch.float64)
    bounds = [0, 2, 9, 12]
    small = torch.stack([draws[:, a:b].mean(1).pow(2).sum(-1) for a, b in zip(bounds, bounds[1:])], 1).mean(1)
    big = draws.mean(1).pow(2).sum(-1)
    b_small = 3 / sum(1 / n for n in sizes)
    grad_sq = (12 * big - b_small * small) / (12 - b_small)
    trace = (small - big) / (1 / b_small - 1 / 12)
    assert float(grad_sq.mean()) == pytest.approx(float(mu.pow(2).sum()), rel=0.03)
    assert float(trace.mean()) == pytest.approx(float(sigma.pow(2).sum()), rel=0.03)


def test_rank_estimator_needs_an_all_reduced_record_with_two_ranks():
    grads, stats = _parts([3, 3])
    with pytest.raises(ValueError, match=r"all-reduced record: call persample.distributed.all_reduce_stats\(stats\)"):
        noise.rank_noise_scale(GradStats.from_per_example({"w": grads}, stats.losses))
    one = dataclasses.replace(stats, part_sizes=(6,), part_mean_sq_norms=(1.0,))
    with pytest.raises(ValueError, match="at least 2 ranks, got 1"):
        noise.rank_noise_scale(one)
    with pytest.raises(ValueError, match="0 < b_small < b_big"):
        noise.two_batch_noise_scale(4, 1.0, 4, 1.0)
    assert math.isnan(noise.gradient_noise_scale(stats).b_simple) is False
