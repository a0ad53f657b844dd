"""Drop-in gaps of Tracker.step / observe found in real training loops (issue 13)."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import Tracker
from persample.loggers import Diagnostics

from zoo import assert_dicts_close, oracle_grads


class TwoHeads(nn.Module):
    """A shared trunk and two task heads; each batch uses one head (the other gets no gradient)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 3)])

    def forward(self, x, task: int = 0):
        return self.heads[task](torch.tanh(self.trunk(x)))


def _data(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


@pytest.mark.parametrize("every", [1, 2])
def test_a_head_the_loss_does_not_reach_keeps_grad_none_and_adamw_matches(every):
    """Statistics steps used to write zeros: AdamW's weight decay then moved the unused head."""
    torch.manual_seed(0)
    model = TwoHeads().double()
    plain, tracked = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(tracked.parameters(), lr=1e-2, weight_decay=0.1)
    tracker = Tracker(tracked, F.cross_entropy, every=every)
    for step in range(6):
        x, y = _data(seed=step)
        task = step % 2
        opt_a.zero_grad()
        F.cross_entropy(plain(x, task), y).backward()
        opt_a.step()
        opt_b.zero_grad()
        _step_with_task(tracker, x, y, task)
        assert tracked.heads[1 - task].weight.grad is None, step
        opt_b.step()
    for (name, a), b in zip(plain.named_parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)


def _step_with_task(tracker, x, y, task):
    wrapped = tracker.model
    tracker.model = _Task(wrapped, task)
    try:
        tracker.step(x, y)
    finally:
        tracker.model = wrapped


class _Task(nn.Module):
    def __init__(self, model, task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x):
        return self.model(x, self.task)


def test_inputs_that_require_grad_get_their_grad_as_backward_gives_it():
    """FGSM / saliency: x.grad used to stay None."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = _data()
    x_plain = x.clone().requires_grad_(True)
    F.cross_entropy(model(x_plain), y).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for every_step in range(2):  # a statistics step, then a plain step
        x_tracked = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        Tracker(model, F.cross_entropy, every=1 if every_step == 0 else 5).step(x_tracked, y)
        torch.testing.assert_close(x_tracked.grad, x_plain.grad, rtol=1e-9, atol=1e-12)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("every", [1, 2])
def test_scale_replaces_loss_over_k_in_an_accumulation_loop(every):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    plain, tracked = copy.deepcopy(model), copy.deepcopy(model)
    tracker = Tracker(tracked, F.cross_entropy, every=every)
    for i in range(4):
        x, y = _data(seed=i)
        (F.cross_entropy(plain(x), y) / 4).backward()
        tracker.step(x, y, scale=1 / 4)
    for a, b in zip(plain.parameters(), tracked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12)


def test_accumulate_merges_micro_batches_into_the_full_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = _data(b=9)
    tracker = Tracker(model, F.cross_entropy, every=2)
    seen = []
    tracker.register_hook(lambda t, s: seen.append(s))
    with tracker.accumulate() as acc:
        for i in range(3):
            micro = tracker.step(x[3 * i : 3 * i + 3], y[3 * i : 3 * i + 3], scale=1 / 3)
            assert micro.n == 3
    grads, losses = oracle_grads(model, F.cross_entropy, x, y)
    assert acc.stats.n == 9 and seen == [acc.stats] and tracker.steps == 1
    assert_dicts_close(acc.stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(acc.stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-11)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].mean(0), rtol=1e-9, atol=1e-12)
    with tracker.accumulate() as second:  # step 1 of every=2: plain micro-steps, no statistics
        assert tracker.step(x[:3], y[:3]) is None
    assert second.stats is None and tracker.steps == 2 and len(seen) == 1


def test_a_failing_hook_leaves_last_stats_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = _data()
    tracker = Tracker(model, F.cross_entropy)
    first = tracker.step(x, y)
    ran = []
    tracker.register_hook(lambda t, s: ran.append(1))
    tracker.register_hook(lambda t, s: (_ for _ in ()).throw(RuntimeError("hook failed")))
    with pytest.raises(RuntimeError, match="hook failed"):
        tracker.step(x, y)
    assert tracker.last_stats is first and tracker.steps == 1 and ran == [1]


def test_a_batch_of_one_gives_a_nan_row_and_one_warning_not_a_crash():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    tracker = Tracker(model, F.cross_entropy)
    diag = Diagnostics()
    tracker.register_hook(diag)
    x, y = _data(b=5)
    tracker.step(x, y)
    with pytest.warns(UserWarning, match="batch of one"):
        tracker.step(x[:1], y[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.step(x[:1], y[:1])  # the warning comes once
    tracker.step(x, y)
    rows = diag.rows
    assert len(rows) == 4 and rows[1].keys() == rows[0].keys()
    assert math.isnan(rows[1]["b_simple"]) and rows[1]["n"] == 1 and math.isfinite(rows[1]["loss"])
    assert math.isfinite(rows[3]["b_simple_ema"])


def test_diagnostics_keeps_a_bounded_number_of_rows_by_default():
    diag = Diagnostics()
    for i in range(persample.loggers.DEFAULT_KEEP + 5):
        diag.log({"step": i})
    assert (
        len(diag.rows) == persample.loggers.DEFAULT_KEEP and diag.rows[-1]["step"] == persample.loggers.DEFAULT_KEEP + 4
    )
    small = Diagnostics(keep=3)
    for i in range(5):
        small.log({"step": i})
    assert [r["step"] for r in small.rows] == [2, 3, 4]


def test_a_diverged_step_writes_the_loops_grad_and_is_reported_as_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = _data()
    x[2, 0] = math.inf
    tracker = Tracker(model, F.cross_entropy)
    called = []
    tracker.register_hook(lambda t, s: called.append(s))
    assert tracker.step(x, y) is None
    assert tracker.skipped == [0] and called == [] and tracker.steps == 1
    assert not torch.isfinite(model[0].weight.grad).all()  # as loss.backward() leaves it: GradScaler skips


def test_observe_under_bfloat16_autocast_keeps_float32_statistics():
    """Used to raise a false ObservationError ("observed / expected ≈ 1")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 5))
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    tracker = Tracker(model, F.cross_entropy)
    with tracker.observe(y) as observed:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
    stats = observed.stats
    assert all(
        v.dtype == torch.float32 for v in (*stats.mean.values(), *stats.var.values(), *stats.param_sq_norms.values())
    )
    grads, _ = oracle_grads(copy.deepcopy(model).double(), F.cross_entropy, x.double(), y)
    for k, g in grads.items():  # bf16 forward: a few percent
        torch.testing.assert_close(stats.mean[k].double(), g.mean(0), rtol=0.05, atol=2e-3)
        torch.testing.assert_close(
            stats.param_sq_norms[k].double(), g.reshape(16, -1).pow(2).sum(1), rtol=0.1, atol=1e-3
        )


