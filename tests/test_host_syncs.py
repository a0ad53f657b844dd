"""Host-device synchronisations per call, counted on CPU by benchmarks/call_counts.py's ``SyncCounter``
(a TorchDispatchMode that sees ``_local_scalar_dense``, ``nonzero``, data-dependent shapes, ..., plus
the host copies ``Tensor.tolist/cpu/numpy``). Counts are deterministic: no timing here.

Each limit is the count this code reaches on the benchmark case; a change that adds a host read to a
step fails here (lower the limit when a read is removed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def call_counts():
    sys.path.insert(0, str(BENCH))
    try:
        import call_counts as module
        import cases
    finally:
        sys.path.remove(str(BENCH))
    return module, cases


def _mlp(cases):
    torch.manual_seed(0)
    problem = cases.mlp_problem(16)
    return problem


# entry point -> most host reads allowed per call on the MLP (all counted, see the module docstring)
LIMITS = {
    "plain": 0,  # the MLP itself reads nothing to the host
    "grad_stats-fast": 1,  # the one-pass second moments' cancellation flag
    "grad_stats-fast-novar": 0,
    "tracker-step-plain": 0,
    # the weights' check and the cancellation flag (one read each), common_weight (one read, of a host
    # tensor: no device sync on a GPU), the statistics' finiteness
    "tracker-step-stats": 4,
    "observe": 5,  # as above, and the output gradients' finiteness (an fp16 step to skip)
    "observe-novar": 4,
}


def test_the_counter_sees_host_reads(call_counts):
    module, _ = call_counts
    x = torch.arange(6.0)
    with module.SyncCounter() as counter:
        x.sum().item()
        bool(x.any())
        x.nonzero()
        x.tolist()
        torch.unique(x)
        x.add(1)
    assert counter.counts["_local_scalar_dense"] == 2
    assert counter.counts["nonzero"] == 1
    assert counter.counts["Tensor.tolist"] == 1
    assert counter.total == 5
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist  # the patch is undone


def test_host_reads_per_call_stay_at_their_limits(call_counts):
    module, cases = call_counts
    counts = module.count(_mlp(cases))
    assert set(counts) == set(LIMITS)
    over = {name: r["sync_ops"] for name, r in counts.items() if r["syncs"] > LIMITS[name]}
    assert not over, over
