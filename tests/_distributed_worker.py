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
import math
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
from persample.distributed import all_reduce_stats, inner_products_with, reduce_scatter_stats  # noqa: E402

SCENARIOS: dict[str, tuple] = {}
#: batch sizes per rank of the statistics scenarios, by world size: equal for 2, unequal for 3
SPLITS = {2: [4, 4], 3: [2, 5, 3]}


def scenario(*worlds, suite="ddp"):
    """Register a scenario for these world sizes, in a suite (``ddp``: test_distributed.py, ``fsdp``:
    test_fsdp.py; the environment's PERSAMPLE_SUITE picks the suite a run executes)."""

    def register(fn):
        SCENARIOS[fn.__name__] = (fn, worlds)
        SUITES[fn.__name__] = suite
        return fn

    return register


SUITES: dict[str, str] = {}


def rank_world():
    return dist.get_rank(), dist.get_world_size()


#: None: the MLP takes one vector per example; an int T: T positions per example, averaged at the end
#: (``on_sequences``), where the statistics form every g_i of the Linear maps and, under FSDP2, the
#: Tracker skips their weight-gradient products
POSITIONS: int | None = None


class MeanOverPositions(nn.Module):
    def forward(self, x):
        return x.mean(1)


@contextlib.contextmanager
def on_sequences(positions=4):
    """The MLP scenarios run inside on T = ``positions`` positions per example."""
    global POSITIONS
    POSITIONS = positions
    try:
        yield
    finally:
        POSITIONS = None


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers, *([MeanOverPositions()] if POSITIONS else [])).to(dtype)


def global_batch(n, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if POSITIONS is None else (n, POSITIONS, 5)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def my_slice(sizes):
    rank, _ = rank_world()
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def oracle_stats(model, loss_fn, x, y):
    """Mean, unbiased variance and squared norms from a float64 loop of autograd (independent of persample)."""
    params = dict(model.named_parameters())
    rows = [
        torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), list(params.values()))
        for i in range(x.shape[0])
    ]
    grads = {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(params)}
    flat = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], 1)
    return {
        "mean": {n: g.mean(0) for n, g in grads.items()},
        "var": {n: g.var(0) for n, g in grads.items()},
        "sq_norms": flat.pow(2).sum(1),
    }


def close(a, b, what, rtol=1e-9, atol=1e-12):
    a, b = (
        torch.as_tensor(v, dtype=torch.float64) if not isinstance(v, torch.Tensor) or v.dim() == 0 else v
        for v in (a, b)
    )
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
        rs = slice(sum(sizes[:r]), sum(sizes[: r + 1]))
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
    grads = persample.per_sample_grads(model, loss, x, y)
    whole = persample.GradStats.from_per_example(
        grads, persample.grad_stats(model, loss, x, y).losses, reference=reference
    )
    s = my_slice(sizes)
    local = persample.GradStats.from_per_example(
        {k: v[s] for k, v in grads.items()}, whole.losses[s], reference={k: v.clone() for k, v in reference.items()}
    )
    reduced = all_reduce_stats(local)
    close(reduced.inner_products, whole.inner_products, "inner_products")
    # a reference that differs on one rank drops them (as merge does), on every rank
    rank, _ = rank_world()
    if rank == world - 1:
        local = dataclasses.replace(local, reference={k: v + 1 for k, v in local.reference.items()})
    dropped = all_reduce_stats(local)
    assert dropped.inner_products is None and dropped.reference is None


@scenario(2, 3)
def all_reduce_gradients_is_the_mean_over_ranks_with_none_as_zero():
    from persample.distributed import all_reduce_gradients

    rank, world = rank_world()
    params = {n: nn.Parameter(torch.zeros(s, dtype=torch.float64)) for n, s in (("a", 3), ("b", 2), ("c", 4))}
    grads = {
        r: {"a": torch.arange(3.0, dtype=torch.float64) * (r + 1), "b": torch.full((2,), 1.0 + r, dtype=torch.float64)}
        for r in range(world)
    }
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
    tracker = persample.Tracker(tracked.module if wrap_module else tracked, loss, every=every, check_every=check_every)
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
            with contextlib.nullcontext() if last else tracked.no_sync():
                tracker.step(x, y)
            with contextlib.nullcontext() if last else plain.no_sync():
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
    close(noise.inner_product_test(stats).statistic, noise.inner_product_test(whole).statistic, "inner-product test")


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
            with tracked.no_sync() if i == 0 else contextlib.nullcontext():
                tracker.step(x, y, scale=0.5)
    with tracker.accumulate(reference="last") as acc2:
        for x, y, _, _ in batches:
            with tracker.observe(y):
                (loss(tracked(x), y) * 0.5).backward()
    grads = [persample.per_sample_grads(mlp(seed=9), loss, gx, gy) for _, _, gx, gy in batches]
    names = list(grads[0])
    flat = torch.cat([torch.cat([g[k].reshape(len(g[k]), -1) for k in names], 1) for g in grads])
    first = {k: grads[0][k].mean(0) for k in names}
    for stats, reference, what in (
        (acc.stats, first, "step, reference='first'"),
        (acc2.stats, acc.stats.mean, "observe, reference='last'"),
    ):
        assert stats.n == flat.shape[0], what
        close(stats.inner_products, flat @ torch.cat([reference[k].reshape(-1) for k in names]), what)
        close(
            noise.inner_product_test(stats).statistic,
            noise.inner_product_test(
                persample.GradStats.from_per_example(
                    {k: torch.cat([g[k] for g in grads]) for k in names}, stats.losses, reference=reference
                )
            ).statistic,
            f"inner-product test, {what}",
        )


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


# ------------------------------------------------------------------------------ one outcome


