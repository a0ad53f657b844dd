"""Losses that couple the examples of a batch are refused by grad_stats and per_sample_grads.

Per-example gradients are those of ``loss_fn`` on each example alone. For a loss that couples the
batch (NT-Xent / SimCLR, CLIP, batch-hard triplets, a batch-centred MSE, a load-balancing term over the
batch's router outputs), those describe another loss than the batch's, and used to come back with no
warning (all zeros for NT-Xent). ``batch_loss_check`` (on by default) checks at the model's output, with a
loss-only backward, that the batch loss is Σ_i w_i L_i; ``batch_loss_check=False`` gives the batch-of-one
gradients on purpose.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import BatchLossMismatch

from zoo import assert_dicts_close, oracle_grads


def nt_xent(out, y=None, temperature=0.5):
    z = F.normalize(out, dim=1)
    n = z.shape[0]
    sim = (z @ z.T / temperature).masked_fill(torch.eye(n, dtype=torch.bool), -1e9)
    partner = torch.arange(n) ^ 1 if n > 1 else torch.zeros(1, dtype=torch.long)  # views (0, 1), (2, 3), ...
    return F.cross_entropy(sim, partner)


def batch_hard_triplet(out, y, margin=1.0):
    d = (out[:, None] - out[None]).pow(2).sum(-1).add(1e-12).sqrt()
    same = y[:, None] == y[None, :]
    return F.relu((d * same).amax(1) - (d + 1e6 * same).amin(1) + margin).mean()


def clip_loss(out, y=None):
    a, b = F.normalize(out[:, :3], dim=1), F.normalize(out[:, 3:], dim=1)
    logits, t = a @ b.T * 10, torch.arange(out.shape[0])
    return (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2


def centred_mse(out, y):
    return F.mse_loss(out - out.mean(0), y - y.mean(0))


def moe_loss(out, y):
    """Cross-entropy plus a Switch-style load-balancing term over the batch's router probabilities."""
    logits, probs = out
    fraction = F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype).mean(0)
    return F.cross_entropy(logits, y) + 0.1 * probs.shape[-1] * (fraction * probs.mean(0)).sum()


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.router = nn.Linear(5, 6), nn.Linear(5, 4)

    def forward(self, x):
        return self.body(x), torch.softmax(self.router(x), -1)


def _case(name):
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    model = (MoE() if name == "moe" else nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))).double()
    loss_fn, y = {
        "nt_xent": (nt_xent, None),
        "triplet": (batch_hard_triplet, torch.tensor([0, 0, 1, 1, 2, 2])),
        "clip": (clip_loss, None),
        "centred_mse": (centred_mse, torch.randn(6, 6, dtype=torch.float64)),
        "moe": (moe_loss, torch.randint(0, 6, (6,))),
    }[name]
    return model, loss_fn, x, y


NAMES = ["nt_xent", "triplet", "clip", "centred_mse", "moe"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("engine", ["auto", "fast", "vmap", "loop"])
def test_grad_stats_refuses_a_coupled_loss(name, engine):
    model, loss_fn, x, y = _case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        with pytest.raises(
            BatchLossMismatch, match="loss_fn couples the examples of the batch.*batch_loss_check=False"
        ):
            persample.grad_stats(model, loss_fn, x, y, engine=engine)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_per_sample_grads_refuses_a_coupled_loss(name, engine):
    model, loss_fn, x, y = _case(name)
    with pytest.raises(BatchLossMismatch, match=r"loss_fn couples the examples of the batch.*\[BATCH_LOSS_COUPLED\]"):
        persample.per_sample_grads(model, loss_fn, x, y, engine=engine)


@pytest.mark.parametrize("name", ["nt_xent", "centred_mse", "moe"])
def test_opting_out_gives_the_batch_of_one_gradients(name):
    model, loss_fn, x, y = _case(name)
    grads, _ = oracle_grads(model, loss_fn, x, y)  # loss_fn on each example alone, float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = persample.grad_stats(model, loss_fn, x, y, batch_loss_check=False)
        per_example = persample.per_sample_grads(model, loss_fn, x, y, batch_loss_check=False)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(per_example, grads)


@pytest.mark.parametrize(
    "loss_fn",
    [
        F.cross_entropy,
        lambda o, y: F.cross_entropy(o, y, reduction="sum"),
        lambda o, y: F.cross_entropy(o, y, weight=torch.tensor([1.0, 2.0, 0.5], dtype=o.dtype)),
        lambda o, y: F.cross_entropy(o, y, label_smoothing=0.1) * 3.0,
    ],
    ids=["mean", "sum", "class-weights", "scaled"],
)
def test_weighted_sums_of_per_example_losses_pass_the_check(loss_fn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads, _ = oracle_grads(model, loss_fn, x, y)
    for engine in ("fast", "vmap", "loop"):
        assert_dicts_close(
            persample.grad_stats(model, loss_fn, x, y, engine=engine).mean, {k: g.mean(0) for k, g in grads.items()}
        )
    assert_dicts_close(persample.per_sample_grads(model, loss_fn, x, y), grads)


def test_the_check_leaves_buffers_and_p_grad_as_found():
    torch.manual_seed(0)

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 6)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.lin(x)

    model = Counting().double()
    x = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(BatchLossMismatch):
        persample.per_sample_grads(model, nt_xent, x)
    assert model.calls.item() == 0 and model.lin.weight.grad is None


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_a_random_model_with_a_coupled_loss_is_refused_too(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.2), nn.Linear(6, 6)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(BatchLossMismatch, match=r"loss_fn couples the examples.*\[BATCH_LOSS_COUPLED\]"):
        persample.grad_stats(model, nt_xent, x, randomness="different", engine=engine)
    with pytest.raises(BatchLossMismatch, match=r"loss_fn couples the examples.*\[BATCH_LOSS_COUPLED\]"):
        persample.per_sample_grads(
            model, nt_xent, x, randomness="different", engine="loop" if engine == "loop" else "vmap"
        )
