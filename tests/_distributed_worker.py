"""One rank of the multi-process tests in test_distributed.py (run as a script, never collected).

    python tests/_distributed_worker.py OUT_DIR

Reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the environment, joins a gloo group,
runs every scenario registered below for this world size, and writes OUT_DIR/rank{r}.json:
``{scenario: "ok" | traceback}``. A scenario that fails on one rank must not leave the others
waiting in a collective, so each scenario ends with a barrier that every rank reaches.
"""

from __future__ import annotations

import contextlib
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


def oracle_stats(model, loss_fn, x, y):
    """Mean, unbiased variance and squared norms from a float64 loop of autograd (independent of persample)."""
    params = dict(model.named_parameters())
    rows = [torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), list(params.values()))
            for i in range(x.shape[0])]
    grads = {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(params)}
    flat = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], 1)
    return {"mean": {n: g.mean(0) for n, g in grads.items()}, "var": {n: g.var(0) for n, g in grads.items()},
            "sq_norms": flat.pow(2).sum(1)}


def close(a, b, what, rtol=1e-9, atol=1e-12):
    a, b = (torch.as_tensor(v, dtype=torch.float64) if not isinstance(v, torch.Tensor) or v.dim() == 0 else v
            for v in (a, b))
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
        close(part, small[-1], f"part_mean_sq_norms[{r}]")
    # both noise estimators on the reduced record equal their formulas on the concatenated batch
    n, big = sum(sizes), whole.mean_sq_norm
    b_small = world / sum(1 / k for k in sizes)
    s_small = sum(small) / world
    rank_est = noise.rank_noise_scale(reduced)
    close(rank_est.grad_sq, (n * big - b_small * s_small) / (n - b_small), "rank grad_sq")
    close(rank_est.trace_cov, (s_small - big) / (1 / b_small - 1 / n), "rank trace_cov")
    m = whole.sq_norms.mean()
    per_example = noise.gradient_noise_scale(reduced)
    close(per_example.grad_sq, (n * big - m) / (n - 1), "per-example grad_sq")
    close(per_example.trace_cov, (m - big) * n / (n - 1), "per-example trace_cov")
    # the tests that need inner products relative to the global mean now run on the reduced record
    for test in (noise.inner_product_test, noise.orthogonality_test):
        close(test(reduced).statistic, test(whole).statistic, test.__name__)


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
    dropped = local.all_reduce()  # the GradStats method delegates to all_reduce_stats
    assert dropped.inner_products is None and dropped.reference is None


@scenario(2, 3)
def all_reduce_gradients_is_the_mean_over_ranks_with_none_as_zero():
    from persample.distributed import all_reduce_gradients
    rank, world = rank_world()
    params = {n: nn.Parameter(torch.zeros(s, dtype=torch.float64)) for n, s in (("a", 3), ("b", 2), ("c", 4))}
    grads = {r: {"a": torch.arange(3.0, dtype=torch.float64) * (r + 1), "b": torch.full((2,), 1.0 + r,
                                                                                         dtype=torch.float64)}
             for r in range(world)}
    params["a"].grad = grads[rank]["a"].clone()
    if rank == 0:  # 'b' has a gradient on rank 0 only; 'c' on none
        params["b"].grad = grads[0]["b"].clone()
    all_reduce_gradients(params, bucket_bytes=16)  # tiny buckets: several all-reduces
    close(params["a"].grad, sum(grads[r]["a"] for r in range(world)) / world, "a")
    close(params["b"].grad, grads[0]["b"] / world, "b (None on other ranks counts as zero)")
    assert params["c"].grad is None


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


# ------------------------------------------------------------------------------ Tracker


def ddp(model):
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model)


def local_batches(steps, seed=5):
    """This rank's batch of each step (sizes as in SPLITS: unequal with 3 ranks)."""
    rank, world = rank_world()
    sizes = SPLITS[world]
    out = []
    for step in range(steps):
        x, y = global_batch(sum(sizes), seed=seed + step)
        out.append((x[my_slice(sizes)], y[my_slice(sizes)], x, y))
    return out


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_replicas_identical(model, what):
    mine = flat_params(model)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    for r, other in enumerate(everyone):
        assert torch.equal(other, mine), f"{what}: rank {r}'s parameters differ from this rank's"


