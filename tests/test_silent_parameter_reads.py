"""A loss_fn (or forward) that reads the model's parameters themselves (redteam, docs/redteam.md).

``loss_fn = lambda out, y: ce(out, y) + λ‖W‖²`` with ``W = model[0].weight``: example i's loss reads W twice,
through the model and through the regulariser, and g_i holds both terms. The vmap engine substitutes the
parameters with ``torch.func.functional_call``, which reaches only the first read: the regulariser saw the
real ``nn.Parameter`` as a constant, and its term was lost. ``grad_stats(engine="auto")`` (the fast engine
refuses, PARAMETER_USED_OUTSIDE, then vmap), ``per_sample_grads`` and ``Tracker.step`` returned means 40-65 %
off with no error, and ``check_mean`` raised a false MeanMismatch on a model that does not couple examples.
The vmap engine now refuses (PARAMETER_NOT_SUBSTITUTED) and auto takes the loop, which is exact.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from oracle_stats import oracle_stats
from zoo import assert_dicts_close, oracle_grads

B = 5


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)


def _regularised(model):
    return lambda out, y: F.cross_entropy(out, y) + 0.1 * model[0].weight.pow(2).sum() + 0.2 * model[2].bias.sum()


class _KeptReference(nn.Module):
    """A forward that reads a weight through a reference kept outside the module tree (a plain list)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.kept = [self.l1.weight]  # not registered: functional_call does not substitute it

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x) + x @ self.kept[0].T))


def _cases():
    m = _mlp()
    yield "regulariser in loss_fn", m, _regularised(m)
    yield "reference outside the tree", _KeptReference().double(), F.cross_entropy


@pytest.mark.parametrize("case", ["regulariser in loss_fn", "reference outside the tree"])
def test_vmap_refuses_and_every_entry_point_is_exact(case):
    name, model, loss_fn = next(c for c in _cases() if c[0] == case)
    x, y = _batch()
    oracle = oracle_stats(model, loss_fn, x, y)
    with pytest.raises(persample.NotExact) as info:
        persample.grad_stats(model, loss_fn, x, y, engine="vmap")
    assert info.value.code == "PARAMETER_NOT_SUBSTITUTED"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = persample.grad_stats(model, loss_fn, x, y)
        assert_dicts_close(stats.mean, oracle["mean"])
        assert_dicts_close(stats.var, oracle["var"])
        grads = persample.per_sample_grads(model, loss_fn, x, y)
        assert_dicts_close(grads, oracle_grads(model, loss_fn, x, y)[0])
        assert persample.check_mean(model, loss_fn, x, y).ok  # no false alarm: the model couples nothing
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        stats = persample.Tracker(model, loss_fn).step(x, y)
    assert_dicts_close(stats.mean, oracle["mean"])
    assert_dicts_close({n: p.grad for n, p in model.named_parameters()}, expected)
