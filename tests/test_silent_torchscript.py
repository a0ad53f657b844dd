"""TorchScript models (``torch.jit.script``, ``torch.jit.trace``, or a scripted submodule) are exact or
refused by every entry point: a guard's machinery (hooks that a ScriptModule does not take) must raise
``NotExact``, never a raw ``RuntimeError``, so that ``engine="auto"`` reaches an engine that runs them."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from zoo import assert_dicts_close, oracle_grads


def _model(kind):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    if kind == "script":
        model = torch.jit.script(eager)
    elif kind == "trace":
        model = torch.jit.trace(eager, x[:1])
    else:  # a scripted submodule inside an eager model
        model = nn.Sequential(torch.jit.script(eager[0]), eager[1], eager[2])
    grads, losses = oracle_grads(model, F.cross_entropy, x, y)  # one example at a time, float64
    return model, x, y, grads, losses


KINDS = ["script", "trace", "scripted-submodule"]


def _assert_exact(stats, grads):
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-11)
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})


@pytest.mark.parametrize("kind", KINDS)
def test_fast_and_observe_refuse_with_not_exact(kind):
    model, x, y, _, _ = _model(kind)
    with pytest.raises(persample.NotExact, match=r"is a TorchScript module.*\[TORCHSCRIPT_MODULE\]"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(persample.NotExact, match=r"is a TorchScript module.*\[TORCHSCRIPT_MODULE\]"):
        with tracker.observe(y):
            F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("kind", KINDS)
def test_auto_grad_stats_and_per_sample_grads_are_exact(kind):
    model, x, y, grads, losses = _model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = persample.grad_stats(model, F.cross_entropy, x, y)
        per_example = persample.per_sample_grads(model, F.cross_entropy, x, y)
    _assert_exact(stats, grads)
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)
    assert_dicts_close(per_example, grads)


@pytest.mark.parametrize("kind", KINDS)
def test_tracker_step_is_exact_and_checks(kind):
    model, x, y, grads, _ = _model(kind)
    tracker = persample.Tracker(model, F.cross_entropy, check_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = tracker.step(x, y)
        persample.check_mean(model, F.cross_entropy, x, y)
    _assert_exact(stats, grads)
    assert_dicts_close({n: p.grad for n, p in model.named_parameters()}, {k: g.mean(0) for k, g in grads.items()})


def test_a_module_that_refuses_hooks_is_a_refusal_not_a_crash():
    class NoHooks(nn.Linear):
        def register_forward_hook(self, *args, **kwargs):
            raise RuntimeError("this wrapper takes no forward hooks")

    torch.manual_seed(0)
    model = nn.Sequential(NoHooks(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    refused = r"cannot hook module 0 \(NoHooks\).*takes no forward hooks.*\[CAPTURE_HOOK_REFUSED\]"
    with pytest.raises(persample.NotExact, match=refused):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y), grads)