def _train_catching(model, tracker, batches, bad_step=None):
    """A user's loop that catches Tracker.step's errors and steps the optimizer anyway; returns
    [(step, error type)] and checks after every step that the replicas are identical."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    raised = []
    for step, (x, y, _, _) in enumerate(batches):
        opt.zero_grad()
        try:
            tracker.step(x, y if step != bad_step else y[:-1])
        except Exception as err:  # noqa: BLE001 - the user's loop goes on
            raised.append((step, type(err).__name__))
        opt.step()
        assert_replicas_identical(model, f"after step {step}")
    return raised


@scenario(2, 3)
def a_hook_raising_on_one_rank_raises_on_every_rank_and_replicas_stay_equal():
    rank, world = rank_world()
    model = ddp(mlp(seed=12))
    tracker = persample.Tracker(model, F.cross_entropy)

    calls = []

    def logger(t, stats):  # rank 1's logger fails once, on the third call
        calls.append(t.steps)
        if rank == 1 and len(calls) == 3:
            raise RuntimeError("the logger failed")

    tracker.register_hook(logger)
    raised = _train_catching(model, tracker, local_batches(4, seed=51))
    assert raised == [(2, "RuntimeError" if rank == 1 else "OtherRankFailed")], raised
    assert tracker.steps == 3 and tracker.last_stats.n == sum(SPLITS[world])  # the failed step was undone


@scenario(2, 3)
def bad_input_on_one_rank_raises_on_every_rank_without_a_hang():
    rank, world = rank_world()
    model = ddp(mlp(seed=13))
    tracker = persample.Tracker(model, F.cross_entropy, every=2)
    batches = local_batches(4, seed=61)
    raised = _train_catching(model, tracker, batches, bad_step=2 if rank == world - 1 else None)
    assert raised == [(2, "ValueError" if rank == world - 1 else "OtherRankFailed")], raised


@scenario(2)
def observe_error_on_one_rank_raises_on_every_rank():
    rank, _ = rank_world()
    model = ddp(mlp(seed=14))
    tracker = persample.Tracker(model, F.cross_entropy)
    x, y, _, _ = local_batches(1, seed=71)[0]
    try:  # rank 1 declares a reduction its loss does not have: ObservationError after the backward
        with tracker.observe(y, reduction="sum" if rank == 1 else None):
            F.cross_entropy(model(x), y).backward()
    except Exception as err:  # noqa: BLE001
        expected = "ObservationError" if rank == 1 else "OtherRankFailed"
        assert type(err).__name__ == expected, (type(err).__name__, err)
        if rank != 1:
            assert err.code == "OTHER_RANK_FAILED", err
    else:
        raise AssertionError("no error on this rank")
    model.zero_grad()
    with tracker.observe(y) as obs:  # the next block works on every rank
        F.cross_entropy(model(x), y).backward()
    assert obs.stats is not None and obs.stats.n == sum(SPLITS[2])


def _raises_on_every_rank(call, what, expected):
    """``call()`` raises on every rank: ``expected`` is {rank: error type name} (default OtherRankFailed);
    an ``EMPTY_RANK`` refusal is checked by its code, the same on every rank."""
    rank, _ = rank_world()
    try:
        call()
    except Exception as err:  # noqa: BLE001 - checked below
        want = expected.get(rank, "OtherRankFailed")
        got = getattr(err, "code", None) if want == "EMPTY_RANK" else type(err).__name__
        assert got == want, (what, rank, type(err).__name__, str(err)[:400])
        if want == "EMPTY_RANK":
            assert "rank 1 of" in str(err) and "has no examples" in str(err), (what, str(err))
        return err
    raise AssertionError(f"{what}: no error on rank {rank}")


@scenario(2, 3)
def ddp_a_rank_with_no_examples_is_refused_on_every_rank_without_a_hang():
    """Rank 1 has no examples (2 ranks: [3, 0]; 3 ranks: [2, 0, 3]). Tracker.step (a statistics step and a
    plain step through DDP's own backward) and Tracker.observe raise EMPTY_RANK on EVERY rank, naming rank 1,
    before DDP's all-reduce (the scenario's gloo timeout bounds it; before, observe raised on rank 1 only
    and the others waited in DDP's backward until gloo's timeout); p.grad is unchanged, the empty rank's
    observe block does not run; then a step with examples everywhere is exact and the replicas equal."""
    rank, world = rank_world()
    sizes = {2: [3, 0], 3: [2, 0, 3]}[world]
    loss = F.cross_entropy
    model = ddp(mlp(seed=34))
    gx, gy = global_batch(sum(sizes), seed=195)
    x, y = gx[my_slice(sizes)], gy[my_slice(sizes)]
    tracker = persample.Tracker(model, loss)
    plain = persample.Tracker(model, loss, every=2)
    plain.steps = 1  # a step without statistics: DDP's own forward and backward
    body = []

    def observed():
        with tracker.observe(y):
            body.append(1)
            loss(model(x), y).backward()

    everyone = {r: "EMPTY_RANK" for r in range(world)}
    for what, call in (("Tracker.step", lambda: tracker.step(x, y)), ("plain step", lambda: plain.step(x, y))):
        _raises_on_every_rank(call, what, everyone)
        assert all(p.grad is None for p in model.parameters()), f"{what}: p.grad changed"
    _raises_on_every_rank(observed, "Tracker.observe", everyone)
    assert all(p.grad is None for p in model.parameters()), "observe: p.grad changed"
    assert (not body) if rank == 1 else body == [1], body
    assert tracker.steps == 0 and plain.steps == 1 and tracker.last_stats is None
    x, y, gx, gy = local_batches(1, seed=197)[0]
    stats = tracker.step(x, y)
    whole = oracle_stats(mlp(seed=34), loss, gx, gy)
    close_dicts(stats.mean, whole["mean"], "mean after the refusals")
    close_dicts(stats.var, whole["var"], "var after the refusals")
    model.zero_grad()
    with tracker.observe(y) as obs:
        loss(model(x), y).backward()
    close_dicts(obs.stats.mean, whole["mean"], "observed mean after the refusals")
    assert_replicas_identical(model, "after the refusals")


def assert_grads_identical(model, what):
    """p.grad (NaN included) is the same on every rank."""
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None] + [torch.zeros(1)])
    everyone = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, grads)
    for r, g in enumerate(everyone):
        assert torch.equal(g.isnan(), grads.isnan()) and torch.equal(g.nan_to_num(), grads.nan_to_num()), (
            f"{what}: rank {r}'s p.grad differs from this rank's"
        )


def _flaky_loss(fail):
    """cross_entropy that raises while ``fail[0]`` is set (a loss that fails on one rank's batch)."""

    def loss(out, y):
        if fail[0]:
            raise RuntimeError("the loss failed on this rank")
        return F.cross_entropy(out, y)

    return loss


@scenario(2, 3)
def ddp_one_rank_failing_in_each_way_gives_one_outcome_and_equal_replicas():
    """The sweep: under DDP, Tracker.step (a statistics step, and a plain step through DDP's own backward)
    and Tracker.observe, with ONE rank (the last) failing in each way a user's data or code can: an input
    of the wrong dtype (its forward raises), a batch whose targets do not match its inputs, a NaN in one
    example, a loss that raises, a hook that raises. Every rank raises (the failed rank its own error, the
    others OtherRankFailed), or every rank returns the same outcome (NaN: the step is skipped everywhere);
    none waits (the scenario's gloo timeout bounds each); the user's loop catches the error and steps the
    optimizer, and the replicas stay identical. Before, a plain step and observe left the other ranks
    waiting in DDP's all-reduce for a forward or loss that raised on one rank."""
    rank, world = rank_world()
    bad_rank = world - 1
    fail = [False]
    model = ddp(mlp(seed=36))
    loss = _flaky_loss(fail)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trackers = {"step": persample.Tracker(model, loss), "plain": persample.Tracker(model, loss, every=2)}
    trackers["plain"].steps = 1
    hooked = []

    def hook(t, stats):
        if hooked and rank == bad_rank:
            raise RuntimeError("the hook failed on this rank")

    for t in trackers.values():
        t.register_hook(hook)
    x, y, _, _ = local_batches(1, seed=199)[0]
    own = {"dtype": "RuntimeError", "targets": "ValueError", "loss": "RuntimeError", "hook": "RuntimeError"}
    entries = ("step", "plain", "observe")
    for way in ("dtype", "targets", "nan", "loss", "hook"):
        for entry in entries:
            if way == "hook" and entry == "plain":
                continue  # a plain step calls no hook
            bad = rank == bad_rank
            xb = x.float() if bad and way == "dtype" else x.clone()
            if bad and way == "nan":
                xb[1, 0] = float("nan")
            yb = y[:-1] if bad and way == "targets" else y
            fail[0] = bad and way == "loss"
            hooked[:] = [1] if way == "hook" else []
            opt.zero_grad()
            what = f"{entry}, {way} on rank {bad_rank}"
            expected = {bad_rank: own[way]} if way in own else None
            if way == "targets" and entry == "observe":
                expected = {bad_rank: "ObservationError"}  # observe reads the batch size from the targets
            if entry == "observe":
                tracker = trackers["step"]

                def call(tracker=tracker, xb=xb, yb=yb):
                    with tracker.observe(yb) as obs:
                        loss(model(xb), y).backward()
                    return obs.stats
            else:

                def call(tracker=trackers[entry], xb=xb, yb=yb):
                    return tracker.step(xb, yb)

            if expected is None:  # NaN in one example of one rank: no statistics for this step, anywhere
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    assert call() is None, what
            else:
                _raises_on_every_rank(call, what, expected)
            fail[0] = False
            assert_grads_identical(model, what)
            if way != "nan":  # (a NaN gradient, the same on every replica, would make every parameter NaN)
                opt.step()
            assert_replicas_identical(model, f"after {what}")
    hooked.clear()
    opt.zero_grad()
    stats = trackers["step"].step(x, y)
    assert stats is not None and stats.n == sum(SPLITS[world])
    assert_replicas_identical(model, "after the sweep")


@scenario(2, 3)
def grad_stats_and_all_reduce_stats_agree_before_the_reduction():
    """grad_stats is this rank's own computation (no collective); all_reduce_stats is a collective. A rank
    whose grad_stats raises (no examples, a bad input) would leave the others waiting in all_reduce_stats:
    ``persample.distributed.agree`` in between (docs/ranks.md) makes every rank raise instead."""
    from persample.distributed import agree

    rank, world = rank_world()
    model, loss = mlp(seed=37), F.cross_entropy
    x, y, gx, gy = local_batches(1, seed=201)[0]
    for way in ("empty", "dtype", "none"):
        bad = rank == world - 1 and way != "none"
        xb, yb = (x[:0], y[:0]) if bad and way == "empty" else (x.float() if bad else x, y)
        failure = local = None
        try:
            local = persample.grad_stats(model, loss, xb, yb)
        except Exception as err:  # noqa: BLE001 - agreed on below
            failure = err
        try:
            agree(failure, where="grad_stats")
            reduced = all_reduce_stats(local)
        except Exception as err:  # noqa: BLE001
            assert way != "none", err
            assert type(err).__name__ == ("OtherRankFailed" if rank != world - 1 else type(failure).__name__), err
        else:
            assert way == "none", f"{way}: no error on rank {rank}"
            close_dicts(reduced.mean, oracle_stats(mlp(seed=37), loss, gx, gy)["mean"], "mean")


class ScaledByPosition(nn.Module):
    """An MLP whose hidden activations are scaled by their position in the batch, ``h * arange(B)``,
    where the batch is marked (its first input's first feature above 50): a position effect that no op
    mixes rows for (docs/spot-check.md), present only in the marked ranks' batches."""

    def __init__(self, seed):
        super().__init__()
        self.net = mlp(seed)

    def forward(self, x):
        h = torch.tanh(self.net[0](x))
        if bool(x[0, 0] > 50):
            h = h * torch.arange(1, h.shape[0] + 1, dtype=h.dtype)[:, None]
        return self.net[2](h)


def _marked_batch(marked, seed):
    """This rank's batch and the global one, the last rank's first example marked where ``marked``."""
    _, world = rank_world()
    x, y, gx, gy = local_batches(1, seed=seed)[0]
    gx = gx.clone()
    if marked:
        gx[sum(SPLITS[world][:-1]), 0] = 100.0
    return gx[my_slice(SPLITS[world])], y, gx, gy


@scenario(2, 3)
def ddp_observe_runs_the_spot_check_on_the_module():
    """Tracker.observe under DDP runs the spot check against the definition (each example alone) on
    ddp.module, from the inputs of the observed forward. Before, observe watched the DDP wrapper's output
    and skipped the check, so a position-dependent forward gave the global statistics of a wrong
    per-example gradient, silently. Now every rank whose batch has the effect raises
    EXAMPLE_DIFFERS_ALONE and the others OtherRankFailed (only the last rank's data is marked);
    on_refusal='skip' skips the step on every rank. p.grad stays DDP's own average (the check's
    torch.autograd.grad on ddp.module does not fire DDP's reducer), the replicas stay equal, and
    Tracker.step (engine='auto': vmap on the marked rank) gives the definition's global statistics."""
    rank, world = rank_world()
    loss = F.cross_entropy

    def make():
        return ddp(ScaledByPosition(seed=38))

    observed, plain = make(), make()
    tracker = persample.Tracker(observed, loss)
    opt = torch.optim.SGD(observed.parameters(), lr=0.1)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    x, y, gx, gy = _marked_batch(True, seed=203)

    def observe(tracker=tracker):
        with tracker.observe(y) as obs:
            loss(observed(x), y).backward()
        return obs

    err = _raises_on_every_rank(observe, "observe, a position effect on the last rank", {world - 1: "NotExact"})
    if rank == world - 1:
        assert err.code == "EXAMPLE_DIFFERS_ALONE", err
    else:  # the other ranks' OtherRankFailed names the refusal the failed rank raised
        assert f"rank {world - 1}: EXAMPLE_DIFFERS_ALONE" in str(err), str(err)
    loss(plain(x), y).backward()
    for (n, a), b in zip(observed.named_parameters(), plain.parameters()):
        close(a.grad, b.grad, f"p.grad of {n} after the refused observe (DDP's own)")
    opt.step()
    opt_plain.step()
    assert_replicas_identical(observed, "after the refused observe and the optimizer's step")
    observed.zero_grad()
    plain.zero_grad()
    skipping = persample.Tracker(observed, loss, on_refusal="skip")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SkippedStatisticsWarning)
        obs = observe(skipping)
    assert obs.stats is None and obs.skipped and skipping.skipped == [0], (obs.stats, skipping.skipped)
    # the definition's global statistics: Tracker.step (engine="auto") and a float64 loop over every example
    observed.zero_grad()
    stats = persample.Tracker(observed, loss).step(x, y)
    reference = ScaledByPosition(seed=38)
    reference.load_state_dict(observed.module.state_dict())
    whole = oracle_stats(reference, loss, gx, gy)  # one example at a time: each example alone
    close_dicts(stats.mean, whole["mean"], "Tracker.step's global mean")
    close_dicts(stats.var, whole["var"], "Tracker.step's global var")
    # where no rank's batch has the effect, the check passes and the observed statistics are the oracle's
    fresh, twin = make(), make()
    x, y, gx, gy = _marked_batch(False, seed=205)
    with persample.Tracker(fresh, loss).observe(y) as obs:
        loss(fresh(x), y).backward()
    loss(twin(x), y).backward()
    for (n, a), b in zip(fresh.named_parameters(), twin.parameters()):
        close(a.grad, b.grad, f"p.grad of {n} after a checked observe (the check fired no reducer)")
    whole = oracle_stats(ScaledByPosition(seed=38), loss, gx, gy)
    close_dicts(obs.stats.mean, whole["mean"], "observed global mean, checked")
    fresh.zero_grad()
    loss(fresh(x), y).backward()  # DDP's next iteration: no pending reduction left by the check
    assert_replicas_identical(fresh, "after a checked observe")


