"""GradStats' declared per-field reductions: merge and ``to`` derive from them."""

import torch

from persample import GradStats
from persample.stats import Reduction, field_reductions, same_value


def _record(n, seed, *, clip=None, reference=None):
    g = torch.Generator().manual_seed(seed)
    grads = {
        "w": torch.randn(n, 3, 2, generator=g, dtype=torch.float64) * 2 + 1,
        "b": torch.randn(n, 4, generator=g, dtype=torch.float64),
    }
    losses = torch.rand(n, generator=g, dtype=torch.float64)
    return grads, losses, GradStats.from_per_example(grads, losses, reference=reference, clip_norm=clip)


def test_every_field_declares_its_reduction():
    declared = field_reductions()
    assert declared["n"].reduction is Reduction.SUM
    assert declared["mean"].reduction is Reduction.WEIGHTED_MEAN
    assert declared["m2"].reduction is Reduction.CHAN_M2
    for name in ("param_sq_norms", "losses", "inner_products"):
        assert declared[name].reduction is Reduction.CONCAT
    assert declared["inner_products"].requires == "reference"
    assert declared["reference"].reduction is Reduction.SHARED
    assert declared["clipped_mean"].reduction is Reduction.WEIGHTED_MEAN
    assert declared["clipped_mean"].requires == "clip_norm"
    assert {f for f, d in declared.items() if d.reduction is Reduction.PARTS} == {"part_sizes", "part_mean_sq_norms"}


def test_merge_of_clipped_means_is_the_clipped_mean_of_the_concatenation():
    grads, losses, whole = _record(7, 3, clip=2.0)
    a = GradStats.from_per_example({k: v[:3] for k, v in grads.items()}, losses[:3], clip_norm=2.0)
    b = GradStats.from_per_example({k: v[3:] for k, v in grads.items()}, losses[3:], clip_norm=2.0)
    merged = a.merge(b)
    for k in grads:
        torch.testing.assert_close(merged.clipped_mean[k], whole.clipped_mean[k], rtol=1e-12, atol=1e-14)
    c = GradStats.from_per_example({k: v[3:] for k, v in grads.items()}, losses[3:], clip_norm=3.0)
    assert a.merge(c).clipped_mean is None and a.merge(c).clip_norm is None


def test_parts_are_kept_only_when_both_records_have_them():
    _, _, a = _record(3, 1)
    _, _, b = _record(2, 2)
    import dataclasses

    pa = dataclasses.replace(a, part_sizes=(3,), part_mean_sq_norms=(1.0,))
    pb = dataclasses.replace(b, part_sizes=(2,), part_mean_sq_norms=(2.0,))
    assert pa.merge(pb).part_sizes == (3, 2) and pa.merge(pb).part_mean_sq_norms == (1.0, 2.0)
    assert pa.merge(b).part_sizes is None and a.merge(b).part_sizes is None


def test_to_moves_every_tensor_field_and_keeps_scalars():
    grads, losses, _ = _record(4, 5)
    ref = {k: v.mean(0) for k, v in grads.items()}
    stats = GradStats.from_per_example(grads, losses, reference=ref, clip_norm=1.5)
    moved = stats.to(dtype=torch.float32)
    for name in field_reductions():
        value = getattr(moved, name)
        tensors = value.values() if isinstance(value, dict) else [value] if isinstance(value, torch.Tensor) else []
        assert all(t.dtype == torch.float32 for t in tensors), name
    assert moved.n == 4 and moved.clip_norm == 1.5
    assert same_value(moved.reference, {k: v.float() for k, v in ref.items()})


def test_same_value_compares_by_value():
    a = {"x": torch.tensor([1.0, 2.0])}
    assert same_value(a, {"x": torch.tensor([1.0, 2.0])})
    assert not same_value(a, {"x": torch.tensor([1.0, 2.5])})
    assert not same_value(a, {"y": torch.tensor([1.0, 2.0])})
    assert not same_value(a, {"x": torch.tensor([1.0, 2.0], dtype=torch.float64)})
    assert not same_value(a, None) and same_value(None, None)
    assert same_value(2.0, 2.0) and not same_value(2.0, 3.0)
