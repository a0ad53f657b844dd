"""GradStats: exact merge, chunk-size invariance, and property tests over shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import persample
from persample import GradStats

from zoo import CASE_IDS, CASES, assert_dicts_close, oracle_grads


def _random_grads(n, seed):
    g = torch.Generator().manual_seed(seed)
    grads = {
        "a": torch.randn(n, 3, 2, generator=g, dtype=torch.float64) * 3 + 1,
        "b": torch.randn(n, 4, generator=g, dtype=torch.float64),
    }
    return grads, torch.rand(n, generator=g, dtype=torch.float64)


def _assert_stats_close(a: GradStats, b: GradStats, rtol=1e-9):
    assert a.n == b.n
    assert_dicts_close(a.mean, b.mean, rtol=rtol)
    assert_dicts_close(a.var, b.var, rtol=rtol)
    assert_dicts_close(a.param_sq_norms, b.param_sq_norms, rtol=rtol)
    torch.testing.assert_close(a.losses, b.losses, rtol=rtol, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(n_a=st.integers(1, 9), n_b=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_merge_equals_stats_of_concatenation(n_a, n_b, seed):
    grads, losses = _random_grads(n_a + n_b, seed)
    whole = GradStats.from_per_example(grads, losses)
    a = GradStats.from_per_example({k: v[:n_a] for k, v in grads.items()}, losses[:n_a])
    b = GradStats.from_per_example({k: v[n_a:] for k, v in grads.items()}, losses[n_a:])
    _assert_stats_close(a.merge(b), whole)


def test_merge_keeps_inner_products_only_with_a_shared_reference():
    grads, losses = _random_grads(6, 1)
    ref = {k: v.mean(0) for k, v in grads.items()}
    halves = [
        GradStats.from_per_example({k: v[s] for k, v in grads.items()}, losses[s], reference=ref)
        for s in (slice(0, 3), slice(3, 6))
    ]
    merged = halves[0].merge(halves[1])
    flat = torch.cat([g.reshape(6, -1) for g in grads.values()], 1)
    torch.testing.assert_close(
        merged.inner_products, flat @ torch.cat([r.reshape(-1) for r in ref.values()]), rtol=1e-9, atol=1e-12
    )
    # References are compared by value: an equal clone is the same reference...
    clone = GradStats.from_per_example(
        {k: v[3:] for k, v in grads.items()}, losses[3:], reference={k: v.clone() for k, v in ref.items()}
    )
    torch.testing.assert_close(halves[0].merge(clone).inner_products, merged.inner_products, rtol=0, atol=0)
    # ...and a reference that differs in one element is not.
    moved = {k: v.clone() for k, v in ref.items()}
    moved["b"][0] += 1e-12
    other = GradStats.from_per_example({k: v[3:] for k, v in grads.items()}, losses[3:], reference=moved)
    dropped = halves[0].merge(other)
    assert dropped.inner_products is None and dropped.reference is None


def test_merge_rejects_different_parameters():
    grads, losses = _random_grads(4, 2)
    a = GradStats.from_per_example(grads, losses)
    b = GradStats.from_per_example({"a": grads["a"]}, losses)
    with pytest.raises(ValueError, match="different parameters"):
        a.merge(b)
    with pytest.raises(TypeError, match="GradStats"):
        a.merge({"a": 1})


def test_single_example_variance_is_nan_by_definition():
    grads, losses = _random_grads(1, 3)
    stats = GradStats.from_per_example(grads, losses)
    assert all(torch.isnan(v).all() for v in stats.var.values())
    assert stats.sq_norms.shape == (1,)


def test_var_false_keeps_mean_and_norms_only():
    grads, losses = _random_grads(5, 4)
    stats = GradStats.from_per_example(grads, losses, var=False)
    assert stats.var is None and stats.m2 is None
    merged = stats.merge(stats)
    assert merged.var is None and merged.n == 10


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("cnn_groupnorm_pool", "gru", "hf_gpt2")], ids=lambda c: c.name
)
def test_chunk_size_changes_memory_never_results(case):
    model, inputs, targets = case.instantiate(batch=7)
    reference = persample.grad_stats(model, case.loss_fn, inputs, targets, chunk_size=7)
    for chunk in (1, 3, 100):
        stats = persample.grad_stats(model, case.loss_fn, inputs, targets, chunk_size=chunk)
        _assert_stats_close(stats, reference)
        grads = persample.per_sample_grads(model, case.loss_fn, inputs, targets, chunk_size=chunk)
        assert_dicts_close(grads, persample.per_sample_grads(model, case.loss_fn, inputs, targets))


def test_merge_of_two_grad_stats_calls_equals_one_call():
    case = CASES[CASE_IDS.index("mlp")]
    model, inputs, targets = case.instantiate(batch=9)
    whole = persample.grad_stats(model, case.loss_fn, inputs, targets)
    a = persample.grad_stats(model, case.loss_fn, inputs[:4], targets[:4])
    b = persample.grad_stats(model, case.loss_fn, inputs[4:], targets[4:])
    _assert_stats_close(a.merge(b), whole)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 6),
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    chunk=st.integers(1, 7),
    seed=st.integers(0, 1000),
)
def test_random_mlps_match_oracle(batch, widths, chunk, seed):
    torch.manual_seed(seed)
    layers = []
    for d_in, d_out in zip(widths, widths[1:]):
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).double()
    x = torch.randn(batch, widths[0], dtype=torch.float64)
    y = torch.randn(batch, widths[-1], dtype=torch.float64)
    loss_fn = nn.functional.mse_loss
    expected, losses = oracle_grads(model, loss_fn, x, y)
    assert_dicts_close(persample.per_sample_grads(model, loss_fn, x, y, chunk_size=chunk), expected)
    stats = persample.grad_stats(model, loss_fn, x, y, chunk_size=chunk)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in expected.items()})
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)
    if batch > 1:
        assert_dicts_close(stats.var, {k: g.var(0) for k, g in expected.items()})


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 4),
    channels=st.integers(1, 3),
    size=st.integers(4, 7),
    kernel=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_random_convnets_match_oracle(batch, channels, size, kernel, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(channels, 2, kernel), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(batch, channels, size, size, dtype=torch.float64)
    model(x)  # materialise the lazy layer
    y = torch.randint(0, 3, (batch,))
    expected, _ = oracle_grads(model, nn.functional.cross_entropy, x, y)
    assert_dicts_close(persample.per_sample_grads(model, nn.functional.cross_entropy, x, y), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_float64_square_sum_is_the_float64_sum_of_squares_and_leaves_its_input(dtype):
    """``mean_sq_norm``'s sum (squared in place in its own float64 copy): the same number, to the bit, as
    ``t.double().pow(2).sum()``, and the input untouched, also where ``double()`` is no copy (float64)."""
    from persample.stats import float64_square_sum

    t = (torch.randn(300, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e3).to(dtype)
    before = t.clone()
    total = float64_square_sum(t)
    assert total.dtype == torch.float64 and total.dim() == 0
    assert total.item() == t.double().pow(2).sum().item()
    assert torch.equal(t, before)
    stats = GradStats.from_per_example({"w": t.double()[None].repeat(2, 1, 1)}, torch.zeros(2, dtype=torch.float64))
    assert stats.mean_sq_norm.item() == stats.mean["w"].pow(2).sum().item()