@scenario(2)
def tracker_refuses_ddp_mixed_precision_and_leaves_grads():
    """README: DDP's mixed_precision is refused by step (it averages gradients itself and would not apply it)."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.nn.parallel.distributed import _MixedPrecision

    from persample._data_parallel import _refuse_custom_reduction

    model = DistributedDataParallel(
        mlp(seed=8, dtype=torch.float32), mixed_precision=_MixedPrecision(param_dtype=torch.bfloat16)
    )
    tracker = persample.Tracker(model, F.cross_entropy)
    x, y, _, _ = local_batches(1)[0]
    x = x.float()
    try:
        tracker.step(x, y)
    except persample.UnsupportedModelError as err:
        assert err.code == "DDP_MIXED_PRECISION", err
    except RuntimeError as err:  # on the CPU, DDP's own forward with mixed_precision cannot run (no events)
        assert "doesn't support events" in str(err), err
    else:
        raise AssertionError("no error for DDP(mixed_precision=...)")
    assert all(p.grad is None for p in model.parameters()) and tracker.steps == 0
    try:  # the refusal itself, also on the CPU
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
        persample.GradStats(
            n=4,
            mean={"w": distribute_tensor(rows.mean(0), mesh, [Replicate()])},
            m2={"w": rows.var(0) * 3},
            param_sq_norms={"w": rows.pow(2).sum(1)},
            losses=torch.zeros(4, dtype=torch.float64),
        )
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
    for call in (
        lambda: persample.per_sample_grads(model, F.cross_entropy, x, y),
        lambda: persample.check_mean(model, F.cross_entropy, x, y),
    ):
        try:
            call()
        except persample.UnsupportedModelError as err:
            assert "FSDP2" in str(err) and "fully_shard" in str(err) and "DistributedDataParallel" in str(err), err
            assert "persample.Tracker(fsdp_model, loss_fn)" in str(err), err  # the fix that works (tested in test_fsdp)
        else:
            raise AssertionError("FSDP2 was not refused")
    persample.Tracker(model, F.cross_entropy)  # supported (test_fsdp.py)


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


# ------------------------------------------------------------------------------ FSDP2


def oracle(model, loss, x, y):
    """The float64 oracle on one process: a Python loop of autograd, one example at a time."""
    rows, losses = [], []
    params = dict(model.named_parameters())
    for i in range(len(x)):
        li = loss(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(li, list(params.values()))
        rows.append({k: g.detach() for k, g in zip(params, grads)})
        losses.append(li.detach())
    g = {k: torch.stack([r[k] for r in rows]) for k in params}
    return oracle_from_rows(g, torch.stack(losses))


def oracle_from_rows(g, losses):
    """The oracle's fields from per-example gradients ``g[name]: [n, *shape]`` (one process, float64)."""
    n = len(losses)
    return dict(
        n=n,
        mean={k: v.mean(0) for k, v in g.items()},
        var={k: v.var(0, unbiased=True) for k, v in g.items()},
        param_sq_norms={k: v.reshape(n, -1).pow(2).sum(1) for k, v in g.items()},
        losses=losses,
        grads=g,
    )


def rows_of(stats, name, full):
    """This rank's rows of a full-size tensor when ``stats`` is sharded (FSDP2), else ``full``."""
    if stats.shard is None:
        return full
    start, stop = stats.shard.rows[name]
    return full[start:stop]


def same_number(a, b, what, rtol=1e-9, atol=1e-12):
    if math.isnan(a) or math.isnan(b):
        assert math.isnan(a) and math.isnan(b), (what, a, b)
    elif math.isinf(a) or math.isinf(b):
        assert a == b, (what, a, b)
    else:
        assert abs(a - b) <= atol + rtol * abs(b), f"{what}: {a!r} vs {b!r}"


