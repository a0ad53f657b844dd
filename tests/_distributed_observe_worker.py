"""One rank of the DDP cells of tests/test_integrations_matrix_ddp.py (run as a script, never collected).

    python tests/_distributed_observe_worker.py OUT_DIR

Like ``_distributed_worker.py`` (whose helpers it uses), for ``Tracker.observe`` around the backward of
``DistributedDataParallel`` with ``find_unused_parameters=True`` or ``static_graph=True``: DDP passes the
output through its ``_DDPSink``, whose backward the observed backward goes through.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)

import persample  # noqa: E402
from _distributed_worker import close, close_dicts, global_batch, local_batches, mlp, rank_world  # noqa: E402

SCENARIOS: dict[str, tuple] = {}


def scenario(*worlds):
    def register(fn):
        SCENARIOS[fn.__name__] = (fn, worlds)
        return fn
    return register


class WithUnused(nn.Module):
    """An MLP with a head its forward never calls (find_unused_parameters has something to find)."""

    def __init__(self, seed=0):
        super().__init__()
        self.net = mlp(seed)
        self.unused = nn.Linear(3, 3).double()

    def forward(self, x):
        return self.net(x)


def _observe_equals_step(make, **ddp_kwargs):
    from torch.nn.parallel import DistributedDataParallel
    loss = F.cross_entropy
    observed = DistributedDataParallel(make(), **ddp_kwargs)
    stepped = DistributedDataParallel(make(), **ddp_kwargs)
    plain = DistributedDataParallel(make(), **ddp_kwargs)
    observing = persample.Tracker(observed, loss)
    stepping = persample.Tracker(stepped, loss)
    for step, (x, y, gx, gy) in enumerate(local_batches(3, seed=41)):
        for model in (observed, stepped, plain):
            model.zero_grad(set_to_none=True)
        with observing.observe(y) as obs:
            loss(observed(x), y).backward()
        reference = stepping.step(x, y)
        loss(plain(x), y).backward()
        assert obs.stats is not None, f"step {step}: observe gave no statistics"
        close_dicts(obs.stats.mean, reference.mean, f"step {step}: observed mean vs Tracker.step")
        close_dicts(obs.stats.var, reference.var, f"step {step}: observed var vs Tracker.step")
        close(obs.stats.sq_norms, reference.sq_norms, f"step {step}: observed per-example norms vs Tracker.step")
        for (n, a), b in zip(observed.named_parameters(), plain.parameters()):
            assert (a.grad is None) == (b.grad is None), n
            if a.grad is not None:
                close(a.grad, b.grad, f"step {step}: p.grad of {n} after observe")
        whole = persample.grad_stats(make(), loss, gx, gy)  # the global batch on one process (parameters
        if step == 0:  # have moved after step 0 only in the optimizer-free loop: none here)
            close_dicts(obs.stats.mean, whole.mean, "observed global mean vs one process")


@scenario(2)
def observe_equals_step_under_find_unused_parameters():
    _observe_equals_step(lambda: mlp(seed=7), find_unused_parameters=True)


@scenario(2)
def observe_equals_step_under_find_unused_parameters_with_an_unused_head():
    _observe_equals_step(lambda: WithUnused(seed=7), find_unused_parameters=True)


@scenario(2)
def observe_equals_step_under_static_graph():
    _observe_equals_step(lambda: mlp(seed=7), static_graph=True)


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
