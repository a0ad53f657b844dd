"""Position effects that appear only on a later batch (redteam, docs/redteam.md; benchmarks/redteam/battery2.py).

The spot check's verdict is kept per model plan and input signature. The signature left out the batch size,
so a forward that treats the examples by the batch size only at some sizes (``x * 2 if x.shape[0] >= 6``),
checked on a batch of 4, was trusted at 6: fast, auto, ``per_sample_grads``, ``Tracker.step`` and observe
returned norms 83 % off, silently. The batch size is now in the signature (each size seen is checked once).
An effect that depends on the values at one size stays open: a strict xfail below.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from oracle_stats import oracle_stats
from zoo import assert_dicts_close


class _Body(nn.Module):
    def __init__(self, body):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.body = body

    def forward(self, x):
        return self.body(self, x)


def _doubled_from_six(s, x):
    return s.l2(torch.tanh(s.l1(x * (2.0 if x.shape[0] >= 6 else 1.0))))


def _scaled_by_position_when_big(s, x):
    h = torch.tanh(s.l1(x))
    if bool(x.abs().max() > 3):
        h = h * torch.arange(1, h.shape[0] + 1, dtype=h.dtype)[:, None]
    return s.l2(h)


def _batch(size, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(size, 4, generator=g, dtype=torch.float64) * 2 - 1) * scale
    return x, torch.randint(0, 3, (size,), generator=g)


def test_a_batch_size_effect_is_checked_at_each_size():
    model = _Body(_doubled_from_six).double()
    persample.grad_stats(model, F.cross_entropy, *_batch(4, 1.0, 0), engine="fast")  # no effect at 4: passes
    x, y = _batch(6, 1.0, 1)
    with pytest.raises(persample.NotExact) as info:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert info.value.code == "EXAMPLE_DIFFERS_ALONE"
    tracker = persample.Tracker(model, F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        tracker.step(*_batch(4, 1.0, 0))
        stats = tracker.step(x, y)
    oracle = oracle_stats(model, F.cross_entropy, x, y)
    assert_dicts_close(stats.mean, oracle["mean"])
    assert_dicts_close(stats.param_sq_norms, oracle["param_sq_norms"])


@pytest.mark.xfail(
    strict=True,
    reason="open (docs/redteam.md): a position effect that depends on the values, absent "
    "from the batch the spot check ran on, is trusted on a later batch of the same size",
)
def test_a_value_dependent_position_effect_on_a_later_batch_of_the_same_size():
    model = _Body(_scaled_by_position_when_big).double()
    persample.grad_stats(model, F.cross_entropy, *_batch(6, 1.0, 0), engine="fast")  # |x| < 1: no effect
    x, y = _batch(6, 4.0, 1)
    x[0, 0] = 3.9
    with pytest.raises(persample.NotExact):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