def check_sharded_scalars(stats, expected, what, model=None, rtol=1e-9, loose=()):
    """A sharded record (FSDP2): its layout is FSDP2's own (``p.to_local()`` rows), and every scalar
    (‖ḡ‖², tr Σ, the noise scale, GSNR, diagnostics per layer) equals one process's statistics of the
    concatenated batch, built from the oracle's per-example gradients. Diagnostics keys containing a
    word of ``loose`` are only required to be finite (see the GPT-2 scenario)."""
    _, world = rank_world()
    assert stats.shard is not None and stats.shard.world == world, (what, stats.shard)
    if model is not None:
        for name, p in model.named_parameters():
            local = p.to_local().shape
            assert stats.mean[name].shape == local, (what, name, stats.mean[name].shape, local)
    reference = stats.reference if stats.inner_products is not None else None
    one = persample.GradStats.from_per_example(expected["grads"], expected["losses"], reference=reference)
    same_number(float(stats.mean_sq_norm), float(one.mean_sq_norm), f"{what}: |mean|^2", rtol=rtol)
    same_number(stats.param_m2_sum(), one.param_m2_sum(), f"{what}: sum of M2", rtol=rtol)
    ours, theirs = noise.gradient_noise_scale(stats), noise.gradient_noise_scale(one)
    for field in ("grad_sq", "trace_cov", "b_simple"):
        same_number(getattr(ours, field), getattr(theirs, field), f"{what}: noise scale {field}", rtol=rtol)
    row, expected_row = noise.diagnostics(stats, per_layer=True), noise.diagnostics(one, per_layer=True)
    bad = []
    for key, value in expected_row.items():
        try:
            if any(word in key for word in loose):
                assert math.isfinite(row[key]) == math.isfinite(value), (what, key, row[key], value)
                continue
            same_number(row[key], value, f"{what}: diagnostics[{key!r}]", rtol=rtol, atol=1e-9)
        except AssertionError as e:
            bad.append(str(e))
    assert not bad, bad
    everyone = [None] * world
    dist.all_gather_object(everyone, [float(stats.mean_sq_norm), stats.shard.sums])
    assert all(e == everyone[0] for e in everyone), f"{what}: the ranks' global sums differ"


def check_against_oracle(stats, expected, what, model=None, loose=()):
    assert stats.n == expected["n"], (what, stats.n, expected["n"])
    for field in ("mean", "var"):
        got = getattr(stats, field)
        assert got.keys() == expected[field].keys(), (what, field, sorted(got), sorted(expected[field]))
        for k in got:
            close(got[k], rows_of(stats, k, expected[field][k]), f"{what}: {field}[{k}]")
    close_dicts(stats.param_sq_norms, expected["param_sq_norms"], f"{what}: param_sq_norms")
    close(stats.losses, expected["losses"], f"{what}: losses")
    close(stats.sq_norms, sum(expected["param_sq_norms"].values()), f"{what}: sq_norms")
    if stats.shard is not None:
        check_sharded_scalars(stats, expected, what, model, loose=loose)


