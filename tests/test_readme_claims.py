"""README promises that had no test of their own: atomic steps when loss_fn raises, x.grad restored after a
failed step, fallback modules under autocast. (DDP's mixed_precision, DTensors and FSDP at check_mean are
scenarios of tests/_distributed_worker.py; the claim table in tests/README.md maps each promise to its test.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import NotExact, Tracker


class _Counting(nn.Module):
    """A Linear with a buffer that every training forward advances (as BatchNorm's counters do)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return self.lin(x)


def _failing_loss(fail_from_call: int):
    """cross_entropy that raises on its ``fail_from_call``-th call (0: the first) and every later one (a loss
    that fails only once may legitimately be retried by the next engine)."""
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        if len(calls) - 1 >= fail_from_call:
            raise ArithmeticError("loss_fn failed")
        return F.cross_entropy(out, y)

    return loss_fn


def _state(model, x):
    return (
        {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: b.clone() for n, b in model.named_buffers()},
        (x.grad, None if x.grad is None else x.grad.clone()),
    )


def _assert_state(model, x, before, buffers_too=True):
    grads, params, buffers, (x_grad, x_values) = before
    for n, p in model.named_parameters():
        ref, values = grads[n]
        assert p.grad is ref, f"{n}: p.grad was replaced"
        assert values is None or torch.equal(p.grad, values), f"{n}: p.grad changed"
        assert torch.equal(p, params[n]), f"{n}: the parameter changed"
    for n, b in model.named_buffers():
        assert not buffers_too or torch.equal(b, buffers[n]), f"buffer {n} changed"
    assert x.grad is x_grad and (x_values is None or torch.equal(x.grad, x_values)), "x.grad changed"


@pytest.mark.parametrize("fail_from_call", [0, 1, 3], ids=["first-call", "second-call", "fourth-call"])
@pytest.mark.parametrize("existing", [True, False], ids=["existing-grads", "no-grads"])
@pytest.mark.parametrize("every", [1, 2])
def test_a_step_whose_loss_fn_raises_leaves_p_grad_and_x_grad_as_found(fail_from_call, existing, every):
    """README: a step is atomic; if it raises (… the loss …), every p.grad, x.grad, last_stats and steps are as
    before. loss_fn raising from its first, second or fourth call on (the batch loss, an example's loss).
    (Buffers are not part of that promise: like a plain forward whose loss raises, the forward may have run.)"""
    torch.manual_seed(0)
    model = _Counting()
    x, y = torch.randn(5, 4, requires_grad=True), torch.randint(0, 3, (5,))
    tracker = Tracker(model, _failing_loss(fail_from_call), every=every)
    if existing:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        x.grad = torch.randn_like(x)
    before = _state(model, x)
    with pytest.raises(ArithmeticError, match="loss_fn failed"):
        tracker.step(x, y)
    _assert_state(model, x, before, buffers_too=False)
    assert model.calls.item() <= 1, "more than one training forward's worth of buffer updates"
    assert tracker.steps == 0 and tracker.last_stats is None


def test_x_grad_is_restored_after_a_failed_hook():
    """README: inputs that require grad get x.grad; a step that raises leaves x.grad as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (5,))
    tracker = Tracker(model, F.cross_entropy)
    tracker.step(x, y)  # a good step: x.grad is the backward's
    reference = x.detach().clone().requires_grad_(True)
    F.cross_entropy(model(reference), y).backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-9, atol=1e-12)
    tracker.register_hook(lambda t, s: (_ for _ in ()).throw(ValueError("hook failed")))
    before = _state(model, x)
    with pytest.raises(ValueError, match="hook failed"):
        tracker.step(x, y)
    _assert_state(model, x, before)
    assert tracker.steps == 1


class _Fallback(nn.Module):
    """A module with a parameter and no closed-form rule: the fast engine isolates it with torch.func."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x):
        return torch.tanh(x @ self.w)


def _autocast_loop_oracle(model, x, y):
    """Per-example gradients, one example at a time under the same bf16 autocast (float64 reductions)."""
    rows = {n: [] for n, _ in model.named_parameters()}
    for i in range(x.shape[0]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[i : i + 1])
        grads = torch.autograd.grad(F.cross_entropy(out.float(), y[i : i + 1]), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            rows[n].append(g.double())
    return {n: torch.stack(r) for n, r in rows.items()}


@pytest.mark.parametrize("engine", ["auto", "fast", "vmap"])
def test_fallback_module_under_bf16_autocast(engine):
    """README: statistics under autocast are computed and kept in float32, and every answer is exact or a
    refusal. A fallback module under bf16 autocast: auto and vmap give the statistics of the per-example
    gradients under the same autocast, to bf16 rounding (measured: ≤ 0.4 % of the largest element for the
    mean, ≤ 0.8 % for the variance); the fast engine, whose check of the fallback's sums is at 1e-5, refuses
    (NotExact naming the parameter) rather than answer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), _Fallback(), nn.Linear(6, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    want = _autocast_loop_oracle(model, x, y)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stats = persample.grad_stats(model, F.cross_entropy, x, y, engine=engine)
    except NotExact as err:
        assert engine == "fast", f"{engine} refused: {err}"
        assert err.code == "FALLBACK_SUM_MISMATCH" and "'1.w'" in str(err)
        return
    assert {v.dtype for v in stats.mean.values()} | {v.dtype for v in stats.var.values()} == {torch.float32}
    for n, g in want.items():
        for field, expected, tol in (("mean", g.mean(0), 0.02), ("var", g.var(0), 0.04)):
            err = ((getattr(stats, field)[n].double() - expected).abs().max() / expected.abs().max()).item()
            assert err < tol, f"{engine}: {field}[{n}] off by {err:.3g} of its largest element"