def _tracker_against_ddp_backward(*, wrap_module=False, every=1, accumulate=1, check_every=0, steps=4):
    """Tracker(ddp) (or Tracker(ddp.module)) vs DDP's own backward, with SGD+momentum, step by step."""
    loss = F.cross_entropy
    tracked, plain = ddp(mlp(seed=3)), ddp(mlp(seed=3))
    tracker = persample.Tracker(tracked.module if wrap_module else tracked, loss, every=every,
                                check_every=check_every)
    seen = []
    tracker.register_hook(lambda t, stats: seen.append(stats))
    opt_t = torch.optim.SGD(tracked.parameters(), lr=0.1, momentum=0.9)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    batches = local_batches(steps * accumulate)
    for step in range(steps):
        opt_t.zero_grad()
        opt_p.zero_grad()
        for micro in range(accumulate):
            x, y, gx, gy = batches[step * accumulate + micro]
            last = micro == accumulate - 1
            with (contextlib.nullcontext() if last else tracked.no_sync()):
                tracker.step(x, y)
            with (contextlib.nullcontext() if last else plain.no_sync()):
                loss(plain(x), y).backward()
            if not last:  # inside no_sync both keep this rank's own accumulated gradient
                for (n, a), b in zip(tracked.named_parameters(), plain.parameters()):
                    close(a.grad, b.grad, f"step {step} micro {micro} local {n}")
        for (n, a), b in zip(tracked.named_parameters(), plain.parameters()):
            close(a.grad, b.grad, f"step {step} p.grad of {n}", rtol=1e-11, atol=1e-13)
        opt_t.step()
        opt_p.step()
        assert_replicas_identical(tracked, f"step {step}")
    close(flat_params(tracked), flat_params(plain), "parameters after training", rtol=1e-10, atol=1e-12)
    assert len(seen) == len(range(0, steps * accumulate, every))
    # the hooks' first statistics (step 0, parameters as initialised, for every `every`) are those of the
    # global batch (the concatenation of the ranks' batches): the float64 loop oracle on one process
    _, _, gx, gy = batches[0]
    whole = oracle_stats(mlp(seed=3), loss, gx, gy)
    assert seen[0].n == gx.shape[0]
    close_dicts(seen[0].mean, whole["mean"], "global mean of step 0")
    close_dicts(seen[0].var, whole["var"], "global var of step 0")
    close(seen[0].sq_norms, whole["sq_norms"], "global per-example squared norms of step 0")


@scenario(2, 3)
def tracker_step_equals_ddp_backward():
    _tracker_against_ddp_backward()


@scenario(2)
def tracker_on_ddp_module_equals_ddp_backward():
    _tracker_against_ddp_backward(wrap_module=True, every=2)


@scenario(2, 3)
def tracker_no_sync_accumulation_every_2_and_checks():
    _tracker_against_ddp_backward(accumulate=2, every=2, check_every=3)


