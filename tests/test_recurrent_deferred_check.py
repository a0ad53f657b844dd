"""A recurrent layer's check that its output is its cell equations' is read with the step's other host reads
(``grad_stats`` and ``Tracker.step``: one read per statistics step). Meanwhile the output is taken as the
top layer's states; where the check then fails, the step's results are dropped and it runs again with every
layer recomputed step by step, from the buffers and random generators as the step found them. These tests
make the check fail (an output changed in place after the call) and compare with the float64 oracle and
with autograd; and make it pass, where the step must run once."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.engines.fast import engine as engine_module

from zoo import assert_dicts_close, oracle_grads

B, T, IN, H, CLASSES = 5, 6, 3, 4, 3


class ChangedOutput(nn.Module):
    """A buffer the forward moves (a count of training forwards, which a second forward would move again),
    a recurrent layer whose output the forward scales in place after the call when ``change`` (then it is
    not the cell equations' output), and a head on the time-mean of the output and on h_n."""

    def __init__(self, cell: type[nn.RNNBase], change: bool):
        super().__init__()
        self.rnn = cell(IN, H, batch_first=True)
        self.head = nn.Linear(2 * H, CLASSES)
        self.change = change
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.forwards.add_(1)
        out, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state
        if self.change:
            out[:, T // 2 :].mul_(0.5)
        return self.head(torch.cat([out.mean(1), h_n[-1]], 1))


def _loss(logits, y):
    return F.cross_entropy(logits, y)


def _model_and_batch(cell, change, seed=0):
    torch.manual_seed(seed)
    model = ChangedOutput(cell, change).double()
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(B, T, IN, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (B,), generator=g)


@pytest.fixture
def engine_runs(monkeypatch):
    """How many times the fast engine ran its forward and backward."""
    runs = []
    real = engine_module.fast_pieces

    def spy(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "fast_pieces", spy)
    return runs


def _assert_oracle(stats, model, x, y):
    grads, losses = oracle_grads(model, _loss, x, y)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()}, atol=1e-12)
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-12)
    assert_dicts_close(stats.param_sq_norms, {k: g.reshape(B, -1).pow(2).sum(1) for k, g in grads.items()}, atol=1e-12)
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cell", [nn.GRU, nn.RNN])
@pytest.mark.parametrize("change", [False, True])
def test_grad_stats_equals_the_oracle_and_runs_again_only_where_the_output_was_changed(cell, change, engine_runs):
    model, x, y = _model_and_batch(cell, change)
    stats = persample.grad_stats(model, _loss, x, y, engine="fast")
    _assert_oracle(stats, model, x, y)
    assert len(engine_runs) == (2 if change else 1)


@pytest.mark.parametrize("cell", [nn.GRU, nn.RNN])
@pytest.mark.parametrize("change", [False, True])
def test_tracker_step_leaves_what_one_training_step_leaves(cell, change, engine_runs):
    """p.grad as loss.backward() leaves it, and the buffers as one training forward leaves them (not two)."""
    model, x, y = _model_and_batch(cell, change, seed=3)
    reference = copy.deepcopy(model)
    _loss(reference(x), y).backward()
    tracker = persample.Tracker(model, _loss)
    stats = tracker.step(x, y)
    assert stats is not None
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=name)
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0, msg=name)
    assert int(model.forwards) == 1
    assert len(engine_runs) == (2 if change else 1)


def test_the_check_is_read_with_the_steps_other_reads():
    """One host read per statistics step with an LSTM, also where the output checks out (after a first call,
    whose one-time checks of the model read more)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import call_counts
    finally:
        sys.path.pop(0)
    model, x, y = _model_and_batch(nn.LSTM, change=False)
    persample.grad_stats(model, _loss, x, y, engine="fast")
    with call_counts.SyncCounter() as counter:
        persample.grad_stats(model, _loss, x, y, engine="fast")
    assert counter.total == 1, dict(counter.counts)
    tracker = persample.Tracker(model, _loss)
    tracker.step(x, y)
    with call_counts.SyncCounter() as counter:
        tracker.step(x, y)
    assert counter.total == 1, dict(counter.counts)


def test_an_error_of_the_step_itself_is_raised_as_it_is(engine_runs):
    """A step that raises for its own reasons (here a loss that does not fit the output) is not run again."""
    model, x, y = _model_and_batch(nn.GRU, change=False)
    with pytest.raises(Exception) as raised:
        persample.grad_stats(model, _loss, x, torch.randint(0, CLASSES + 5, (B,)) + CLASSES, engine="fast")
    assert not isinstance(raised.value, persample.NotExact) or raised.value.code
    assert len(engine_runs) <= 1
