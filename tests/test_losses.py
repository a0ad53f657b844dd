"""Closed-form per-example losses equal loss_fn on a batch of one, for every option."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from persample.engines.fast.losses import closed_form_losses, traced_standard_loss

torch.manual_seed(0)
WEIGHTS = torch.rand(5, dtype=torch.float64) + 0.1


def _by_loop(loss_fn, output, target):
    return torch.stack([loss_fn(output[i : i + 1], target[i : i + 1]) for i in range(output.shape[0])])


def _class_target(shape, ignore=False):
    t = torch.randint(0, 5, shape)
    if ignore:
        t[0].view(-1)[0] = -100
    return t


CASES = [
    ("ce_fn", F.cross_entropy, (6, 5), (6,), False),
    ("ce_module_weights", nn.CrossEntropyLoss(weight=WEIGHTS), (6, 5), (6,), False),
    ("ce_sequence_ignore", nn.CrossEntropyLoss(ignore_index=-100), (6, 5, 4), (6, 4), True),
    ("ce_smoothing_weights", nn.CrossEntropyLoss(weight=WEIGHTS, label_smoothing=0.2), (6, 5, 3), (6, 3), True),
    ("nll", nn.NLLLoss(weight=WEIGHTS), (6, 5), (6,), False),
    ("mse", nn.MSELoss(), (6, 3, 2), None, False),
    ("l1_fn", F.l1_loss, (6, 4), None, False),
    ("bce_pos_weight", nn.BCEWithLogitsLoss(pos_weight=torch.rand(4, dtype=torch.float64)), (6, 4), None, False),
    ("ce_wrapper", lambda o, t: F.cross_entropy(o, t), (6, 5), (6,), False),
    (
        "module_in_wrapper_reading_shapes",
        lambda o, t: nn.MSELoss()(o, t) if o.shape == t.shape else None,
        (6, 3),
        None,
        False,
    ),
]


@pytest.mark.parametrize("name, loss_fn, out_shape, target_shape, ignore", CASES, ids=[c[0] for c in CASES])
def test_closed_form_equals_batch_of_one(name, loss_fn, out_shape, target_shape, ignore):
    output = torch.randn(*out_shape, dtype=torch.float64)
    if target_shape is None:
        target = torch.rand(*out_shape, dtype=torch.float64)
    else:
        target = _class_target(target_shape, ignore)
    if name == "nll":
        output = output.log_softmax(1)
    closed = closed_form_losses(loss_fn, output, target)
    assert closed is not None
    torch.testing.assert_close(closed, _by_loop(loss_fn, output, target), rtol=1e-12, atol=1e-12)


def test_example_with_only_ignored_targets_is_nan_like_the_loss_itself():
    output, target = torch.randn(2, 5, 3, dtype=torch.float64), torch.full((2, 3), -100)
    target[1] = 2
    closed = closed_form_losses(F.cross_entropy, output, target)
    reference = _by_loop(F.cross_entropy, output, target)
    assert torch.isnan(closed[0]) and torch.isnan(reference[0])
    torch.testing.assert_close(closed[1], reference[1], rtol=1e-9, atol=1e-12)


def _raises_on_batches(o, t):
    if o.shape[0] != 1:
        raise ValueError("one example at a time")
    return F.cross_entropy(o, t)


@pytest.mark.parametrize(
    "loss_fn, output, target",
    [
        (lambda o, t: 2 * F.cross_entropy(o, t), torch.randn(3, 4), torch.randint(0, 4, (3,))),  # result changed
        (lambda o, t: F.cross_entropy(o, t) + o.square().mean(), torch.randn(3, 4), torch.randint(0, 4, (3,))),
        (lambda o, t: F.cross_entropy(o.log_softmax(1), t), torch.randn(3, 4), torch.randint(0, 4, (3,))),
        (lambda o, t: F.cross_entropy(o[:, :2], t), torch.randn(3, 4), torch.randint(0, 2, (3,))),  # sliced output
        (lambda o, t: F.cross_entropy(o, t.clone()), torch.randn(3, 4), torch.randint(0, 4, (3,))),
        (lambda o, t: F.cross_entropy(torch.randn(3, 4), t), torch.randn(3, 4), torch.randint(0, 4, (3,))),
        (_raises_on_batches, torch.randn(3, 4), torch.randint(0, 4, (3,))),
        (F.cross_entropy, torch.randn(3, 4), None),  # no targets
        (nn.CrossEntropyLoss(reduction="sum"), torch.randn(3, 4), torch.randint(0, 4, (3,))),  # other reduction
        (nn.MSELoss(), torch.randn(3, 4), torch.randn(3, 1)),  # broadcasting
        (F.cross_entropy, torch.randn(3, 4), torch.rand(3, 4)),  # probability targets
        (nn.BCEWithLogitsLoss(weight=torch.rand(4)), torch.randn(3, 4), torch.rand(3, 4)),  # element weights
    ],
)
def test_no_closed_form_falls_back(loss_fn, output, target):
    assert closed_form_losses(loss_fn, output, target) is None


def test_the_trace_stops_at_the_first_operation_that_is_not_the_loss_call():
    """A language-model loss that slices the logits first is not standard: the trace must stop there
    instead of running the rest of loss_fn (a full cross-entropy, computed again by vmap after it)."""
    reached = []

    def sliced_loss(logits, tokens):
        shifted = logits[:, :-1]
        reached.append("after the slice")
        return F.cross_entropy(shifted.flatten(0, 1), tokens[:, 1:].flatten())

    logits, tokens = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    assert traced_standard_loss(sliced_loss, logits, tokens) is None
    assert reached == []
    assert closed_form_losses(sliced_loss, logits, tokens) is None


@pytest.mark.parametrize("name", ["gaussian_nll", "masked_select"])
def test_a_loss_vmap_cannot_run_is_not_exact_and_auto_falls_back(name):
    """A loss without a closed form that torch.func.vmap cannot run per example (a data-dependent check,
    an op without a batching rule) was a raw RuntimeError from the fast engine, so engine='auto' never
    reached the engines that handle it; it is NotExact now, and auto gives the loop's numbers."""
    import persample

    torch.manual_seed(0)
    model = nn.Linear(6, 6).double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    if name == "gaussian_nll":

        def loss_fn(o, t):
            return F.gaussian_nll_loss(o[:, :3], t, F.softplus(o[:, 3:]) + 0.1)
    else:

        def loss_fn(o, t):
            return torch.masked_select(o[:, :3] - t, (t > 0)).pow(2).sum()

    with pytest.raises(persample.NotExact, match="vmap cannot evaluate loss_fn"):
        persample.grad_stats(model, loss_fn, x, y, engine="fast")
    with pytest.warns(persample.SlowPathWarning):
        auto = persample.grad_stats(model, loss_fn, x, y, engine="auto")
    from oracle_stats import oracle_stats

    want = oracle_stats(model, loss_fn, x, y)  # the float64 loop of autograd, not persample's loop engine
    for k in want["mean"]:
        torch.testing.assert_close(auto.mean[k], want["mean"][k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(auto.var[k], want["var"][k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(auto.sq_norms, want["sq_norms"], rtol=1e-9, atol=1e-12)
