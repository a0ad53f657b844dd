"""Parameters whose mean the fast engine takes from its own per-example gradients.

For a Linear on sequences and for convolutions the reductions form every g_i
anyway, so Σ_i g_i is the weight gradient and autograd skips that GEMM
(``engine.derived_parameters``). These tests pin which weights qualify, that the
skipped gradient really is skipped, and that mean, variance and norms stay
equal to the float64 oracle in every path of ``Piece.moments``: one chunk,
several chunks, and a shift so far from the mean that the two-pass fallback
must take over.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.engines.fast import engine, pieces

from zoo import assert_dicts_close, gpt2_tiny, lm_loss, oracle_grads


def _oracle(model, loss_fn, x, y):
    grads, _ = oracle_grads(model, loss_fn, x, y)
    return (
        {k: g.mean(0) for k, g in grads.items()},
        {k: g.var(0) for k, g in grads.items()},
        {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()},
    )


def _assert_oracle(stats, model, loss_fn, x, y, rtol=1e-9):
    mean, var, sq = _oracle(model, loss_fn, x, y)
    assert_dicts_close(stats.mean, mean, rtol=rtol)
    if stats.m2 is not None:
        assert_dicts_close(stats.var, var, rtol=rtol)
    assert_dicts_close(stats.param_sq_norms, sq, rtol=rtol)


def _sequence_loss(out, y):
    return F.cross_entropy(out.mean(1), y)


def _spy_derived(monkeypatch) -> list:
    seen = []
    original = engine.derived_parameters

    def spy(units, params, var, **kwargs):
        found = original(units, params, var, **kwargs)
        seen.append(sorted(found))
        return found

    monkeypatch.setattr(engine, "derived_parameters", spy)
    return seen


def _spy_two_pass(monkeypatch) -> list:
    """The pieces whose M2 the two-pass ``centered_second_moment`` computes, in call order."""
    seen = []
    original = pieces.Piece.centered_second_moment

    def spy(self, mean):
        seen.append(self)
        return original(self, mean)

    monkeypatch.setattr(pieces.Piece, "centered_second_moment", spy)
    return seen


@pytest.mark.parametrize("var", [True, False])
def test_sequence_linear_and_conv_weights_are_derived_and_exact(monkeypatch, var):
    torch.manual_seed(0)
    seen = _spy_derived(monkeypatch)
    seq = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(6, 10, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    _assert_oracle(persample.grad_stats(seq, _sequence_loss, x, y, engine="fast", var=var), seq, _sequence_loss, x, y)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    xc = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    _assert_oracle(
        persample.grad_stats(conv, F.cross_entropy, xc, y[:5], engine="fast", var=var), conv, F.cross_entropy, xc, y[:5]
    )
    assert seen == [["0.bias", "0.weight", "2.bias", "2.weight"], ["0.bias", "0.weight"]]  # never the T = 1 head


def test_mlp_weights_keep_autograds_mean(monkeypatch):
    seen = _spy_derived(monkeypatch)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    persample.grad_stats(mlp, F.cross_entropy, torch.randn(6, 5), torch.randint(0, 3, (6,)), engine="fast")
    assert seen == [[]]  # T = 1: the Goodfellow forms never form g_i, so autograd's GEMM stays


def test_short_sequences_without_variance_keep_the_ghost_norm(monkeypatch):
    seen = _spy_derived(monkeypatch)
    seq = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(6, engine.MIN_POSITIONS_TO_FORM - 1, 5), torch.randint(0, 3, (6,))
    persample.grad_stats(seq, _sequence_loss, x, y, engine="fast", var=False)
    persample.grad_stats(seq, _sequence_loss, x, y, engine="fast", var=True)
    assert seen == [[], ["0.bias", "0.weight", "2.bias", "2.weight"]]


def test_the_skipped_gradients_are_not_computed(monkeypatch):
    """autograd is asked for the Linears' outputs (edges), not their parameters."""
    asked = []
    original = engine._autograd_means

    def spy(mean_loss, inputs, *rest):
        asked.append(inputs)
        return original(mean_loss, inputs, *rest)

    monkeypatch.setattr(engine, "_autograd_means", spy)
    seq = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    persample.grad_stats(seq, _sequence_loss, torch.randn(4, 9, 5), torch.randint(0, 3, (4,)), engine="fast")
    assert not [t for t in asked[0] if isinstance(t, torch.Tensor)]
    assert len(asked[0]) == 2  # one output edge per Linear


