"""One rank of the multi-process tests in test_distributed.py (run as a script, never collected).

    python tests/_distributed_worker.py OUT_DIR

Reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the environment, joins a gloo group,
runs every scenario registered below for this world size, and writes OUT_DIR/rank{r}.json:
``{scenario: "ok" | traceback}``. A scenario that fails on one rank must not leave the others
waiting in a collective, so each scenario ends with a barrier that every rank reaches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)

import persample  # noqa: E402
from persample import noise  # noqa: E402
from persample.distributed import all_reduce_stats, inner_products_with  # noqa: E402

SCENARIOS: dict[str, tuple] = {}
#: batch sizes per rank of the statistics scenarios, by world size: equal for 2, unequal for 3
SPLITS = {2: [4, 4], 3: [2, 5, 3]}


def scenario(*worlds):
    def register(fn):
        SCENARIOS[fn.__name__] = (fn, worlds)
        return fn
    return register


def rank_world():
    return dist.get_rank(), dist.get_world_size()


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def global_batch(n, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def my_slice(sizes):
    rank, _ = rank_world()
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def close(a, b, what, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def close_dicts(a, b, what, **kw):
    assert a.keys() == b.keys(), (what, sorted(a), sorted(b))
    for k in a:
        close(a[k], b[k], f"{what}[{k}]", **kw)


# --------------------------------------------------------------------------- statistics


def _check_global_stats(engine):
    _, world = rank_world()
    sizes = SPLITS[world]
    model, loss = mlp(), F.cross_entropy
    x, y = global_batch(sum(sizes))
    s = my_slice(sizes)
    local = persample.grad_stats(model, loss, x[s], y[s], engine=engine, clip_norm=0.7)
    reduced = all_reduce_stats(local, inner_products=inner_products_with(model, loss, x[s], y[s]))
    whole = persample.grad_stats(model, loss, x, y, engine=engine, clip_norm=0.7, inner_products=True)
    assert reduced.n == whole.n == sum(sizes)
    close_dicts(reduced.mean, whole.mean, "mean")
    close_dicts(reduced.var, whole.var, "var")
    close_dicts(reduced.param_sq_norms, whole.param_sq_norms, "param_sq_norms")
    close(reduced.sq_norms, whole.sq_norms, "sq_norms")
    close(reduced.losses, whole.losses, "losses")
    close_dicts(reduced.clipped_mean, whole.clipped_mean, "clipped_mean")
    close(reduced.inner_products, whole.inner_products, "inner_products")
    assert reduced.part_sizes == tuple(sizes)
    small = []
    for r, part in enumerate(reduced.part_mean_sq_norms):
        rs = slice(sum(sizes[:r]), sum(sizes[:r + 1]))
        small.append(persample.grad_stats(model, loss, x[rs], y[rs], engine=engine).mean_sq_norm)
        close(torch.tensor(part, dtype=torch.float64), small[-1], f"part_mean_sq_norms[{r}]")
    # both noise estimators on the reduced record equal their formulas on the concatenated batch
    n, big = sum(sizes), whole.mean_sq_norm
    b_small = world / sum(1 / k for k in sizes)
    s_small = sum(small) / world
    rank_est = noise.rank_noise_scale(reduced)
    close(torch.tensor(rank_est.grad_sq), (n * big - b_small * s_small) / (n - b_small), "rank grad_sq")
    close(torch.tensor(rank_est.trace_cov), (s_small - big) / (1 / b_small - 1 / n), "rank trace_cov")
    m = whole.sq_norms.mean()
    per_example = noise.gradient_noise_scale(reduced)
    close(torch.tensor(per_example.grad_sq), (n * big - m) / (n - 1), "per-example grad_sq")
    close(torch.tensor(per_example.trace_cov), (m - big) * n / (n - 1), "per-example trace_cov")
    # the tests that need inner products relative to the global mean now run on the reduced record
    for test in (noise.inner_product_test, noise.orthogonality_test):
        close(torch.tensor(test(reduced).statistic), torch.tensor(test(whole).statistic), test.__name__)


@scenario(2, 3)
def stats_equal_single_process_fast_engine():
    _check_global_stats("fast")


@scenario(2, 3)
def stats_equal_single_process_vmap_engine():
    _check_global_stats("vmap")


@scenario(2, 3)
def shared_reference_keeps_inner_products_without_a_second_pass():
    _, world = rank_world()
    sizes = SPLITS[world]
    model, loss = mlp(), F.cross_entropy
    x, y = global_batch(sum(sizes))
    reference = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()}
    grads, losses = persample.per_sample_grads(model, loss, x, y), None
    whole = persample.GradStats.from_per_example(grads, persample.grad_stats(model, loss, x, y).losses,
                                                 reference=reference)
    s = my_slice(sizes)
    local = persample.GradStats.from_per_example({k: v[s] for k, v in grads.items()}, whole.losses[s],
                                                 reference={k: v.clone() for k, v in reference.items()})
    reduced = all_reduce_stats(local)
    close(reduced.inner_products, whole.inner_products, "inner_products")
    # a reference that differs on one rank drops them (as merge does), on every rank
    rank, _ = rank_world()
    if rank == world - 1:
        local = dataclasses.replace(local, reference={k: v + 1 for k, v in local.reference.items()})
    dropped = all_reduce_stats(local)
    assert dropped.inner_products is None and dropped.reference is None


@scenario(2)
def mismatched_parameters_raise_before_p_sized_collectives():
    rank, _ = rank_world()
    model = mlp() if rank == 0 else nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = global_batch(4)
    local = persample.grad_stats(model, F.cross_entropy, x, y)
    try:
        all_reduce_stats(local)
    except ValueError as err:
        assert "cover different parameters" in str(err)
    else:
        raise AssertionError("no error for statistics over different parameters")


# ------------------------------------------------------------------------------ driver


def main(out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = rank_world()
    results = {}
    for name, (fn, worlds) in SCENARIOS.items():
        if world not in worlds:
            continue
        try:
            fn()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            results[name] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
