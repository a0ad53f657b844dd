"""Under float16 / bfloat16 autocast, a layer without a rule passes its sum check at the compute dtype's
rounding, and a fallback that is wrong is still caught.

The fast engine checks that torch.func's per-example gradients of a rule-less module add up to autograd's
gradient. Both sides are computed in the autocast dtype; at the float32 tolerance (1e-3) every rule-less
module was refused under bfloat16 (FALLBACK_SUM_MISMATCH: the sums differ by about ε/2 = 2–4e-3), so
``auto`` took vmap. The tolerance now follows the dtype computed in (``half_precision_rtol``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from zoo import oracle_grads


class Raw(nn.Module):
    """A layer with no closed-form rule (raw parameters, a nonlinearity between two uses of w).
    ``per_batch``: its output scales with the batch's size, so a batch of one is not a row of the batch
    (a wrong fallback, which the sum check must catch)."""

    def __init__(self, d, per_batch=False):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.b = nn.Parameter(torch.zeros(d))
        self.per_batch = per_batch

    def forward(self, x):
        out = torch.tanh(x @ self.w + self.b) @ self.w.T
        return out * x.shape[0] / 8 if self.per_batch else out


class Net(nn.Module):
    def __init__(self, per_batch=False, d=32):
        super().__init__()
        self.a, self.raw, self.c = nn.Linear(16, d), Raw(d, per_batch), nn.Linear(d, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.raw(torch.tanh(self.a(x)))))


def _data(b):
    torch.manual_seed(0)
    return torch.randn(b, 16), torch.randint(0, 4, (b,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b", [4, 64])
def test_an_honest_fallback_under_half_precision_autocast_stays_on_the_fast_engine(dtype, b):
    torch.manual_seed(0)
    model = Net()
    x, y = _data(b)
    with torch.autocast("cpu", dtype=dtype):
        stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
        with warnings.catch_warnings():
            warnings.simplefilter("error", persample.SlowPathWarning)
            persample.grad_stats(model, F.cross_entropy, x, y)  # auto: fast, never the loop
    # against the float64 oracle, at the compute dtype's rounding (ε = 2^-8 in bfloat16)
    grads, _ = oracle_grads(model.double(), F.cross_entropy, x.double(), y)
    model.float()
    eps = torch.finfo(dtype).eps
    for name, g in grads.items():
        expected = g.mean(0)
        error = (stats.mean[name].double() - expected).abs().max() / expected.abs().max()
        assert error < 8 * eps, (name, float(error))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_wrong_fallback_is_still_caught_under_half_precision_autocast(dtype):
    torch.manual_seed(0)
    model = Net(per_batch=True)
    x, y = _data(8 * 3)
    with torch.autocast("cpu", dtype=dtype):
        with pytest.raises(persample.NotExact) as err:
            persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert err.value.code == "FALLBACK_SUM_MISMATCH"


class Centring(Raw):
    """A rule-less layer that centres its input over the batch before using w: it couples the examples."""

    def forward(self, x):
        return super().forward(x - x.mean(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_coupled_fallback_is_still_refused_under_half_precision_autocast(dtype):
    torch.manual_seed(0)
    model = Net()
    model.raw = Centring(32)
    x, y = _data(16)
    with torch.autocast("cpu", dtype=dtype):
        with pytest.raises(persample.NotExact) as err:
            persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert err.value.code == "FALLBACK_SUM_MISMATCH"  # the sum check itself, at the half-precision tolerance
