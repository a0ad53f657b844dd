"""Tensor hooks registered on activations during the forward (``h.register_hook(fn)``).

A hook that rewrites the gradient (gradient reversal, scaling, a clamp) acts on
the batch's gradient in a backward, while per-example gradients need it on each
example's. The fast engine read the gradient at the hooked tensor before the
hook ran: with the hook on a Linear's output its norms and variance were off by
the hook's factor, and on a layer whose mean the engine forms itself (a
convolution, a Linear on sequences) the mean too, which ``Tracker.step`` wrote
into ``p.grad`` (a gradient-reversal layer trained the wrong way). Now such a
forward is refused by the fast engine and by ``observe``, ``engine="auto"``
takes the vmap engine (which applies the hook per example), and hooks that only
look (return None) still run on the fast engine.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import NotExact

from zoo import assert_dicts_close, oracle_grads

HOOKS = {
    "reversal": lambda g: -g,
    "scale": lambda g: 2 * g,
    "clamp": lambda g: g.clamp(-0.01, 0.01),  # not linear: per example differs from per batch
    "in_place": lambda g: g.mul_(3),
}


class HookedMLP(nn.Module):
    """The hook on a Linear's output (T = 1: autograd gives the layer's mean)."""

    def __init__(self, hook):
        super().__init__()
        self.hook, self.a, self.out = hook, nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        h.register_hook(self.hook)
        return self.out(torch.tanh(h))


class HookedConv(nn.Module):
    """The hook on a convolution's output in the middle (its mean is formed from the g_i)."""

    def __init__(self, hook):
        super().__init__()
        self.hook = hook
        self.first, self.conv, self.out = nn.Conv1d(2, 4, 3), nn.Conv1d(4, 4, 3), nn.Linear(4 * 6, 3)

    def forward(self, x):
        h = self.conv(torch.tanh(self.first(x)))
        h.register_hook(self.hook)
        return self.out(torch.tanh(h).flatten(1))


class HookedSequence(nn.Module):
    """The hook on an activation between layers, not on a module's output (a Linear on sequences)."""

    def __init__(self, hook):
        super().__init__()
        self.hook, self.a, self.b = hook, nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h.register_hook(self.hook)
        return self.b(h).mean(1)


MODELS = {"mlp": (HookedMLP, (6,)), "conv": (HookedConv, (2, 10)), "sequence": (HookedSequence, (9, 5))}


def _problem(kind, hook_name, batch=5):
    torch.manual_seed(0)
    cls, shape = MODELS[kind]
    model = cls(HOOKS[hook_name]).double()
    return model, torch.randn(batch, *shape, dtype=torch.float64), torch.randint(0, 3, (batch,))


@pytest.mark.parametrize("hook_name", sorted(HOOKS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_rewriting_hook_is_refused_by_the_fast_engine_and_auto_is_exact(kind, hook_name):
    model, x, y = _problem(kind, hook_name)
    with pytest.raises(NotExact, match=r"register_hook.*test_gradient_hooks.py"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="auto")
    grads, losses = oracle_grads(model, F.cross_entropy, x, y)  # the float64 loop: the hook on each example
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-11)
    assert_dicts_close(stats.param_sq_norms, {k: g.reshape(5, -1).pow(2).sum(1) for k, g in grads.items()})
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_tracker_step_with_a_gradient_reversal_layer_writes_the_backward_s_gradient(kind):
    model, x, y = _problem(kind, "reversal")
    plain = {
        n: g
        for n, g in zip(
            dict(model.named_parameters()), torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        )
    }
    persample.Tracker(model, F.cross_entropy).step(x, y)
    assert_dicts_close({n: p.grad for n, p in model.named_parameters()}, plain)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_hook_that_only_looks_runs_on_the_fast_engine(kind):
    seen = []
    model, x, y = _problem(kind, "reversal")
    model.hook = lambda g: seen.append(g.shape)  # returns None: the gradient is unchanged
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert seen, "the hook ran in the engine's backward"
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.param_sq_norms, {k: g.reshape(5, -1).pow(2).sum(1) for k, g in grads.items()})


def test_observe_refuses_a_rewriting_hook_and_names_it():
    model, x, y = _problem("conv", "reversal")
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(NotExact, match="register_hook"):
        with tracker.observe(y):
            F.cross_entropy(model(x), y).backward()


def test_observe_accepts_a_hook_that_only_looks():
    model, x, y = _problem("mlp", "reversal")
    model.hook = lambda g: None
    tracker = persample.Tracker(model, F.cross_entropy)
    with tracker.observe(y) as observed:
        F.cross_entropy(model(x), y).backward()
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    assert_dicts_close(observed.stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-11)
