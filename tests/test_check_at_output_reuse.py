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
from persample import BatchLossMismatch
from persample._batch import as_batch
from persample.batch_loss import weights_at_output
from persample.engines.fast.engine import fast_pieces

from test_silent_coupled_losses import NAMES, _case


def sliced_token_loss(out, tokens):
    """A next-token loss written through log_softmax: no closed form (the plain cross-entropy of the shifted,
    flattened logits has one), so the engine vmaps it per example."""
    return F.nll_loss(out[:, :-1].log_softmax(-1).flatten(0, 1), tokens[:, 1:].flatten())


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
    if name != "moe":  # (the MoE model returns its logits and its router's: two leaves, checked on a copy)
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

    def loss_fn(out, t):  # (through log_softmax: no closed form, the engine vmaps it)
        return F.nll_loss(out[:, :-1].log_softmax(-1).flatten(0, 1), t[:, 1:].flatten(), reduction=reduction)

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


class _EncoderDecoder(nn.Module):
    """Returns (logits, encoder state) where the decoder reads the encoder state, as Hugging Face's
    encoder-decoder outputs do (``encoder_last_hidden_state`` beside ``logits``)."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        state = torch.tanh(self.encoder(x))
        return self.decoder(state), state


def _logits_loss(output, y):
    return F.cross_entropy(output[0].flatten(0, 1), y.flatten())


@pytest.mark.parametrize("entry", ["grad_stats", "step", "per_sample_grads"])
def test_an_output_leaf_that_feeds_another_is_not_read_off_the_engines_backward(entry):
    """The backward's gradient at the encoder state is the loss's total derivative there (through the
    decoder), not the derivative through that leaf of the output alone, which is zero: read off the
    backward, it made the check see a coupled loss (BART and T5 were refused with BATCH_LOSS_COUPLED)."""
    from zoo import oracle_grads

    torch.manual_seed(0)
    model = _EncoderDecoder().double()
    x, y = torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6, 4))
    grads, _ = oracle_grads(model, _logits_loss, x, y)
    if entry == "grad_stats":
        stats = persample.grad_stats(model, _logits_loss, x, y, engine="fast")
    elif entry == "step":
        stats = persample.Tracker(model, _logits_loss).step(x, y)
    else:
        rows = persample.per_sample_grads(model, _logits_loss, x, y, engine="fast")
        for k, g in grads.items():
            torch.testing.assert_close(rows[k], g, rtol=1e-9, atol=1e-12)
        return
    for k, g in grads.items():
        torch.testing.assert_close(stats.mean[k], g.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.param_sq_norms[k], g.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
