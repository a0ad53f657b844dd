"""The batch-loss check at the output takes the per-example losses and their gradient at the output from
the fast engine's own backward (``engine.AtOutput``) instead of evaluating and differentiating them again
(issue 22, the GPT-2 case: a vmap of the loss over 16 × 128 × 1000 logits and a loss-only backward).

It must still refuse every coupled loss, and the weights it derives from the engine's gradient must be
those it derives on its own.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
import persample.engines.fast as fast_package
from persample import BatchLossMismatch
from persample._batch import as_batch
from persample.batch_loss import weights_at_output
from persample.engines.fast.engine import fast_pieces

from test_silent_coupled_losses import NAMES, _case


@pytest.fixture
def check_evaluations(monkeypatch):
    """How often the check (not the engine) evaluates the per-example losses."""
    calls = []
    original = fast_package.per_example_losses

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fast_package, "per_example_losses", counted)
    return calls


def sliced_token_loss(out, tokens):
    """A next-token loss that slices the logits: no closed form, so the engine vmaps it per example."""
    return F.cross_entropy(out[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def _token_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 11)).double()
    tokens = torch.randint(0, 11, (5, 7))
    return model, tokens


@pytest.mark.parametrize("name", NAMES)
def test_a_coupled_loss_is_still_refused_from_the_engines_gradient(name, check_evaluations):
    model, loss_fn, x, y = _case(name)
    with pytest.raises(BatchLossMismatch, match=r"\[BATCH_LOSS_COUPLED\]"):
        persample.grad_stats(model, loss_fn, x, y, engine="fast")
    assert check_evaluations == []  # the check reused the engine's losses and gradient


def test_the_check_reuses_the_engines_losses_and_the_statistics_are_unchanged(check_evaluations):
    model, tokens = _token_model()
    checked = persample.grad_stats(model, sliced_token_loss, tokens, tokens, engine="fast")
    assert check_evaluations == []
    unchecked = persample.grad_stats(model, sliced_token_loss, tokens, tokens, engine="fast", batch_loss_check=False)
    for field in ("mean", "m2", "param_sq_norms"):
        for k, v in getattr(checked, field).items():
            assert torch.equal(v, getattr(unchecked, field)[k])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weights_from_the_engines_gradient_are_the_checks_own(reduction):
    model, tokens = _token_model()

    def loss_fn(out, t):
        return F.cross_entropy(out[:, :-1].flatten(0, 1), t[:, 1:].flatten(), reduction=reduction)

    kept: list = []
    fast_pieces(model, loss_fn, as_batch(tokens, tokens), keep_output=kept)
    output, standard, at_output = kept
    assert not standard and at_output is not None
    reused, _ = weights_at_output(loss_fn, loss_fn, output, tokens, 5, at_output=at_output)
    own, _ = weights_at_output(loss_fn, loss_fn, output, tokens, 5)
    expected = torch.full((5,), 1 / 5 if reduction == "mean" else 1.0, dtype=torch.float64)
    torch.testing.assert_close(reused, own, rtol=1e-12, atol=0)
    torch.testing.assert_close(reused, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_tracker_step_reads_its_weights_from_the_engines_gradient(reduction, check_evaluations):
    model, tokens = _token_model()
    reference = copy.deepcopy(model)

    def loss_fn(out, t):
        return F.cross_entropy(out[:, :-1].flatten(0, 1), t[:, 1:].flatten(), reduction=reduction)

    seen = []
    tracker = persample.Tracker(model, loss_fn, engine="fast")
    tracker.register_hook(lambda _, stats: seen.append(stats))
    tracker.step(tokens, tokens)
    assert check_evaluations == [] and len(seen) == 1
    loss_fn(reference(tokens), tokens).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=name)
