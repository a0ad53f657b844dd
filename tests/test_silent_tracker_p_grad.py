"""Tracker.step's p.grad where the statistics come from vmap or the loop (redteam, docs/redteam.md).

``Tracker.step`` promises ``p.grad`` as ``loss_fn(model(x), y).backward()`` leaves it. With equal weights it
used to write (w·B)·ḡ, the statistics' mean, whatever engine computed them. That is the batch's gradient only
for the fast engine (one batched backward). Where the forward couples the examples (a batch mean, a sort, a
position effect: what makes the fast engine refuse, BATCH_MIXED / EXAMPLE_DIFFERS_ALONE), ``engine="auto"``
takes vmap or the loop, each example alone, whose mean is not the batch's gradient: p.grad was 20-500 % off,
silently (the statistics were right). Now p.grad comes from the batch's own backward there.
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

B = 5


class _Forward(nn.Module):
    def __init__(self, body):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.body = body

    def forward(self, x):
        return self.body(self, x)


#: forwards that couple the examples, each refused by the fast engine with a different code
COUPLED = {
    "h + h.sum(0)": lambda s, x: (lambda h: s.l2(h + 0.3 * h.sum(0, keepdim=True)))(torch.tanh(s.l1(x))),  # BATCH_MIXED
    "x * (B > 4)": lambda s, x: s.l2(torch.tanh(s.l1(x * (2.0 if x.shape[0] > 4 else 1.0)))),  # EXAMPLE_DIFFERS_ALONE
    "h - h.detach().mean(0)": lambda s, x: (lambda h: s.l2(h - h.detach().mean(0)))(torch.tanh(s.l1(x))),
    # refused before the audit of the backward could see the coupling (PARAMETER_SUBSTITUTED, forward stage)
    "substituted weight + h.sum(0)": lambda s, x: (lambda h: s.l2(h + 0.3 * h.sum(0, keepdim=True)))(
        torch.tanh(torch.func.functional_call(s.l1, {"weight": 1.1 * s.l1.weight, "bias": s.l1.bias}, (x,)))
    ),
}


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)


def _backward_grads(model, loss_fn, x, y):
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("name", list(COUPLED))
def test_p_grad_is_the_batch_backward_when_the_statistics_come_from_examples_alone(name, engine):
    model = _Forward(COUPLED[name]).double()
    x, y = _batch()
    expected = _backward_grads(model, F.cross_entropy, x, y)
    oracle = oracle_stats(model, F.cross_entropy, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = persample.Tracker(model, F.cross_entropy, engine=engine).step(x, y)
    assert_dicts_close({n: p.grad for n, p in model.named_parameters()}, expected)
    assert_dicts_close(stats.mean, oracle["mean"])  # the statistics were right all along
    # and the two differ here: the old p.grad, (w·B)·mean = mean, was not the backward's
    assert any((stats.mean[n] - expected[n]).abs().max() > 1e-3 for n in expected)


def test_clipping_still_combines_the_clipped_per_example_gradients():
    """clip_norm: p.grad is (1/B) Σ_i min(1, C/‖g_i‖) g_i by definition, from the statistics' engine."""
    model = _Forward(COUPLED["h + h.sum(0)"]).double()
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = persample.Tracker(model, F.cross_entropy, clip_norm=0.05).step(x, y)
    assert_dicts_close({n: p.grad for n, p in model.named_parameters()}, stats.clipped_mean)