class Checkpointed(nn.Module):
    """A module called through non-reentrant activation checkpointing (torchtitan's default)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, x, use_reentrant=False)


def mlp_like(seed=0, checkpointed=False):
    model = mlp(seed=seed)
    if checkpointed:
        model[0] = Checkpointed(model[0])
    return model


def sharded_mlp(seed, *, nested=True, reshard_after_forward=True, checkpointed=False):
    from torch.distributed.fsdp import fully_shard

    model = mlp_like(seed=seed, checkpointed=checkpointed)
    if nested:
        for layer in (model[0], model[2]):
            fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def assert_grads_equal(a, b, what, rtol=1e-12, atol=1e-14):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert type(p.grad).__name__ == "DTensor", (what, n, type(p.grad))
        close(p.grad.to_local(), q.grad.to_local(), f"{what}: p.grad of {n}", rtol=rtol, atol=atol)


def _fsdp2_tracker_against_fsdp2(observe=False, **shard_options):
    rank, world = rank_world()
    loss = F.cross_entropy
    tracked, plain = sharded_mlp(21, **shard_options), sharded_mlp(21, **shard_options)
    tracker = persample.Tracker(tracked, loss)
    seen = []
    tracker.register_hook(lambda t, stats: seen.append(stats))
    reference = mlp_like(seed=21, checkpointed=shard_options.get("checkpointed", False))
    batches = local_batches(10, seed=91)
    opt_t = torch.optim.AdamW(tracked.parameters(), lr=0.05)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=0.05)
    opt_r = torch.optim.AdamW(reference.parameters(), lr=0.05)
    for step, (x, y, gx, gy) in enumerate(batches):
        expected = oracle(reference, loss, gx, gy)
        for opt in (opt_t, opt_p, opt_r):
            opt.zero_grad()
        if observe:
            with tracker.observe(y) as observed:
                loss(tracked(x), y).backward()
            stats = observed.stats
        else:
            stats = tracker.step(x, y)
        loss(plain(x), y).backward()
        assert_grads_equal(tracked, plain, f"step {step}")
        if not observe:  # on sequences every product is skipped (Σ_i g_i written instead); else none
            names = {n for n, _ in tracked.named_parameters()} if POSITIONS else set()
            assert tracker._fsdp2_skipped == names, (sorted(tracker._fsdp2_skipped), sorted(names))
        check_against_oracle(stats, expected, f"step {step}", model=tracked)
        assert seen[-1] is stats and stats.part_sizes == tuple(SPLITS[world])
        if len(set(SPLITS[world])) == 1:  # equal batches: FSDP2's reduce-scattered p.grad is the mean shard
            for name, p in tracked.named_parameters():
                close(stats.mean[name], p.grad.to_local(), f"step {step}: mean shard of {name} vs FSDP2's p.grad")
        # the reference replica takes DDP's step: the mean over ranks of each rank's mean gradient
        for p in reference.parameters():
            p.grad = None
        sizes = SPLITS[world]
        for r in range(world):
            rs = slice(sum(sizes[:r]), sum(sizes[: r + 1]))
            (loss(reference(gx[rs]), gy[rs]) / world).backward()
        opt_t.step()
        opt_p.step()
        opt_r.step()
    full = torch.cat([p.full_tensor().reshape(-1) for p in tracked.parameters()])
    close(full, flat_params(reference), "parameters after 10 AdamW steps vs DDP's", rtol=1e-10, atol=1e-12)
    everyone = [torch.empty_like(full) for _ in range(world)]
    dist.all_gather(everyone, full)
    assert all(torch.equal(other, full) for other in everyone), "full parameters differ across ranks"
    del rank


@scenario(2, 3, suite="fsdp")
def fsdp2_tracker_step_equals_fsdp2_backward_and_the_oracle():
    _fsdp2_tracker_against_fsdp2()


@scenario(2, suite="fsdp")
def fsdp2_tracker_step_reshard_after_forward_false_root_only():
    _fsdp2_tracker_against_fsdp2(nested=False, reshard_after_forward=False)


@scenario(2, 3, suite="fsdp")
def fsdp2_grad_stats_then_all_reduce_stats_equal_the_oracle():
    _, world = rank_world()
    loss = F.cross_entropy
    model, reference = sharded_mlp(25), mlp(seed=25)
    x, y, gx, gy = local_batches(1, seed=111)[0]
    model(x).sum().backward()  # an existing p.grad, which grad_stats must leave as it was
    before = [p.grad.to_local().clone() for p in model.parameters()]
    local = persample.grad_stats(model, loss, x, y)
    assert all(torch.equal(p.grad.to_local(), b) for p, b in zip(model.parameters(), before)), "p.grad changed"
    mine = persample.grad_stats(reference, loss, x, y, engine="loop")
    close_dicts(local.mean, mine.mean, "this rank's mean")
    close_dicts(local.var, mine.var, "this rank's var")
    close(local.sq_norms, mine.sq_norms, "this rank's norms")
    expected = oracle(reference, loss, gx, gy)
    check_against_oracle(all_reduce_stats(local), expected, "all_reduce_stats")
    assert all_reduce_stats(local).part_sizes == tuple(SPLITS[world])
    sharded = reduce_scatter_stats(local)
    check_against_oracle(sharded, expected, "reduce_scatter_stats", model=model)
    assert sharded.part_sizes == tuple(SPLITS[world])
    import persample.distributed as pd

    rule = pd.sums_by_all_reduce
    assert rule()  # gloo: one all-reduce of the fused buffer; NCCL's path (a reduce-scatter) too, forced:
    pd.sums_by_all_reduce = lambda group=None: False  # type: ignore[assignment]
    try:
        scattered = reduce_scatter_stats(local)
    finally:
        pd.sums_by_all_reduce = rule  # type: ignore[assignment]
    check_against_oracle(scattered, expected, "reduce_scatter_stats through a reduce-scatter", model=model)
    assert scattered.shard.same_layout(sharded.shard) and scattered.part_sizes == sharded.part_sizes
    try:
        persample.grad_stats(model, loss, x, y, clip_norm=1.0)
    except persample.UnsupportedModelError as err:
        assert "clip_norm" in str(err), err
    else:
        raise AssertionError("clip_norm on an FSDP2 model was not refused")


@scenario(2, suite="fsdp")
def fsdp2_mixed_precision_policy_bf16_parameters_fp32_reduction():
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on a float32 model: p.grad is FSDP2's
    own (equal to a plain FSDP2 twin's), and the statistics (kept in float32) are the oracle's on
    the bf16-rounded computation up to bf16 precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def build():
        model = mlp(seed=26, dtype=torch.float32)
        for layer in (model[0], model[2]):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model

    tracked, plain = build(), build()
    loss = F.cross_entropy
    x, y, gx, gy = local_batches(1, seed=121)[0]
    stats = persample.Tracker(tracked, loss).step(x.float(), y)
    loss(plain(x.float()), y).backward()
    assert_grads_equal(tracked, plain, "bf16 parameters", rtol=0, atol=0)
    expected = oracle(mlp(seed=26), loss, gx, gy)  # float64: bf16 rounding is the only difference
    assert stats.mean[next(iter(stats.mean))].dtype == torch.float32
    for k in expected["mean"]:
        close(stats.mean[k].double(), rows_of(stats, k, expected["mean"][k]), f"mean[{k}] (bf16)", rtol=3e-2, atol=3e-2)
    close(stats.sq_norms.double(), sum(expected["param_sq_norms"].values()), "sq_norms (bf16)", rtol=5e-2, atol=1e-2)


@scenario(2, 3, suite="fsdp")
def fsdp2_accumulate_micro_batches():
    """Two micro-batches in tracker.accumulate(): p.grad is FSDP2's own accumulation of the two scaled
    backwards, and the merged statistics are the oracle's on all ranks' examples of both."""
    loss = F.cross_entropy
    tracked, plain, reference = sharded_mlp(27), sharded_mlp(27), mlp(seed=27)
    tracker = persample.Tracker(tracked, loss)
    seen = []
    tracker.register_hook(lambda t, stats: seen.append(stats))
    batches = local_batches(2, seed=141)
    with tracker.accumulate() as acc:
        for x, y, _, _ in batches:
            tracker.step(x, y, scale=0.5)
    for x, y, _, _ in batches:
        (loss(plain(x), y) * 0.5).backward()
    assert_grads_equal(tracked, plain, "accumulated")
    gx = torch.cat([b[2] for b in batches])
    gy = torch.cat([b[3] for b in batches])
    check_against_oracle(acc.stats, oracle(reference, loss, gx, gy), "merged micro-batches", model=tracked)
    assert acc.stats.shard is not None and acc.stats.shard.sums is not None
    assert seen == [acc.stats] and tracker.steps == 1


@scenario(2, 3, suite="fsdp")
def fsdp2_skipped_products_equal_fsdp2_backward():
    """On sequences the statistics form every g_i of the Linear maps, so Tracker.step skips their
    weight-gradient products and writes Σ_i g_i as each unsharded gradient before FSDP2's own
    reduce-scatter: p.grad equal to FSDP2's own backward to 1e-12 (nested and root-only, resharded after
    forward or not, checkpointed, 10 AdamW steps against DDP), accumulated micro-batches with an earlier
    p.grad and scale 0.5, var=False, and a failure on one rank (the deferred gradients dropped everywhere)."""
    with on_sequences():
        _fsdp2_tracker_against_fsdp2()
        _fsdp2_tracker_against_fsdp2(nested=False, reshard_after_forward=False)
        _fsdp2_tracker_against_fsdp2(checkpointed=True)
        fsdp2_accumulate_micro_batches()
        fsdp2_failure_on_one_rank_raises_on_every_rank_and_shards_stay_consistent()
        _regulariser_and_nan_keep_fsdp2s_gradient()
        _s1_from_fsdp2s_reduce_scatter()
    with on_sequences(8):  # without the variance, g_i are formed (for the norms) from T = 8 positions on
        loss = F.cross_entropy
        tracked, plain, reference = sharded_mlp(33), sharded_mlp(33), mlp(seed=33)
        tracker = persample.Tracker(tracked, loss, var=False)
        x, y, gx, gy = local_batches(1, seed=151)[0]
        stats = tracker.step(x, y)
        loss(plain(x), y).backward()
        assert_grads_equal(tracked, plain, "var=False")
        assert tracker._fsdp2_skipped == {n for n, _ in tracked.named_parameters()}
        expected = oracle(reference, loss, gx, gy)
        for k in expected["mean"]:
            close(stats.mean[k], rows_of(stats, k, expected["mean"][k]), f"var=False: mean[{k}]")
        close(stats.sq_norms, sum(expected["param_sq_norms"].values()), "var=False: sq_norms")


@contextlib.contextmanager
def largest_all_reduce():
    """The most elements one ``dist.all_reduce`` was handed while the block ran (``[n]`` on exit)."""
    seen = [0]
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        seen[0] = max(seen[0], tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield seen
    finally:
        dist.all_reduce = original


def _s1_from_fsdp2s_reduce_scatter():
    """A step that starts without p.grad, with every rank's loss weighing its examples by the same c (equal
    batches, a mean): FSDP2's reduce-scatter already summed S1 = Σ_r n_r μ_r into p.grad, so persample's
    one P-sized all-reduce carries S2 alone (about P elements, not 2P; without the variance only the
    per-example rows), and the statistics are still the oracle's. Uneven batches (3 ranks: c = 1/B_r
    differs) or an earlier p.grad: S1 travels as before (2P)."""
    _, world = rank_world()
    loss = F.cross_entropy
    for var in (True, False):
        tracked, plain, reference = sharded_mlp(37), sharded_mlp(37), mlp(seed=37)
        numel = sum(p.numel() for p in reference.parameters())
        tracker = persample.Tracker(tracked, loss, var=var)
        x, y, gx, gy = local_batches(1, seed=171)[0]
        for earlier in (False, True):
            if earlier:
                F.cross_entropy(tracked(x), y).backward()
                F.cross_entropy(plain(x), y).backward()
            with largest_all_reduce() as largest:
                stats = tracker.step(x, y)
            loss(plain(x), y).backward()
            assert_grads_equal(tracked, plain, f"S1 from FSDP2 (var={var}, earlier p.grad: {earlier})")
            expected = oracle(reference, loss, gx, gy)
            what = f"S1 from FSDP2 (var={var}, earlier p.grad: {earlier})"
            if var:
                check_against_oracle(stats, expected, what, model=tracked)
            else:
                for k in expected["mean"]:
                    close(stats.mean[k], rows_of(stats, k, expected["mean"][k]), f"{what}: mean[{k}]")
                close(stats.sq_norms, sum(expected["param_sq_norms"].values()), f"{what}: sq_norms")
            equal = len(set(SPLITS[world])) == 1 and not earlier
            fields = (1 if var else 0) if equal else (2 if var else 1)
            rows = world * (len(list(reference.parameters())) + 1) * max(SPLITS[world])  # the norms and losses
            sums = largest[0] - rows  # the sums' part of the buffer: fields · P, plus the slots' padding
            assert fields * numel <= sums < fields * numel + numel // 2, (what, largest[0], rows, numel, fields)
            for p, q in zip(tracked.parameters(), plain.parameters()):
                p.grad = q.grad = None


def _regulariser_and_nan_keep_fsdp2s_gradient():
    """A loss term that reads a parameter itself (a regulariser) keeps that parameter's product: skipping
    it would drop the term's gradient silently; observe's sum check then refuses the step on every rank
    (OBSERVE_SUM_MISMATCH), with p.grad as it was. A NaN in one example on one rank: no statistics on any
    rank, and p.grad is still FSDP2's own (the skipped products' sums in closed form), NaN for NaN."""
    rank, world = rank_world()
    tracked, plain = sharded_mlp(35), sharded_mlp(35)
    x, y, _, _ = local_batches(1, seed=161)[0]

    def regularised(out, target):
        return F.cross_entropy(out, target) + 0.01 * tracked[0].weight.pow(2).sum()

    tracker = persample.Tracker(tracked, regularised)
    before = [p.grad for p in tracked.parameters()]
    err = _raises_on_every_rank(
        lambda: tracker.step(x, y), "a regulariser", {r: "ObservationError" for r in range(world)}
    )
    assert err.code == "OBSERVE_SUM_MISMATCH" and "0.weight" not in tracker._fsdp2_skipped, (err.code, str(err)[:300])
    assert "2.weight" in tracker._fsdp2_skipped, sorted(tracker._fsdp2_skipped)
    assert all(p.grad is b for p, b in zip(tracked.parameters(), before)), "p.grad changed by a failed step"
    tracker = persample.Tracker(tracked, F.cross_entropy)
    xb = x.clone()
    if rank == world - 1:
        xb[1, 0, 0] = float("nan")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tracker.step(xb, y) is None
    F.cross_entropy(plain(xb), y).backward()
    assert tracker._fsdp2_skipped == {n for n, _ in tracked.named_parameters()}
    for (n, p), q in zip(tracked.named_parameters(), plain.parameters()):
        torch.testing.assert_close(
            p.grad.to_local(), q.grad.to_local(), rtol=1e-12, atol=1e-14, equal_nan=True, msg=lambda m: f"NaN: {n}: {m}"
        )


@scenario(2, 3, suite="fsdp")
def fsdp2_observe_around_the_users_own_backward():
    _fsdp2_tracker_against_fsdp2(observe=True)


@scenario(2, suite="fsdp")
def fsdp2_non_reentrant_checkpointing_step_and_observe():
    _fsdp2_tracker_against_fsdp2(checkpointed=True)
    _fsdp2_tracker_against_fsdp2(checkpointed=True, observe=True, reshard_after_forward=False)


def assert_full_params_identical(model, what):
    full = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(full) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, full)
    assert all(torch.equal(other, full) for other in everyone), f"{what}: full parameters differ across ranks"
    return full


@scenario(2, 3, suite="fsdp")
def fsdp2_failure_on_one_rank_raises_on_every_rank_and_shards_stay_consistent():
    """Rank 1's hook raises once (step 1), the last rank passes a bad batch once (step 3): every rank
    raises within the time limit, undoes the step, and after the loop's optimizer.step() the model is
    the same as one trained without those two steps' gradients."""
    rank, world = rank_world()
    loss = F.cross_entropy
    model, twin = sharded_mlp(23), sharded_mlp(23)
    tracker = persample.Tracker(model, loss)
    calls = []

    def logger(t, stats):
        calls.append(stats.n)
        if rank == 1 and len(calls) == 2:
            raise RuntimeError("the logger failed")

    tracker.register_hook(logger)
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    raised = []
    for step, (x, y, _, _) in enumerate(local_batches(5, seed=97)):
        opt.zero_grad()
        opt_twin.zero_grad()
        bad = step == 3 and rank == world - 1
        try:
            tracker.step(x, y[:-1] if bad else y)
        except Exception as err:  # noqa: BLE001 - the user's loop goes on
            raised.append((step, type(err).__name__))
        if step not in (1, 3):
            loss(twin(x), y).backward()
        opt.step()
        opt_twin.step()
        full = assert_full_params_identical(model, f"after step {step}")
        close(
            full,
            torch.cat([p.full_tensor().reshape(-1) for p in twin.parameters()]),
            f"after step {step}: against the twin without the failed steps",
            rtol=1e-12,
            atol=1e-14,
        )
    expected = [
        (1, "RuntimeError" if rank == 1 else "OtherRankFailed"),
        (3, "ValueError" if rank == world - 1 else "OtherRankFailed"),
    ]
    assert raised == expected, raised
    assert tracker.steps == 3


