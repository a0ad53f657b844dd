"""Sharded GradStats (FSDP2's Shard(0) layout) on one process: the layout, the merge rule, and that
no scalar is computed from a shard alone. The collectives themselves are tested with gloo ranks in
test_fsdp.py (suite "fsdp" of _distributed_worker.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from persample import GradStats, noise
from persample.stats import SHARD_SUMS, Shard, shard_rows


def test_shard_rows_follow_torch_chunk():
    for d0 in range(0, 9):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(d0).chunk(world) if d0 else ()
            expected = [(int(c[0]), int(c[-1]) + 1) for c in chunks if len(c)]
            got = [shard_rows((d0,), r, world) for r in range(world)]
            assert [r for r in got if r[1] > r[0]] == expected, (d0, world, got)
            assert all(0 <= a <= b <= d0 for a, b in got)


def _sharded(seed: int, rank: int = 0, world: int = 2, n: int = 4):
    """A whole record of n examples, and rank ``rank``'s shard of it with exact global sums."""
    g = torch.Generator().manual_seed(seed)
    grads = {"w": torch.randn(n, 5, 3, generator=g, dtype=torch.float64), "b": torch.randn(n, 3, generator=g).double()}
    whole = GradStats.from_per_example(grads, torch.randn(n, generator=g, dtype=torch.float64))
    rows = {k: shard_rows(tuple(v.shape), rank, world) for k, v in whole.mean.items()}
    sums = {}
    for k in whole.names:
        mu, var = whole.mean[k].double(), whole.var[k].double()
        keep = var > 0
        sums[k] = (
            float(mu.pow(2).sum()),
            float(whole.m2[k].sum()),
            float((mu[keep] ** 2 / var[keep]).sum()),
            float(keep.sum()),
            0.0,
            0.0,
        )
    assert len(sums["w"]) == len(SHARD_SUMS)
    layout = Shard(rank, world, rows, {k: tuple(v.shape) for k, v in whole.mean.items()}, sums)
    part = dataclasses.replace(
        whole,
        mean={k: v[slice(*rows[k])] for k, v in whole.mean.items()},
        m2={k: v[slice(*rows[k])] for k, v in whole.m2.items()},
        shard=layout,
    )
    return whole, part


def test_scalars_of_a_shard_are_the_whole_records():
    whole, part = _sharded(0)
    assert part.mean["w"].shape == (3, 3) and part.mean["b"].shape == (2,)
    assert float(part.mean_sq_norm) == pytest.approx(float(whole.mean_sq_norm), rel=1e-12)
    assert part.param_m2_sum() == pytest.approx(whole.param_m2_sum(), rel=1e-12)
    ours, theirs = noise.gradient_noise_scale(part), noise.gradient_noise_scale(whole)
    assert ours.b_simple == pytest.approx(theirs.b_simple, rel=1e-12)
    assert noise.mean_gsnr(part) == pytest.approx(noise.mean_gsnr(whole), rel=1e-12)
    assert part.is_finite()


def test_merge_of_shards_is_row_wise_and_drops_the_stale_sums():
    (wa, a), (wb, b) = _sharded(1), _sharded(2)
    merged, whole = a.merge(b), wa.merge(wb)
    assert merged.shard is not None and merged.shard.sums is None
    for k in whole.names:
        start, stop = merged.shard.rows[k]
        torch.testing.assert_close(merged.mean[k], whole.mean[k][start:stop], rtol=1e-12, atol=0)
        torch.testing.assert_close(merged.m2[k], whole.m2[k][start:stop], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="stale"):
        merged.mean_sq_norm  # noqa: B018 - a property that must refuse, not answer from one shard
    with pytest.raises(ValueError, match="stale"):
        noise.gradient_noise_scale(merged)
    with pytest.raises(ValueError, match="sharded differently"):
        a.merge(_sharded(3, rank=1)[1])
    with pytest.raises(ValueError, match="sharded differently"):
        a.merge(wb)


def test_elementwise_preconditioning_of_a_shard_is_refused_and_diagnostics_go_on():
    _, part = _sharded(4)
    with pytest.raises(ValueError, match="shard"):
        noise.preconditioned_noise_scale(part, preconditioner={"w": 1.0, "b": 1.0})
    row = noise.diagnostics(part, preconditioner={"w": 1.0, "b": 1.0})
    assert row["b_precond"] != row["b_precond"]  # NaN: diagnostics never stop training


def test_a_shard_of_the_wrong_shape_is_refused():
    _, part = _sharded(5)
    with pytest.raises(ValueError, match="sharded mean"):
        dataclasses.replace(part, mean={**part.mean, "w": part.mean["w"][:1]})
