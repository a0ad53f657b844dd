"""A loss computed inside the model (``lambda out: out["loss"]``) is checked for coupling too.

``batch_loss_check`` reads a loss's weights at the model's output; a loss the model computed itself cannot
be read there, and an in-model NT-Xent used to come back from ``grad_stats`` and ``per_sample_grads`` as the
batch-of-one numbers (all zeros) with no warning. For such a loss the check is one more forward and backward
of the batch: ∇_θ ℓ must be a multiple of the mean per-example gradient (ℓ = w·Σ_i L_i).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import BatchLossMismatch

from test_silent_coupled_losses import nt_xent
from zoo import assert_dicts_close, oracle_grads


class InModelLoss(nn.Module):
    """Returns ``{"loss": ..., "z": ...}``: the loss of its whole input, computed in ``forward``."""

    def __init__(self, loss):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))
        self.loss = loss

    def forward(self, x, y=None):
        z = self.net(x)
        return {"loss": self.loss(z, y), "z": z}


LOSSES = {
    "nt_xent": lambda z, y: nt_xent(z),
    "centred_mse": lambda z, y: F.mse_loss(z - z.mean(0), y - y.mean(0)),
    "mean_ce": lambda z, y: F.cross_entropy(z, y),
    "sum_ce": lambda z, y: F.cross_entropy(z, y, reduction="sum"),
}


def _case(name):
    torch.manual_seed(0)
    model = InModelLoss(LOSSES[name]).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randn(6, 6, dtype=torch.float64) if name == "centred_mse" else torch.randint(0, 6, (6,))
    return model, {"x": x, "y": y}


def in_model(out):
    return out["loss"]


@pytest.mark.parametrize("name", ["nt_xent", "centred_mse"])
@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_a_coupled_loss_computed_in_the_model_is_refused(name, engine):
    model, inputs = _case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        with pytest.raises(BatchLossMismatch) as err:
            persample.grad_stats(model, in_model, inputs, engine=engine)
        assert err.value.code == "BATCH_LOSS_COUPLED"
        with pytest.raises(BatchLossMismatch) as err:
            persample.per_sample_grads(model, in_model, inputs, engine=engine)
        assert err.value.code == "BATCH_LOSS_COUPLED"
        # the opt-out: the batch-of-one gradients, on purpose
        grads, _ = oracle_grads(model, in_model, inputs)
        stats = persample.grad_stats(model, in_model, inputs, engine=engine, batch_loss_check=False)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})


@pytest.mark.parametrize("name", ["mean_ce", "sum_ce"])
def test_an_honest_loss_computed_in_the_model_passes_the_check(name):
    model, inputs = _case(name)
    grads, _ = oracle_grads(model, in_model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = persample.grad_stats(model, in_model, inputs)
        per_example = persample.per_sample_grads(model, in_model, inputs)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})
    assert_dicts_close(per_example, grads)
    assert all(p.grad is None for p in model.parameters())  # the check's backward writes no .grad