@scenario(2, 3, suite="fsdp")
def fsdp2_one_rank_failing_in_each_way_gives_one_outcome():
    """The sweep under FSDP2: Tracker.step (a statistics step; a step without statistics) and grad_stats,
    with ONE rank (the last) failing: an input of the wrong dtype (its forward raises), a loss that raises,
    a NaN in one example. Every rank raises (the failed rank its own error, the others OtherRankFailed), or
    every rank has the same outcome (NaN: Tracker.step's statistics are skipped everywhere); none waits and
    none dies. Before, a forward or loss that raised on one rank sent that rank into persample's agreement
    while the others were in FSDP2's reduce-scatter: gloo aborted the process ("collective mismatch").
    After each, the loop's optimizer steps and the full parameters are identical across ranks.
    (A forward that raises on one rank in a step without statistics cannot be agreed on: FSDP2's
    all-gathers run inside the forward; docs/ranks.md.)"""
    rank, world = rank_world()
    bad_rank = world - 1
    fail = [False]
    model = sharded_mlp(39)
    loss = _flaky_loss(fail)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker, plain = persample.Tracker(model, loss), persample.Tracker(model, loss, every=2)
    plain.steps = 1
    x, y, _, _ = local_batches(1, seed=207)[0]
    own = {"dtype": "RuntimeError", "loss": "RuntimeError", "nan": "ValueError"}
    for way in ("dtype", "loss", "nan"):
        for entry in ("step", "plain", "grad_stats"):
            if entry == "plain" and way == "dtype":
                continue  # (FSDP2's all-gathers run inside the forward: not agreed on)
            bad = rank == bad_rank
            xb = x.float() if bad and way == "dtype" else x.clone()
            if bad and way == "nan":
                xb[1, 0] = float("nan")
            fail[0] = bad and way == "loss"
            opt.zero_grad()
            what = f"{entry}, {way} on rank {bad_rank}"
            if entry == "grad_stats":

                def call(xb=xb):
                    return persample.grad_stats(model, loss, xb, y)
            else:

                def call(t=tracker if entry == "step" else plain, xb=xb):
                    return t.step(xb, y)

            if way == "nan" and entry != "grad_stats":  # no statistics for this step, on any rank
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    assert call() is None, what
            else:
                _raises_on_every_rank(call, what, {bad_rank: own[way]})
            fail[0] = False
            if way != "nan":
                opt.step()
            assert_full_params_identical(model, f"after {what}")
    opt.zero_grad()
    stats = tracker.step(x, y)
    assert stats is not None and stats.n == sum(SPLITS[world])


@scenario(2, 3, suite="fsdp")
def fsdp2_shared_reference_gives_global_inner_products_and_tests():
    """accumulate(reference=r) under FSDP2: the inner products <g_i, r> of every example, and the
    inner-product test (<ḡ, r> from the shards' global sums), equal one process's on the concatenated
    batch; with two micro-batches, the merged shards' sums are refreshed."""
    loss = F.cross_entropy
    tracked, reference_model = sharded_mlp(29), mlp(seed=29)
    tracker = persample.Tracker(tracked, loss)
    g = torch.Generator().manual_seed(7)
    ref = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in reference_model.named_parameters()}
    batches = local_batches(2, seed=161)
    with tracker.accumulate(reference=ref) as acc:
        for x, y, _, _ in batches:
            tracker.step(x, y, scale=0.5)
    stats = acc.stats
    gx, gy = torch.cat([b[2] for b in batches]), torch.cat([b[3] for b in batches])
    # the global batch in the order the ranks' rows are gathered: micro-batch 1 of every rank, then 2
    expected = oracle(reference_model, loss, gx, gy)
    check_against_oracle(stats, expected, "shared reference", model=tracked)
    n = expected["n"]
    inner = sum(expected["grads"][k].reshape(n, -1) @ ref[k].reshape(-1) for k in ref)
    close(stats.inner_products, inner, "inner products <g_i, r>")
    one = persample.GradStats.from_per_example(expected["grads"], expected["losses"], reference=ref)
    for test in (noise.inner_product_test, noise.norm_test):
        same_number(test(stats).statistic, test(one).statistic, f"{test.__name__} with a shared reference")


@scenario(2, 3, suite="fsdp")
def fsdp2_var_false_float32_reduces_the_mean_alone():
    """var=False on a float32 model: only the mean's sums travel, in float32; the mean shard, norms and
    ‖ḡ‖² equal the float64 oracle to float32 precision, and there is no M2."""
    from torch.distributed.fsdp import fully_shard

    loss = F.cross_entropy
    model = mlp(seed=30, dtype=torch.float32)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    x, y, gx, gy = local_batches(1, seed=171)[0]
    stats = persample.Tracker(model, loss, var=False).step(x.float(), y)
    expected = oracle(mlp(seed=30), loss, gx, gy)
    assert stats.m2 is None and stats.shard is not None and stats.n == expected["n"]
    for k, mean in stats.mean.items():
        assert mean.dtype == torch.float32 and mean.shape == dict(model.named_parameters())[k].to_local().shape
        close(mean.double(), rows_of(stats, k, expected["mean"][k]), f"mean[{k}] (float32)", rtol=1e-5, atol=1e-6)
    close(stats.sq_norms.double(), sum(expected["param_sq_norms"].values()), "sq_norms (float32)", rtol=1e-5, atol=1e-6)
    full_mean_sq = sum(float(v.pow(2).sum()) for v in expected["mean"].values())
    same_number(float(stats.mean_sq_norm), full_mean_sq, "|mean|^2 (float32)", rtol=1e-5)


