"""A module without a rule that torch.func cannot run (an ``autograd.Function`` without ``setup_context``, an
integer output, ``.item()``): the fast engine refused ``FALLBACK_NOT_ISOLATED`` and ``auto`` took the per-example
loop (HY-V4's attention, which returns int32 indices; Zaya; 6 runs of the architecture sweep). Where every
output and input is batched on dim 0 or shared, the module is now called on each example alone, its outputs
compared with the batch's rows and the per-example gradients' sum with autograd's; a module that mixes the
examples, or keeps a state sized to the batch, stays refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from oracle_stats import assert_stats_match_rows, keyword_oracle_rows


class OldStyleScale(torch.autograd.Function):
    """y = x · w, written without ``setup_context`` (torch.func refuses it)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * w, (grad * x).sum_to_size(w.shape)


class Gate(nn.Module):
    """``[B, T, d]`` and shared positions ``[1, T]`` in; the gated rows and their int32 argmax out."""

    def __init__(self, mix: bool = False):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.pos = nn.Parameter(torch.randn(6, 3, dtype=torch.float64))
        self.mix = mix

    def forward(self, h, positions):
        if self.mix:  # the batch's mean: example b's rows depend on the others
            h = h - h.mean(0, keepdim=True).detach() * 0.5
        y = OldStyleScale.apply(h + self.pos[positions], self.w)
        return y, y.argmax(-1).to(torch.int32)


class Model(nn.Module):
    def __init__(self, mix: bool = False):
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        self.gate = Gate(mix)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1])[None]
        y, _ = self.gate(torch.tanh(self.embed(ids)), positions)
        return self.head(y).mean(1)


def _batch(batch: int):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 10, (batch, 5), generator=g), torch.randn(batch, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("batch", [3, 4])
def test_a_module_torch_func_cannot_run_is_computed_example_by_example(batch):
    torch.manual_seed(0)
    model = Model().double()
    ids, y = _batch(batch)
    rows, losses = keyword_oracle_rows(model, lambda out, i: F.mse_loss(out, y[i : i + 1]), {"ids": ids}, batch)
    assert_stats_match_rows(persample.grad_stats(model, F.mse_loss, ids, y, engine="fast"), rows, losses)
    assert persample.explain(model, F.mse_loss, ids, y).entry_points["grad_stats"] == "fast"


def test_such_a_module_that_mixes_the_examples_stays_refused():
    torch.manual_seed(0)
    model = Model(mix=True).double()
    ids, y = _batch(4)
    with pytest.raises(persample.NotExact) as raised:
        persample.grad_stats(model, F.mse_loss, ids, y, engine="fast")
    assert raised.value.code == "TOKEN_ROWS_DIFFER", str(raised.value)  # its rows, alone, are not the batch's


class Stateful(nn.Module):
    """Keeps a state of the batch's shape across calls (RecurrentGemma's RG-LRU): alone, it cannot run."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.state: torch.Tensor | None = None

    def forward(self, h):
        if self.state is None:  # the first batch's shape, kept
            self.state = torch.zeros(h.shape[0], h.shape[2], dtype=h.dtype)
        y = OldStyleScale.apply(h, self.w) + self.state[:, None].expand(h.shape)
        return y


def test_a_module_with_a_state_of_the_batch_stays_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 3), Stateful(), nn.Flatten(), nn.Linear(15, 2)).double()
    ids, y = _batch(4)
    with pytest.raises(persample.NotExact) as raised:
        persample.grad_stats(model, F.mse_loss, ids, y, engine="fast")
    assert raised.value.code == "FALLBACK_NOT_ISOLATED", str(raised.value)


class Scale(nn.Module):
    """A module without a rule whose parameter its parent uses through another method (JetMoE's attention
    experts: ``map`` and ``reduce``, never ``forward``)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def apply_to(self, h):
        return h * self.w


class UsesScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = Scale()

    def forward(self, x):
        return self.scale.apply_to(self.lin(x))


def test_a_module_whose_parameters_are_used_without_calling_it_is_refused():
    """Its per-example gradients would be zeros. Two examples whose gradients cancel make the sum check pass
    (0 = 0), so the graph audit must refuse it itself."""
    torch.manual_seed(0)
    model = UsesScale().double()
    x = torch.randn(1, 3, dtype=torch.float64).repeat(2, 1)
    y = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]], dtype=torch.float64)

    def loss(out, y):
        return (out * y).sum(-1).mean()

    with pytest.raises(persample.NotExact) as raised:
        persample.grad_stats(model, loss, x, y, engine="fast")
    assert raised.value.code == "PARAMETER_USED_OUTSIDE", str(raised.value)