@pytest.mark.parametrize("var", [True, False])
def test_tied_embedding_and_output_projection_of_gpt2(monkeypatch, var):
    torch.manual_seed(0)
    seen = _spy_derived(monkeypatch)
    model = gpt2_tiny().double()
    x = torch.randint(0, model.config.vocab_size, (4, 9))
    _assert_oracle(persample.grad_stats(model, lm_loss, x, x, engine="fast", var=var), model, lm_loss, x, x)
    assert "transformer.wte.weight" in seen[0] and "transformer.wpe.weight" not in seen[0]


def test_several_chunks_with_the_shift_from_the_first(monkeypatch):
    monkeypatch.setattr(pieces, "CHUNK_ELEMENTS", 7 * 5 * 2)  # two examples per chunk of the first layer
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(7, 10, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    _assert_oracle(persample.grad_stats(seq, _sequence_loss, x, y, engine="fast"), seq, _sequence_loss, x, y)


def test_a_far_shift_falls_back_to_the_two_pass_variance(monkeypatch):
    """M2 = S − B·(h̄ − c)² around the first chunk's mean c has S/M2 ≤ 1 + B/b (b: the chunk's
    examples), so it can lose digits only for a large batch with an outlier first chunk: here
    B = 1200, one example per chunk, example 0 at 1e4 σ. That piece must be flagged and its M2
    recomputed around the mean."""
    monkeypatch.setattr(pieces, "CHUNK_ELEMENTS", 2)  # one example (a 1 × 2 weight) per chunk
    two_pass = _spy_two_pass(monkeypatch)
    torch.manual_seed(0)
    B, T = 1200, 2
    x = 1.0 + torch.randn(B, T, 2) * 1e-4
    x[0] += 1.0
    model = nn.Linear(2, 1, bias=False)
    y = torch.full((B, T, 1), -5.0)
    stats = persample.grad_stats(model, F.mse_loss, x, y, engine="fast")
    assert len(two_pass) == 1
    model64 = nn.Linear(2, 1, bias=False).double()
    model64.load_state_dict(model.state_dict())
    grads, _ = oracle_grads(model64, F.mse_loss, x.double(), y.double())
    exact = grads["weight"].var(0)
    relative = ((stats.var["weight"].double() - exact).abs() / exact).max().item()
    assert relative < 1e-4, relative


def test_one_chunk_is_the_exact_two_pass_variance_even_far_from_zero(monkeypatch):
    """When the whole batch is one chunk, its mean is the batch mean: M2 = Σ_i (h_i − h̄)² is formed
    directly (in place in the chunk), with no shift correction and no cancellation check, so float32
    M2 stays accurate at |ḡ|/σ ≈ 1e4 without the second formation a suspect piece would cost."""
    two_pass = _spy_two_pass(monkeypatch)
    torch.manual_seed(0)
    B, T = 64, 3
    x = 1.0 + torch.randn(B, T, 4) * 1e-4
    model = nn.Linear(4, 2)
    y = torch.full((B, T, 2), -5.0)
    stats = persample.grad_stats(model, F.mse_loss, x, y, engine="fast")
    assert two_pass == []
    model64 = nn.Linear(4, 2).double()
    model64.load_state_dict(model.state_dict())
    grads, _ = oracle_grads(model64, F.mse_loss, x.double(), y.double())
    for name in ("weight", "bias"):  # the one-pass Σg² − B·ḡ² would have lost every digit (σ²/ḡ² ≈ 1e-8 < ε)
        exact = grads[name].var(0)
        relative = ((stats.var[name].double() - exact).abs() / exact).max().item()
        assert relative < 1e-2, (name, relative)  # the float32 forward's own rounding: about 3e-3
        assert torch.allclose(stats.mean[name].double(), grads[name].mean(0), rtol=1e-5)
