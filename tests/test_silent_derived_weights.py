"""A module called with weights derived from its own (``torch.func.functional_call``) is exact or refused.

``functional_call(lin, {"weight": 1.1 * lin.weight, ...}, x)`` runs the module's forward (and its hooks)
on another tensor than the parameter: the gradient its output receives is the gradient with respect to
that tensor, not to the parameter. A rule that credits it to the parameter drops the chain factor. Counting
the parameter's uses in the graph cannot see it (a plain call next to the functional one is two uses, two
calls); the capture checks that each call computed with the parameter itself.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import persample

from zoo import assert_dicts_close, oracle_grads


class Raw(nn.Module):
    """A rule-less module (the fast engine's fallback covers it)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 5) * 0.4)

    def forward(self, x):
        return torch.tanh(x @ self.w)


class Derived(nn.Module):
    """``lin`` (or ``raw``) called once plainly (``plain``), then through functional_call with derived weights."""

    def __init__(self, kind: str, plain: bool, target: str = "lin"):
        super().__init__()
        self.lin, self.raw, self.out = nn.Linear(5, 5), Raw(), nn.Linear(5, 3)
        self.hyper = nn.Linear(5, 25)
        self.kind, self.plain, self.target = kind, plain, target

    def derived(self, x, w):
        if self.kind == "scale":
            return 1.1 * w
        if self.kind == "sam":  # SAM's perturbation W + ε, ε a fixed direction
            return w + 0.05 * torch.ones_like(w)
        if self.kind == "hyper":  # a hypernetwork's output, from a batch summary
            return w + self.hyper(x.detach().mean(0)).view(5, 5) * 0.1
        if self.kind == "maml":  # one inner step of MAML, differentiated through
            inner = (torch.tanh(x @ w) ** 2).sum()
            return w - 0.1 * torch.autograd.grad(inner, w, create_graph=True)[0]
        raise AssertionError(self.kind)

    def forward(self, x):
        module = self.lin if self.target == "lin" else self.raw
        name = "weight" if self.target == "lin" else "w"
        h = torch.tanh(module(x)) if self.plain else x
        w = getattr(module, name)
        h2 = functional_call(module, {name: self.derived(x, w)}, (h,), strict=False)
        return self.out(torch.tanh(h2))


CASES = [
    (kind, plain, target)
    for kind in ("scale", "sam", "hyper", "maml")
    for plain in (True, False)
    for target in ("lin", "raw")
]
IDS = [f"{k}-{'plain' if p else 'only'}-{t}" for k, p, t in CASES]


def _setup(kind, plain, target):
    torch.manual_seed(0)
    model = Derived(kind, plain, target).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads, losses = oracle_grads(model, F.cross_entropy, x, y)  # one example at a time, float64
    return model, x, y, grads, losses


def _assert_exact(stats, grads):
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-11)
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})


@pytest.mark.parametrize("kind,plain,target", CASES, ids=IDS)
def test_grad_stats_is_exact_or_refused(kind, plain, target):
    model, x, y, grads, _ = _setup(kind, plain, target)
    try:
        stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    except persample.NotExact:
        pass
    else:
        _assert_exact(stats, grads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y, engine="auto"), grads)
    psg = persample.per_sample_grads(model, F.cross_entropy, x, y)
    assert_dicts_close(psg, grads)


@pytest.mark.parametrize("kind", ["scale", "sam", "maml"])
def test_fast_refuses_a_substituted_parameter_by_name(kind):
    model, x, y, _, _ = _setup(kind, True, "lin")
    with pytest.raises(
        persample.NotExact,
        match=r"module lin \(Linear\) was called with its parameter 'weight' "
        r"replaced by another tensor",
    ):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")


@pytest.mark.parametrize("kind,plain,target", CASES[:4] + [("scale", True, "raw")], ids=IDS[:4] + ["scale-plain-raw"])
def test_tracker_step_writes_the_exact_p_grad(kind, plain, target):
    model, x, y, grads, _ = _setup(kind, plain, target)
    tracker = persample.Tracker(model, F.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = tracker.step(x, y)
    _assert_exact(stats, grads)
    written = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()}
    assert_dicts_close(written, {k: g.mean(0) for k, g in grads.items()})


@pytest.mark.parametrize(
    "kind,plain,target", [("scale", True, "lin"), ("scale", False, "lin"), ("scale", True, "raw"), ("sam", True, "lin")]
)
def test_observe_refuses(kind, plain, target):
    model, x, y, _, _ = _setup(kind, plain, target)
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(persample.NotExact, match=r"replaced by another tensor.*\[PARAMETER_SUBSTITUTED\]"):
        with tracker.observe(y):
            F.cross_entropy(model(x), y).backward()


def test_functional_call_with_the_parameters_themselves_stays_on_the_fast_engine():
    torch.manual_seed(0)

    class Same(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = functional_call(self.lin, dict(self.lin.named_parameters()), (x,))
            return self.out(torch.tanh(self.lin(torch.tanh(h))))

    model = Same().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast"), grads)
