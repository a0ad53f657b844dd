"""A layer registered in the model and inside a ``torch.compile``d submodule (redteam, docs/redteam.md).

``self.l1 = nn.Linear(...)`` and ``self.body = torch.compile(nn.Sequential(self.l1, nn.Tanh()))``: after one
``torch.func.functional_call`` on the model (the vmap engine's), the compiled module's cached graph gives
``l1`` no gradient on every later call (torch 2.13). ``Tracker.step`` (auto: the fast engine refuses,
PARAMETER_USED_OUTSIDE, then vmap) left ``l1.weight.grad`` None, ``check_mean`` raised a false
MeanMismatch, and the user's own training afterwards lost l1's gradient: all silently. The vmap engine now
refuses such a model before it runs (VMAP_CANNOT_RUN) and auto takes the loop.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from zoo import assert_dicts_close


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.body = torch.compile(nn.Sequential(self.l1, nn.Tanh()), backend="eager")

    def forward(self, x):
        return self.l2(self.body(x))


def _backward(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.slow  # torch.compile traces the fast engine's capture too: ~3 s quiet, 10 s on a loaded 2-core VM
def test_a_layer_shared_with_a_compiled_submodule_keeps_its_gradient():
    model = _Shared().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    expected = _backward(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        persample.Tracker(model, F.cross_entropy).step(x, y)
    assert_dicts_close({n: p.grad for n, p in model.named_parameters()}, expected)
    assert_dicts_close(_backward(model, x, y), expected)  # the user's own training still reaches l1


def test_the_vmap_engine_refuses_it_before_it_runs():
    model = _Shared().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    try:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="vmap")
    except persample.NotExact as err:
        assert err.code == "VMAP_CANNOT_RUN"
    else:
        raise AssertionError("not refused")