@scenario(2, 3, suite="fsdp")
def fsdp2_float32_sums_meet_the_single_process_bound():
    """A float32 model: the statistics' sums travel in float32, as the single-process fast engine
    accumulates them. Targets far from the outputs make the last bias's per-example gradients nearly
    equal (μ²/Var ≈ 1e4), where M2 = S2 − S1²/N would cancel beyond the engine's bound in float32
    (an error of about 1e-3 of Var): those elements are flagged and summed again in float64. Each
    parameter's mean and variance are then as close to the float64 oracle as one process's float32
    grad_stats on the whole batch is (within 4×, or 4e-6 of the
    largest element)."""
    import persample.distributed as pd
    from torch.distributed.fsdp import fully_shard

    _, world = rank_world()
    loss = F.mse_loss
    model = mlp(seed=32, dtype=torch.float32)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    x, _, gx, _ = local_batches(1, seed=181)[0]
    g = torch.Generator().manual_seed(182)
    gy = 100.0 + 0.01 * torch.randn(gx.shape[0], 3, generator=g, dtype=torch.float64)
    y = gy[my_slice(SPLITS[world])]
    calls = []
    exact_at = pd._float64_sums_at
    pd._float64_sums_at = lambda *a, **k: calls.append(1) or exact_at(*a, **k)  # type: ignore[assignment]
    try:
        with largest_all_reduce() as largest:
            stats = persample.Tracker(model, loss).step(x.float(), y.float())
    finally:
        pd._float64_sums_at = exact_at  # type: ignore[assignment]
    # equal batches (2 ranks): S1 is FSDP2's reduce-scattered p.grad, so the fused all-reduce holds S2 alone
    # (P sums, plus the per-example rows), and the lowered limit flags what R's rounding could push past it
    numel = sum(p.numel() for p in mlp(seed=32).parameters())
    rows = world * (len(list(model.parameters())) + 1) * max(SPLITS[world])
    fields = 1 if len(set(SPLITS[world])) == 1 else 2
    assert fields * numel <= largest[0] - rows < fields * numel + numel // 2, (largest[0], rows, numel, fields)
    expected = oracle(mlp(seed=32), loss, gx, gy)
    one = persample.grad_stats(mlp(seed=32, dtype=torch.float32), loss, gx.float(), gy.float())
    for field in ("mean", "var"):
        for k, got in getattr(stats, field).items():
            assert got.dtype == torch.float32, (field, k, got.dtype)
            want = expected[field][k]
            bound = float((getattr(one, field)[k].double() - want).abs().max())  # what one process meets
            error = float((got.double() - rows_of(stats, k, want)).abs().max()) if got.numel() else 0.0
            limit = 4 * max(bound, 1e-6 * float(want.abs().max()))
            assert error <= limit, f"{field}[{k}]: error {error:.3g}, one process's {bound:.3g}, limit {limit:.3g}"
    assert calls, "no element was flagged: the test no longer covers the float64 path"
    same_number(stats.param_m2_sum(), one.param_m2_sum(), "sum of M2 (float32)", rtol=1e-5)
    same_number(float(stats.mean_sq_norm), float(one.mean_sq_norm), "|mean|^2 (float32)", rtol=1e-5)
    # with a shared reference r: the flagged elements' share of <mean, r> and |r - mean|^2 is added on
    # every rank alike
    g = torch.Generator().manual_seed(183)
    ref = {k: torch.randn(v.shape, generator=g) for k, v in expected["mean"].items()}
    calls.clear()
    pd._float64_sums_at = lambda *a, **k: calls.append(1) or exact_at(*a, **k)  # type: ignore[assignment]
    try:
        with_ref = reduce_scatter_stats(persample.grad_stats(model, loss, x.float(), y.float(), reference=ref))
    finally:
        pd._float64_sums_at = exact_at  # type: ignore[assignment]
    assert calls and with_ref.reference is not None
    names = with_ref.names
    products = [expected["mean"][k] * ref[k].double() for k in names]
    dot, size = sum(float(v.sum()) for v in products), sum(float(v.abs().sum()) for v in products)
    diff = sum(float((ref[k].double() - expected["mean"][k]).pow(2).sum()) for k in names)
    same_number(with_ref.shard.total("ref_dot", names), dot, "<mean, r> (float32)", rtol=0, atol=1e-5 * size)
    same_number(with_ref.shard.total("ref_diff_sq", names), diff, "|r - mean|^2 (float32)", rtol=1e-5)
    everyone = [None] * world
    dist.all_gather_object(everyone, with_ref.shard.sums)
    assert all(e == everyone[0] for e in everyone), "the ranks' global sums differ"


@scenario(2, 3, suite="fsdp")
def fsdp2_a_rank_with_no_examples_is_refused_on_every_rank_without_a_hang():
    """Uneven batches where one rank's share is empty (B_r = 0): a statistics step (Tracker.step,
    observe, grad_stats) raises the refusal FSDP2_EMPTY_RANK on EVERY rank, naming the empty rank,
    before any collective (the scenario's gloo timeout bounds it), with p.grad unchanged; a step without
    statistics is FSDP2's own forward and backward, also on the empty rank (p.grad equal to a plain
    FSDP2 twin's); and the next statistics step, with examples everywhere, is exact."""
    rank, world = rank_world()
    sizes = {2: [3, 0], 3: [2, 0, 3]}[world]
    loss = F.cross_entropy
    model, twin, reference = sharded_mlp(33), sharded_mlp(33), mlp(seed=33)
    gx, gy = global_batch(sum(sizes), seed=191)
    x, y = gx[my_slice(sizes)], gy[my_slice(sizes)]
    tracker = persample.Tracker(model, loss)
    body = []

    def refused(fn, what):
        try:
            fn()
        except persample.UnsupportedModelError as err:
            assert err.code == "FSDP2_EMPTY_RANK", (what, err.code, str(err))
            assert f"rank 1 of {world} has no examples" in str(err), (what, str(err))
        else:
            raise AssertionError(f"{what}: a rank with no examples was not refused")
        assert all(p.grad is None for p in model.parameters()), f"{what}: p.grad changed"

    def observed():
        with tracker.observe(y):
            body.append(1)
            loss(model(x), y).backward()

    refused(lambda: tracker.step(x, y), "Tracker.step")
    refused(observed, "Tracker.observe")
    assert not body, "observe ran the user's forward and backward after refusing"
    refused(lambda: persample.grad_stats(model, loss, x, y), "grad_stats")
    assert tracker.steps == 0 and tracker.last_stats is None
    # a step without statistics: FSDP2's own forward and backward, on 0 examples too
    plain = persample.Tracker(model, loss, every=2)
    plain.steps = 1
    assert plain.step(x, y) is None
    loss(twin(x), y).backward()
    assert_grads_equal(model, twin, "a step without statistics, one rank empty")
    model.zero_grad()
    # the next statistics step, with examples on every rank
    x, y, gx, gy = local_batches(1, seed=193)[0]
    stats = tracker.step(x, y)
    check_against_oracle(stats, oracle(reference, loss, gx, gy), "after the refusal", model=model)
    del rank


@scenario(2, suite="fsdp")
def fsdp2_tracker_built_before_fully_shard_adopts_it():
    """accelerate shards the HF Trainer's model in place inside train(), after track(trainer) built the
    Tracker: the first step sees the sharding and runs as an FSDP2 step (p.grad = FSDP2's, statistics
    global and sharded, equal to the oracle); FSDP1 applied late is refused on every rank."""
    from torch.distributed.fsdp import fully_shard

    loss = F.cross_entropy
    tracked, plain, reference = mlp_like(seed=28), sharded_mlp(28), mlp(seed=28)
    tracker = persample.Tracker(tracked, loss)  # not sharded yet: replicated, as under DDP
    for layer in (tracked[0], tracked[2]):
        fully_shard(layer)
    fully_shard(tracked)
    x, y, gx, gy = local_batches(1, seed=151)[0]
    stats = tracker.step(x, y)
    loss(plain(x), y).backward()
    assert_grads_equal(tracked, plain, "late fully_shard")
    check_against_oracle(stats, oracle(reference, loss, gx, gy), "late fully_shard", model=tracked)
    clipped = persample.Tracker(mlp_like(seed=28), loss, clip_norm=1.0)
    fully_shard(clipped.model)
    try:
        clipped.step(x, y)
    except persample.UnsupportedModelError as err:
        assert err.code == "FSDP2_OPTION" and "clip_norm" in str(err), err
    else:
        raise AssertionError("clip_norm on a model sharded after the Tracker was built was not refused")


@scenario(2, suite="fsdp")
def fsdp2_tracker_refuses_what_one_backward_cannot_give():
    model = sharded_mlp(24)
    for options, words in (
        ({"clip_norm": 1.0}, "clip_norm"),
        ({"check_every": 2}, "check_every"),
        ({"inner_products": True}, "inner_products"),
        ({"engine": "vmap"}, "engine"),
    ):
        try:
            persample.Tracker(model, F.cross_entropy, **options)
        except persample.UnsupportedModelError as err:
            assert err.code == "FSDP2_OPTION" and words in str(err) and "FSDP2" in str(err), err
        else:
            raise AssertionError(f"no refusal for {options}")
    try:
        persample.Tracker(model, F.cross_entropy, distributed=False)
    except ValueError as err:
        assert "sharded" in str(err), err
    else:
        raise AssertionError("no refusal for distributed=False")
    from torch.distributed.fsdp import fully_shard

    inner_only = mlp(seed=24)
    fully_shard(inner_only[0])
    try:
        persample.Tracker(inner_only, F.cross_entropy)
    except persample.UnsupportedModelError as err:
        assert "root module" in str(err), err
    else:
        raise AssertionError("no refusal for fully_shard without the root")


def tiny_gpt2(seed=0):
    """GPT-2 with tied embedding and LM head (n_layer=2, n_embd=32, vocab 64), float64, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).double()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def token_batch(n, seed, length=8):
    """Right-padded token batch: ids, attention mask and labels (-100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask, ids.masked_fill(mask == 0, -100)


def sharded_per_block(model, blocks):
    """``model`` with ``fully_shard`` on each of ``blocks(model)`` and on the root (torchtitan's layout)."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def summed_token_loss(logits, labels):
    """Example i's loss: Σ_t of the next-token cross-entropy over its real tokens (the oracle's own)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


