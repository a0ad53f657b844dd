"""observe's check of the loss's weights at the output, in closed form for a plain cross-entropy.

For ``F.cross_entropy`` of class indices on a ``[B, C]`` output (mean reduction, no class weights, no label
smoothing) the gradient of Σ_i L_i at the output is softmax(o_i) − e_{y_i} (0 for an ignored target), which
``observe._cross_entropy_at_output`` writes down instead of building the losses' graph and running
autograd on it. These tests hold it to autograd's gradient (``observe._losses_and_gradients``), and check
that every other loss still goes through autograd.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.engines.fast import observe as observe_mod

from oracle_stats import oracle_stats
from zoo import assert_dicts_close

B, C = 6, 5


def _leaves(dtype=torch.float64):
    torch.manual_seed(0)
    return [torch.randn(B, C, dtype=dtype).requires_grad_()]


@pytest.mark.parametrize(
    "targets",
    [
        torch.tensor([0, 1, 2, 3, 4, 0]),
        torch.tensor([0, -100, 2, 3, -100, 4]),  # ignored targets: a zero row of the gradient, L_i NaN
    ],
)
@pytest.mark.parametrize(
    "loss_fn", [F.cross_entropy, nn.CrossEntropyLoss(), lambda out, y: F.cross_entropy(out, y, ignore_index=3)]
)
def test_closed_form_is_autograds_gradient(targets, loss_fn):
    leaves = _leaves()
    spec = torch.utils._pytree.tree_flatten(leaves[0])[1]
    if bool((targets == -100).any()) and not isinstance(loss_fn, nn.Module) and loss_fn is not F.cross_entropy:
        # -100 is a class out of range where ignore_index=3: both raise torch's own error, as the loss does
        with pytest.raises(IndexError):
            observe_mod._losses_and_gradients(loss_fn, targets, B, leaves, spec, [0])
        with pytest.raises(IndexError):
            observe_mod._cross_entropy_at_output(loss_fn, leaves, spec, targets, [0])
        return
    closed = observe_mod._cross_entropy_at_output(loss_fn, leaves, spec, targets, [0])
    assert closed is not None
    want_losses, want_grads = observe_mod._losses_and_gradients(loss_fn, targets, B, leaves, spec, [0])
    torch.testing.assert_close(closed[0], want_losses.detach(), rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(closed[1][0], want_grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda out, y: F.cross_entropy(out, y, weight=torch.arange(1.0, C + 1, dtype=torch.float64)),
        lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1),
        lambda out, y: F.cross_entropy(out, y, reduction="sum"),
        lambda out, y: F.cross_entropy(out * 2, y),  # another op: not a traced standard loss
        F.mse_loss,
    ],
)
def test_other_losses_take_autograd(loss_fn):
    leaves = _leaves()
    spec = torch.utils._pytree.tree_flatten(leaves[0])[1]
    targets = torch.randn(B, C, dtype=torch.float64) if loss_fn is F.mse_loss else torch.tensor([0, 1, 2, 3, 4, 0])
    assert observe_mod._cross_entropy_at_output(loss_fn, leaves, spec, targets, [0]) is None


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, C)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("scale", [1.0 / B, 1.0, 0.25])  # a mean, a sum, a mean over 4 accumulation steps
def test_observe_with_the_closed_form_gives_the_oracle(scale, monkeypatch):
    """A plain cross-entropy's weights come from the closed form (autograd's path is not taken), and the
    statistics are the float64 oracle's whatever the backwarded loss's w."""
    monkeypatch.setattr(observe_mod, "_losses_and_gradients", None)  # called: a TypeError
    torch.manual_seed(0)
    model = _Net().double()
    x, y = torch.randn(B, 4, dtype=torch.float64), torch.randint(0, C, (B,))
    want = oracle_stats(model, F.cross_entropy, x, y)
    tracker = persample.Tracker(model, F.cross_entropy)
    with tracker.observe(y) as observed:
        (F.cross_entropy(model(x), y, reduction="sum") * scale).backward()
    assert observed.weight == pytest.approx(scale, rel=1e-12)
    assert_dicts_close(observed.stats.mean, want["mean"])
    assert_dicts_close(observed.stats.var, want["var"], atol=1e-11)
    assert_dicts_close(observed.stats.param_sq_norms, want["param_sq_norms"])


def test_a_loss_that_is_not_the_declared_cross_entropy_is_still_refused():
    """The closed form describes the declared loss only: a backwarded loss with label smoothing (or class
    weights) is not a multiple of it at the output, and is refused as before."""
    torch.manual_seed(0)
    model = _Net().double()
    x, y = torch.randn(B, 4, dtype=torch.float64), torch.randint(0, C, (B,))
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(persample.ObservationError) as info:
        with tracker.observe(y):
            F.cross_entropy(model(x), y, label_smoothing=0.2).backward()
    assert info.value.code == "OBSERVE_NOT_WEIGHTED_SUM"