def test_observe_with_a_grad_scaler_reports_unscaled_statistics_and_skips_overflows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    tracker = Tracker(model, F.cross_entropy)
    with tracker.observe(y) as observed:
        (F.cross_entropy(model(x), y) * 2.0**16).backward()  # scaler.scale(loss).backward()
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    assert_dicts_close(observed.stats.param_sq_norms, {k: g.reshape(6, -1).pow(2).sum(1) for k, g in grads.items()})
    assert_dicts_close(observed.stats.mean, {k: g.mean(0) for k, g in grads.items()})
    called = []
    tracker.register_hook(lambda t, s: called.append(s))
    with tracker.observe(y) as overflow:
        (F.cross_entropy(model(x), y) * math.inf).backward()
    assert overflow.skipped and overflow.stats is None and called == [] and tracker.skipped == [1]


def test_observe_on_common_model_shapes():
    """A model that is a single nn.Linear used to fail ("bias is used ... outside the module"); a positional
    Embedding on torch.arange(T) is exact (its output is expanded over the batch), except with T == B, where
    its batch dim is ambiguous: refused with a pointer to tracker.step, which handles it exactly."""
    torch.manual_seed(0)
    x, y = _data()
    linear = nn.Linear(4, 3).double()
    with Tracker(linear, F.cross_entropy).observe(y) as observed:
        F.cross_entropy(linear(x), y).backward()
    grads, _ = oracle_grads(linear, F.cross_entropy, x, y)
    assert_dicts_close(observed.stats.param_sq_norms, {k: g.reshape(6, -1).pow(2).sum(1) for k, g in grads.items()})

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.out = nn.Embedding(10, 8), nn.Embedding(5, 8), nn.Linear(8, 3)

        def forward(self, t):
            return self.out((self.tok(t) + self.pos(torch.arange(t.shape[1]))).mean(1))

    model = Positional().double()
    tokens = torch.randint(0, 10, (6, 5))
    grads, _ = oracle_grads(model, F.cross_entropy, tokens, y)
    with Tracker(model, F.cross_entropy).observe(y) as observed:
        F.cross_entropy(model(tokens), y).backward()
    assert_dicts_close(observed.stats.param_sq_norms, {k: g.reshape(6, -1).pow(2).sum(1) for k, g in grads.items()})
    model.zero_grad()
    stats = Tracker(model, F.cross_entropy).step(tokens, y)
    assert_dicts_close(stats.param_sq_norms, {k: g.reshape(6, -1).pow(2).sum(1) for k, g in grads.items()})
    with pytest.raises(persample.NotExact, match="ambiguous") as info:  # T == B: arange(T) looks batched
        with Tracker(model, F.cross_entropy).observe(y[:5]):
            F.cross_entropy(model(tokens[:5]), y[:5]).backward()  # B = T = 5
    assert any("tracker.step" in note for note in info.value.__notes__)
