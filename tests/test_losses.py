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


# ------------------------------------------------------------------ views of the output and targets
B, T, V = 3, 6, 5


def _lm_batch(ignore=True):
    g = torch.Generator().manual_seed(4)
    logits, tokens = torch.randn(B, T, V, generator=g, dtype=torch.float64), torch.randint(0, V, (B, T), generator=g)
    if ignore:
        tokens[0, 2:4] = -100
        tokens[2, -1] = -100
    return logits, tokens


VIEWED = {
    "shifted-flatten": lambda o, t: F.cross_entropy(o[:, :-1].flatten(0, 1), t[:, 1:].flatten()),
    "shifted-reshape-float": lambda o, t: F.cross_entropy(
        o[:, :-1].contiguous().float().reshape(-1, o.shape[-1]), t[:, 1:].reshape(-1)
    ),
    "view-ignore-weights-smoothing": lambda o, t: F.cross_entropy(
        o.reshape(-1, V).view(-1, V), t.view(-1), weight=WEIGHTS, label_smoothing=0.1
    ),
    "transposed-classes": lambda o, t: F.cross_entropy(o.transpose(1, 2), t),
    "permuted-classes": lambda o, t: F.cross_entropy(o.permute(0, 2, 1), t),
    "last-position": lambda o, t: F.cross_entropy(o[:, -1], t[:, 0]),
    "positions-slice": lambda o, t: F.cross_entropy(o[:, 1:4].flatten(0, 1), t[:, 1:4].flatten()),
    "ellipsis": lambda o, t: F.cross_entropy(o[:, ...].flatten(0, 1), t.flatten()),
}


@pytest.mark.parametrize("name", list(VIEWED))
def test_a_loss_on_views_that_keep_examples_together_has_a_closed_form(name):
    """With the batch size, a standard loss on views of the output and targets that keep each example's
    numbers together (an LM's shifted tokens, flattened) has its closed form, equal to loss_fn on each
    example alone; without it, only the tensors themselves qualify (as before)."""
    logits, tokens = _lm_batch()
    loss_fn = VIEWED[name]
    closed = closed_form_losses(loss_fn, logits, tokens, B)
    assert closed is not None
    torch.testing.assert_close(closed.double(), _by_loop(loss_fn, logits, tokens).double(), rtol=1e-6, atol=1e-6)
    assert closed_form_losses(loss_fn, logits, tokens) is None


def test_an_elementwise_loss_on_rows_regrouped_by_a_reshape():
    """A reshape to 2B rows gives each example two rows (its numbers in logical row-major order)."""
    g = torch.Generator().manual_seed(5)
    output, target = (
        torch.randn(B, T, V, generator=g, dtype=torch.float64),
        torch.randn(B, T, V, generator=g, dtype=torch.float64),
    )

    def loss_fn(o, t):
        return F.mse_loss(o.reshape(2 * B, -1), t.reshape(2 * B, -1))

    closed = closed_form_losses(loss_fn, output, target, B)
    assert closed is not None
    torch.testing.assert_close(closed, _by_loop(loss_fn, output, target), rtol=1e-12, atol=1e-12)


NOT_GROUPED = {
    "rows-sliced": lambda o, t: F.cross_entropy(o[1:].flatten(0, 1), t[1:].flatten()),
    "rows-strided": lambda o, t: F.cross_entropy(o[::2].flatten(0, 1), t[::2].flatten()),
    "dim-zero-moved": lambda o, t: F.cross_entropy(o.transpose(0, 1).flatten(0, 1), t.t().flatten()),
    "permute-moves-dim-zero": lambda o, t: F.cross_entropy(o.permute(1, 0, 2).flatten(0, 1), t.t().flatten()),
    "targets-moved-only": lambda o, t: F.cross_entropy(o.flatten(0, 1), t.t().flatten()),
    "tensor-index": lambda o, t: F.cross_entropy(o[:, torch.tensor([0, 2])].flatten(0, 1), t[:, :2].flatten()),
    "rows-differ": lambda o, t: F.mse_loss(o[:, :2, :3].flatten(0, 1), o[:, :3, :2].detach().flatten(0, 1)),
    "op-after-views": lambda o, t: F.cross_entropy(o[:, :-1].log_softmax(-1).flatten(0, 1), t[:, 1:].flatten()),
    "bit-cast": lambda o, t: F.cross_entropy(o.view(torch.int64).view(torch.float64).flatten(0, 1), t.flatten()),
    "input-from-targets": lambda o, t: F.mse_loss(t.double().flatten(), o[:, :, 0].flatten()),
}


@pytest.mark.parametrize("name", list(NOT_GROUPED))
def test_views_that_mix_or_move_examples_have_no_closed_form(name):
    logits, tokens = _lm_batch(ignore=False)
    assert closed_form_losses(NOT_GROUPED[name], logits, tokens, B) is None


def test_the_trace_runs_the_views_and_stops_at_the_first_other_operation():
    computed = []

    def loss_fn(logits, tokens):
        shifted = logits[:, :-1]
        computed.append("slice")
        scores = shifted.log_softmax(-1)  # not a view: the trace stops here, before it is computed
        computed.append("log_softmax")
        return F.nll_loss(scores.flatten(0, 1), tokens[:, 1:].flatten())

    logits, tokens = _lm_batch()
    assert traced_standard_loss(loss_fn, logits, tokens, B) is None
    assert computed == ["slice"]


def test_the_fast_engine_takes_a_shifted_language_model_loss_in_closed_form():
    """grad_stats on a model with the shifted next-token loss: no vmap of the loss (closed form) and equal to
    the float64 per-example loop."""
    import persample
    from persample.engines.fast import engine as engine_module
    from zoo import assert_dicts_close, oracle_grads

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, V)).double()
    _, tokens = _lm_batch()
    tokens = tokens.clamp(min=0)
    labels = tokens.clone()
    labels[0, 3] = -100

    def lm_loss(logits, labels):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    assert closed_form_losses(lm_loss, model(tokens), labels, B) is not None
    real = engine_module.vmap
    vmapped = []

    def spy(*args, **kwargs):
        vmapped.append(1)
        return real(*args, **kwargs)

    engine_module.vmap = spy
    try:
        stats = persample.grad_stats(model, lm_loss, tokens, labels, engine="fast")
    finally:
        engine_module.vmap = real
    assert not vmapped
    grads, losses = oracle_grads(model, lm_loss, tokens, labels)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()}, atol=1e-12)
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-12)
    torch.testing.assert_close(stats.losses, losses, rtol=1e-10, atol=1e-12)
