"""check_mean passes honest models whatever precision they compute in, and still catches coupled ones.

Two false alarms: half-precision parameters whose per-example gradients nearly cancel (the reference,
a B-term sum in bfloat16, rounds by more than rtol times the small mean), and float64 models that compute
in float32 inside (Gemma-style RMSNorm: rel err ~1.2e-7 against the float64 rtol 1e-7). The tolerance is
now relative to the per-example terms and to the least precise dtype the forward computes in.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import MeanMismatchError


class Mix(nn.Module):
    def __init__(self, dtype, couple: str | None = None):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64, dtype=dtype), nn.Linear(64, 4, dtype=dtype)
        self.couple = couple

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.couple == "roll":
            h = h.roll(1, 0)
        elif self.couple == "centre":
            h = h - h.mean(0)
        return self.b(h)


def _half_case(dtype, couple=None, B=64):
    torch.manual_seed(0)
    model = Mix(dtype, couple)
    x = torch.randn(B, 16).to(dtype)
    with torch.no_grad():  # targets near the output: per-example gradients that nearly cancel
        y = (model(x).float() + 0.05 * torch.randn(B, 4)).to(dtype)
    return model, x, y


def scaled_mse(out, y):
    return 1000 * F.mse_loss(out, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [64, 256])
def test_honest_half_precision_models_pass(dtype, B):
    model, x, y = _half_case(dtype, B=B)
    assert persample.check_mean(model, scaled_mse, x, y).ok


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("couple", ["roll", "centre"])
def test_coupled_half_precision_models_are_caught(dtype, couple):
    torch.manual_seed(0)
    model = Mix(dtype, couple)
    x, y = torch.randn(64, 16).to(dtype), torch.randint(0, 4, (64,))
    with pytest.raises(MeanMismatchError):
        persample.check_mean(model, F.cross_entropy, x, y)


class RMSNorm(nn.Module):
    """Gemma-style: normalises and scales in float32 whatever the model's dtype."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class Gemmaish(nn.Module):
    def __init__(self, couple=False):
        super().__init__()
        self.a, self.norm, self.b, self.couple = nn.Linear(16, 32), RMSNorm(32), nn.Linear(32, 4), couple

    def forward(self, x):
        h = self.norm(self.a(x))
        return self.b(h.roll(1, 0) if self.couple else h)


def _lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float64_model_computing_in_float32_passes(seed):
    torch.manual_seed(seed)
    model = Gemmaish().double()
    x, y = torch.randn(8, 7, 16, dtype=torch.float64), torch.randint(0, 4, (8, 7))
    report = persample.check_mean(model, _lm_loss, x, y)
    assert report.ok and report.rtol == pytest.approx(1e-4)


def test_float64_model_computing_in_float32_that_couples_is_caught():
    torch.manual_seed(0)
    model = Gemmaish(couple=True).double()
    x, y = torch.randn(8, 7, 16, dtype=torch.float64), torch.randint(0, 4, (8, 7))
    with pytest.raises(MeanMismatchError, match="computes in float32 as well"):
        persample.check_mean(model, _lm_loss, x, y)


def test_a_pure_float64_model_keeps_the_float64_tolerance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = torch.randn(8, 16, dtype=torch.float64), torch.randint(0, 4, (8,))
    assert persample.check_mean(model, F.cross_entropy, x, y).rtol == pytest.approx(1e-7)


@pytest.mark.parametrize("engine", ["vmap", "loop"])
def test_half_precision_statistics_are_accumulated_in_float32(engine):
    """‖g_i‖² above 65504 overflowed to inf on the vmap and loop engines (the fast engine was right)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4)).half()
    x, y = torch.randn(8, 16).half(), (torch.randn(8, 4) * 100).half()
    stats = persample.grad_stats(model, F.mse_loss, x, y, engine=engine)
    fast = persample.grad_stats(model, F.mse_loss, x, y, engine="fast")
    for name, sq in stats.param_sq_norms.items():
        assert sq.dtype == torch.float32 and bool(torch.isfinite(sq).all()), name
        torch.testing.assert_close(sq, fast.param_sq_norms[name], rtol=1e-2, atol=0)
        assert stats.mean[name].dtype == torch.float32