@scenario(2, 3, suite="fsdp")
def fsdp2_tiny_gpt2_tied_weights_padded_batches():

    _, world = rank_world()
    sizes = SPLITS[world]
    loss = persample.causal_lm_loss()

    def sharded():
        return sharded_per_block(tiny_gpt2(seed=31), lambda m: m.transformer.h)

    tracked, plain, reference = sharded(), sharded(), tiny_gpt2(seed=31)
    tracker = persample.Tracker(tracked, loss)
    for step in range(2):
        ids, mask, labels = token_batch(sum(sizes), seed=101 + step)
        s = my_slice(sizes)
        tracked.zero_grad()
        plain.zero_grad()
        stats = tracker.step({"input_ids": ids[s], "attention_mask": mask[s]}, labels[s])
        loss(plain(input_ids=ids[s], attention_mask=mask[s]), labels[s]).backward()
        assert_grads_equal(tracked, plain, f"GPT-2 step {step}")
        # the weight-gradient products the statistics make unneeded were skipped (Σ_i g_i written instead):
        # the Linear maps on sequences (Conv1D), and the tied embedding through its LM head
        skipped = tracker._fsdp2_skipped
        assert "transformer.wte.weight" in skipped and "transformer.h.0.attn.c_attn.weight" in skipped, sorted(skipped)
        rows, losses = [], []
        params = dict(reference.named_parameters())
        for i in range(len(ids)):
            li = summed_token_loss(
                reference(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits, labels[i : i + 1]
            )
            rows.append(torch.autograd.grad(li, list(params.values())))
            losses.append(li.detach())
        g = {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}
        expected = oracle_from_rows(g, torch.stack(losses))
        assert "lm_head.weight" not in stats.mean and "transformer.wte.weight" in stats.mean  # tied: one name
        # GSNR (mean of ḡ_j²/Var_j over Var_j > 0) is ill-conditioned here: the key bias of c_attn has a
        # structurally zero gradient (softmax's shift invariance), so its elements hold rounding noise
        # (~1e-17) in any computation, and their ratio is noise too (1e-2 apart between two exact
        # computations). Those columns are not compared; the MLP scenarios compare GSNR at 1e-9.
        check_against_oracle(stats, expected, f"GPT-2 step {step}", model=tracked, loose=("gsnr",))
        with torch.no_grad():  # the same update on both sharded models and the reference
            for p, q, r in zip(tracked.parameters(), plain.parameters(), reference.parameters()):
                p.sub_(0.1 * p.grad)
                q.sub_(0.1 * q.grad)
                r.sub_(0.1 * p.grad.full_tensor())  # (a collective: every rank, same order)


def tiny_llama(seed=0):
    """A Llama-style model (RMSNorm, rotary, SwiGLU; 2 layers, hidden 32, vocab 64), float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).double()


@scenario(2, 3, suite="fsdp")
def fsdp2_tiny_llama_token_mean_over_padding():
    """p.grad equal to FSDP2's own backward to 1e-12; statistics against the float64 per-example loop to
    1e-6 of each field's largest entry: Hugging Face's LlamaRMSNorm computes in float32 inside a float64
    model, so the model itself differs between a batch and its examples by 1e-8 to 1e-7
    (tests/real_models.py, batch_discrepancy); a fallback module (the RMSNorm) reads the full parameters
    after FSDP2's backward, which used to free them (a segfault before unshard_all deferred the reshard)."""

    _, world = rank_world()
    sizes = SPLITS[world]
    loss = persample.causal_lm_loss()

    def sharded():
        return sharded_per_block(tiny_llama(seed=41), lambda m: m.model.layers)

    tracked, plain, reference = sharded(), sharded(), tiny_llama(seed=41)
    tracker = persample.Tracker(tracked, loss)
    ids, mask, labels = token_batch(sum(sizes), seed=131)
    s = my_slice(sizes)
    stats = tracker.step({"input_ids": ids[s], "attention_mask": mask[s]}, labels[s])
    loss(plain(input_ids=ids[s], attention_mask=mask[s]), labels[s]).backward()
    assert_grads_equal(tracked, plain, "Llama")
    skipped = tracker._fsdp2_skipped  # the Linear maps' products skipped; the RMSNorm (a fallback) keeps its own
    assert {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    } <= skipped
    assert not skipped & {"model.norm.weight", "model.layers.0.input_layernorm.weight"}, sorted(skipped)
    params = dict(reference.named_parameters())
    rows, losses = [], []
    for i in range(len(ids)):
        li = summed_token_loss(
            reference(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits, labels[i : i + 1]
        )
        rows.append(torch.autograd.grad(li, list(params.values()), allow_unused=True))
        losses.append(li.detach())
    g = {
        k: torch.stack([r[j] if r[j] is not None else torch.zeros_like(params[k]) for r in rows])
        for j, k in enumerate(params)
    }
    expected = {"mean": {k: v.mean(0) for k, v in g.items()}, "var": {k: v.var(0) for k, v in g.items()}}
    assert stats.n == len(ids)

    def near(a, b, what):  # relative to the largest entry, as batch_discrepancy measures the model itself
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)
        assert err < 1e-6, f"{what}: {err:.2e} relative to the largest entry"

    for k in params:
        near(stats.mean[k], rows_of(stats, k, expected["mean"][k]), f"Llama mean[{k}]")
        near(stats.var[k], rows_of(stats, k, expected["var"][k]), f"Llama var[{k}]")
    near(stats.losses, torch.stack(losses), "Llama losses")
    near(stats.sq_norms, sum(v.reshape(len(ids), -1).pow(2).sum(1) for v in g.values()), "Llama norms")


# ------------------------------------------------------------------------------ FSDP1, as a user runs it


@scenario(2, 3, suite="fsdp")
def fsdp1_refused_on_every_rank_and_the_ranks_live_on():
    """FSDP1 with its defaults (flat parameters), as a user would wrap it: every entry point refuses
    on every rank, naming FSDP1 and DDP as the fix; no rank dies, and the model still trains with
    FSDP1's own backward afterwards (the refusal left it as it was)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(mlp(seed=15), device_id=torch.device("cpu"))
    x, y, _, _ = local_batches(1, seed=81)[0]
    calls = {
        "Tracker(fsdp)": lambda: persample.Tracker(model, F.cross_entropy),
        "Tracker(fsdp.module)": lambda: persample.Tracker(model.module, F.cross_entropy),
        "Tracker(distributed=False)": lambda: persample.Tracker(model, F.cross_entropy, distributed=False),
        "grad_stats": lambda: persample.grad_stats(model, F.cross_entropy, x, y),
        "per_sample_grads": lambda: persample.per_sample_grads(model.module, F.cross_entropy, x, y),
    }
    for what, call in calls.items():
        try:
            call()
        except persample.UnsupportedModelError as err:
            text = str(err)
            assert "FSDP1" in text and "FullyShardedDataParallel" in text, (what, text)
            assert "DistributedDataParallel" in text and "every rank" in text, (what, text)
        else:
            raise AssertionError(f"{what}: FSDP1 was not refused")
    F.cross_entropy(model(x), y).backward()  # FSDP1's own step still works on every rank
    flags = torch.ones(1)
    dist.all_reduce(flags)
    assert flags.item() == dist.get_world_size()


# ------------------------------------------------------------------------------ driver


def _write(out_dir: str, rank: int, results: dict) -> None:
    """This rank's results so far (atomically): the driver reads them while the run goes on, to give each
    scenario its own time budget; an empty file says that gloo's initialisation is done."""
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(path + ".tmp", path)


def main(out_dir: str, scenarios: dict | None = None, suites: dict | None = None) -> None:
    """Join the gloo group and run this world's scenarios (``scenarios``/``suites``: another worker's
    registry; default this module's) of the environment's suite (PERSAMPLE_SUITE, every scenario of a
    registry without suites), or only PERSAMPLE_SCENARIO, writing the results after each."""
    scenarios = SCENARIOS if scenarios is None else scenarios
    suites = SUITES if suites is None else suites
    suite = os.environ.get("PERSAMPLE_SUITE", "ddp")
    only = os.environ.get("PERSAMPLE_SCENARIO")
    dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get("PERSAMPLE_GLOO_TIMEOUT", "60"))))
    rank, world = rank_world()
    results = {}
    _write(out_dir, rank, results)
    for name, (fn, worlds) in scenarios.items():
        if world not in worlds or suites.get(name, "ddp") != suite or (only and name != only):
            continue
        torch.manual_seed(0)  # every scenario starts from the same RNG state, whatever ran before it
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