@scenario(2, 3)
def tracker_clipping_reduces_the_clipped_means():
    _, world = rank_world()
    loss, clip = F.cross_entropy, 0.5
    tracked = ddp(mlp(seed=4))
    tracker = persample.Tracker(tracked, loss, clip_norm=clip)
    x, y, gx, gy = local_batches(1, seed=11)[0]
    stats = tracker.step(x, y)
    grads = persample.per_sample_grads(mlp(seed=4), loss, x, y)
    norms = torch.stack([g.reshape(len(x), -1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    factors = (clip / norms).clamp(max=1.0)
    for n, p in tracked.module.named_parameters():
        local = torch.tensordot(factors, grads[n], dims=1) / len(x)
        dist.all_reduce(local)
        close(p.grad, local / world, f"clipped p.grad of {n}")
    whole = persample.grad_stats(mlp(seed=4), loss, gx, gy, clip_norm=clip)
    close_dicts(stats.mean, whole.mean, "global mean")
    assert stats.clipped_mean is not None and stats.n == whole.n


@scenario(2, 3)
def tracker_inner_products_are_relative_to_the_global_mean():
    loss = F.cross_entropy
    tracker = persample.Tracker(ddp(mlp(seed=6)), loss, inner_products=True)
    x, y, gx, gy = local_batches(1, seed=21)[0]
    stats = tracker.step(x, y)
    whole = persample.grad_stats(mlp(seed=6), loss, gx, gy, inner_products=True)
    close(stats.inner_products, whole.inner_products, "inner products")
    close(noise.inner_product_test(stats).statistic, noise.inner_product_test(whole).statistic,
          "inner-product test")


@scenario(2, 3)
def observe_under_ddp_gives_global_stats_and_keeps_ddp_grads():
    loss = F.cross_entropy
    observed, plain = ddp(mlp(seed=7)), ddp(mlp(seed=7))
    tracker = persample.Tracker(observed, loss)
    x, y, gx, gy = local_batches(1, seed=31)[0]
    with tracker.observe(y) as obs:
        loss(observed(x), y).backward()
    loss(plain(x), y).backward()
    for (n, a), b in zip(observed.named_parameters(), plain.parameters()):
        close(a.grad, b.grad, f"p.grad of {n} after observe")
    whole = persample.grad_stats(mlp(seed=7), loss, gx, gy)
    assert obs.stats.n == whole.n
    close_dicts(obs.stats.mean, whole.mean, "observed global mean")
    close_dicts(obs.stats.var, whole.var, "observed global var")
    close(obs.stats.sq_norms, whole.sq_norms, "observed per-example norms")
    # inside no_sync the block's gradient is this rank's own, and the statistics are still global
    observed.zero_grad()
    with observed.no_sync(), tracker.observe(y) as obs2:
        loss(observed(x), y).backward()
    close_dicts(obs2.stats.mean, whole.mean, "observed global mean under no_sync")


@scenario(2, 3)
def accumulate_with_a_shared_reference_keeps_the_global_inner_products():
    """Micro-batches against one reference r (step: the first micro-batch's global mean; observe: the
    last published mean) merge into the global batch's p_i = <g_i, r>, in the merged record's order
    (micro-batch by micro-batch, each the ranks' examples in rank order)."""
    loss = F.cross_entropy
    tracked = ddp(mlp(seed=9))
    tracker = persample.Tracker(tracked, loss)
    batches = local_batches(2, seed=41)
    with tracker.accumulate(reference="first") as acc:
        for i, (x, y, _, _) in enumerate(batches):
            with (tracked.no_sync() if i == 0 else contextlib.nullcontext()):
                tracker.step(x, y, scale=0.5)
    with tracker.accumulate(reference="last") as acc2:
        for x, y, _, _ in batches:
            with tracker.observe(y):
                (loss(tracked(x), y) * 0.5).backward()
    grads = [persample.per_sample_grads(mlp(seed=9), loss, gx, gy) for _, _, gx, gy in batches]
    names = list(grads[0])
    flat = torch.cat([torch.cat([g[k].reshape(len(g[k]), -1) for k in names], 1) for g in grads])
    first = {k: grads[0][k].mean(0) for k in names}
    for stats, reference, what in ((acc.stats, first, "step, reference='first'"),
                                   (acc2.stats, acc.stats.mean, "observe, reference='last'")):
        assert stats.n == flat.shape[0], what
        close(stats.inner_products, flat @ torch.cat([reference[k].reshape(-1) for k in names]), what)
        close(noise.inner_product_test(stats).statistic,
              noise.inner_product_test(persample.GradStats.from_per_example(
                  {k: torch.cat([g[k] for g in grads]) for k in names}, stats.losses, reference=reference)).statistic,
              f"inner-product test, {what}")


@scenario(2)
def tracker_refuses_a_ddp_comm_hook_and_restores_grads():
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    model = ddp(mlp(seed=8))
    model.register_comm_hook(None, default_hooks.allreduce_hook)
    tracker = persample.Tracker(model, F.cross_entropy)
    x, y, _, _ = local_batches(1)[0]
    try:
        tracker.step(x, y)
    except persample.UnsupportedModelError as err:
        assert "communication hook" in str(err) and "Tracker.observe" in str(err), err
    else:
        raise AssertionError("no error for a DDP comm hook")
    assert all(p.grad is None for p in model.parameters())


@scenario(2)
def tracker_refusals_under_ddp_name_the_fix():
    model = ddp(mlp(seed=8))
    try:
        persample.Tracker(model, F.cross_entropy, distributed=False)
    except ValueError as err:
        assert "drift apart" in str(err) and "ddp.module" in str(err), err
    else:
        raise AssertionError("no error for distributed=False with a DDP wrapper")
    x, y, _, _ = local_batches(1)[0]
    try:
        persample.grad_stats(model, F.cross_entropy, x, y)
    except persample.UnsupportedModelError as err:
        assert "ddp_model.module" in str(err) and "all_reduce_stats" in str(err), err
    else:
        raise AssertionError("grad_stats accepted a DDP wrapper")
    tracker = persample.Tracker(model, F.cross_entropy, inner_products=True)
    try:
        with tracker.observe(y):
            pass
    except ValueError as err:
        assert "global mean" in str(err) and "tracker.step" in str(err), err
    else:
        raise AssertionError("observe gave inner products under DDP")


@scenario(2)
def tracker_refuses_ddp_mixed_precision_and_leaves_grads():
    """README: DDP's mixed_precision is refused by step (it averages gradients itself and would not apply it)."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.nn.parallel.distributed import _MixedPrecision

    from persample._data_parallel import _refuse_custom_reduction
    model = DistributedDataParallel(mlp(seed=8, dtype=torch.float32),
                                    mixed_precision=_MixedPrecision(param_dtype=torch.bfloat16))
    tracker = persample.Tracker(model, F.cross_entropy)
    x, y, _, _ = local_batches(1)[0]
    x = x.float()
    try:
        tracker.step(x, y)
    except persample.UnsupportedModelError as err:
        assert err.code == "DDP_MIXED_PRECISION", err
    except RuntimeError as err:   # on the CPU, DDP's own forward with mixed_precision cannot run (no events)
        assert "doesn't support events" in str(err), err
    else:
        raise AssertionError("no error for DDP(mixed_precision=...)")
    assert all(p.grad is None for p in model.parameters()) and tracker.steps == 0
    try:   # the refusal itself, also on the CPU
        _refuse_custom_reduction(model)
    except persample.UnsupportedModelError as err:
        assert err.code == "DDP_MIXED_PRECISION" and "torch.autocast" in str(err), err
    else:
        raise AssertionError("no refusal of DDP(mixed_precision=...)")


@scenario(2)
def gradstats_refuses_dtensors():
    """README: GradStats refuses DTensors, so printing one can never start collectives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    _, world = rank_world()
    mesh = init_device_mesh("cpu", (world,))
    rows = torch.randn(4, 3, dtype=torch.float64)
    try:
        persample.GradStats(n=4, mean={"w": distribute_tensor(rows.mean(0), mesh, [Replicate()])},
                            m2={"w": rows.var(0) * 3},
                            param_sq_norms={"w": rows.pow(2).sum(1)}, losses=torch.zeros(4, dtype=torch.float64))
    except TypeError as err:
        assert "DTensors" in str(err) and "to_local" in str(err), err
    else:
        raise AssertionError("GradStats kept a DTensor")


# ------------------------------------------------------------------------------ FSDP


@scenario(2)
def fsdp2_is_refused_clearly():
    from torch.distributed.fsdp import fully_shard
    model = mlp(seed=9)
    fully_shard(model)
    x, y, _, _ = local_batches(1)[0]
    for call in (lambda: persample.grad_stats(model, F.cross_entropy, x, y),
                 lambda: persample.per_sample_grads(model, F.cross_entropy, x, y),
                 lambda: persample.check_mean(model, F.cross_entropy, x, y),
                 lambda: persample.Tracker(model, F.cross_entropy)):
        try:
            call()
        except persample.UnsupportedModelError as err:
            assert "FSDP2" in str(err) and "fully_shard" in str(err) and "DistributedDataParallel" in str(err), err
        else:
            raise AssertionError("FSDP2 was not refused")


@scenario(2)
def fsdp1_is_refused_clearly():
    from torch.distributed.fsdp import FullyShardedDataParallel
    model = FullyShardedDataParallel(mlp(seed=9), use_orig_params=True, device_id=torch.device("cpu"))
    x, y, _, _ = local_batches(1)[0]
    for target, call in [(t, c) for t in (model, model.module) for c in (persample.grad_stats, persample.check_mean)]:
        try:
            call(target, F.cross_entropy, x, y)
        except persample.UnsupportedModelError as err:
            assert "FSDP1" in str(err), err
        else:
            raise AssertionError("FSDP1 was not refused")


# ------------------------------------------------------------------------------ driver


def _write(out_dir: str, rank: int, results: dict) -> None:
    """This rank's results so far (atomically): the driver reads them while the run goes on, to give each
    scenario its own time budget; an empty file says that gloo's initialisation is done."""
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(path + ".tmp", path)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = rank_world()
    results = {}
    _write(out_dir, rank, results)
    for name, (fn, worlds) in SCENARIOS.items():
        if world not in worlds:
            continue
        torch.manual_seed(0)   # every scenario starts from the same RNG state, whatever ran before it
        try:
            fn()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            results[name] = traceback.format_exc()
        _write(out_dir, rank, results)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
