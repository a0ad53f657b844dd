"""The spot check in float32: a gradient turned by a few percent (redteam, docs/redteam.md).

Outside float64 the spot check compared only ‖b‖² and ⟨b, a⟩ with ‖a‖² (a = g_j alone, b = the engine's g_j).
For b = a + δ with δ ⟂ a both move by ‖δ‖² only, second order: at the float32 tolerance (1e-3, halved)
a 4 % turn of example 0's gradient passed, and the statistics (norms, variance) were off by that much with
no error. Here a custom rule (``persample.register_rule``) turns example 0's gradient by 4 % and gives the
difference to example 1, so the sum, which the engine checks against autograd, is right. Row j is now
formed in float32 and ‖b − a‖ read directly.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from oracle_stats import oracle_stats


class _Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.w


def _turned_by(turn):
    def turned(module, x, grad_output):
        """Example i's gradient x_i ∘ δ_i, except example 0's turned by ``turn`` (orthogonally), given to
        example 1 (so that the sum stays autograd's)."""
        g = (x * grad_output).float()
        g0 = g[0].double()
        v = torch.roll(g0, 1)
        d = v - (v @ g0) / (g0 @ g0) * g0
        d = (d * (turn * g0.norm() / d.norm())).to(g.dtype)
        g[0] += d
        g[1] -= d
        return {"w": g}

    return turned


@pytest.fixture
def turned_rule():
    persample.register_rule(_Scale, _turned_by(0.04), params=("w",))
    yield
    persample.unregister_rule(_Scale)


def test_a_turned_gradient_is_refused_under_bf16_autocast():
    """Under autocast the squares passed a 30 % turn (tolerance 5e-2 on squares, halved); a batch and its
    example alone differ by ~3e-3 there, so a 20 % turn is refused now."""
    persample.register_rule(_Scale, _turned_by(0.2), params=("w",))
    try:
        model, (x, y) = _model(), _batch()
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(persample.NotExact) as info:
            persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
        assert info.value.code == "EXAMPLE_DIFFERS_ALONE"
    finally:
        persample.unregister_rule(_Scale)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), _Scale(16), nn.Tanh(), nn.Linear(16, 3))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


def test_a_turned_gradient_is_refused_in_float32_and_auto_is_exact(turned_rule):
    model, (x, y) = _model(), _batch()
    with pytest.raises(persample.NotExact) as info:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert info.value.code == "EXAMPLE_DIFFERS_ALONE"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = persample.grad_stats(model, F.cross_entropy, x, y)
    oracle = oracle_stats(model.double(), F.cross_entropy, x.double(), y)
    torch.testing.assert_close(stats.param_sq_norms["1.w"].double(), oracle["param_sq_norms"]["1.w"], rtol=1e-4, atol=0)
    torch.testing.assert_close(stats.var["1.w"].double(), oracle["var"]["1.w"], rtol=1e-4, atol=1e-9)


def test_float32_batches_without_a_turn_still_pass():
    """No false refusal: the built-in rules in float32 (Linear, rows formed once per signature), and under
    bf16 autocast."""
    model, (x, y) = _model(), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    oracle = oracle_stats(model.double(), F.cross_entropy, x.double(), y)
    torch.testing.assert_close(stats.sq_norms.double(), oracle["sq_norms"], rtol=1e-4, atol=0)
