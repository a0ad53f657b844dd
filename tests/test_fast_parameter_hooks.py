"""The fast engine and tensor hooks on parameters (``p.register_hook``, issue 22).

The per-example loop defines example i's gradient of a hooked parameter as H(∇_p L_i): ``autograd.grad`` calls
the hooks on each example's own gradient. A leaf's hooks change that leaf's gradient alone. So where a built-in
rule forms ∇_p L_i exactly (its module called on the whole batch, its output reaching the loss), the fast engine
forms them and calls the hooks on each, B calls as in the loop, and the statistics are the loop's even for a
hook that is not linear. Elsewhere it refuses (PARAMETER_GRADIENT_HOOK) and ``auto`` takes the loop. The
oracle is ``zoo.oracle_grads``, a float64 loop of ``autograd.grad``, which honours the hooks."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from oracle_stats import stats_from_rows
from zoo import oracle_grads


class Tokens(nn.Module):
    """Embedding → mean over positions → Linear → Tanh → Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, ids):
        return self.b(torch.tanh(self.a(self.embed(ids).mean(1))))


def _data(b=6):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 12, (b, 4), generator=g), torch.randint(0, 3, (b,), generator=g)


def _hooked_model(calls):
    torch.manual_seed(0)
    model = Tokens().double()
    model.a.weight.register_hook(lambda g: g.clamp(-0.02, 0.02))  # not linear: H(mean) ≠ mean of H
    model.a.weight.register_hook(lambda g: calls.append(tuple(g.shape)))  # looks, returns None
    model.embed.weight.register_hook(lambda g: g * g.abs())
    model.b.bias.register_hook(lambda g: g.sign())
    return model


def _assert_close(got: dict, want: dict, rtol=1e-9, atol=1e-13):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


def test_hooks_that_are_not_linear_are_applied_to_each_examples_gradient():
    """Was NotExact(PARAMETER_GRADIENT_HOOK), and auto took the loop. Now grad_stats(engine="fast"),
    per_sample_grads and auto give the loop oracle's statistics and rows; each hook is called B times per call,
    as by the loop; explain names the fast engine."""
    calls: list = []
    model, (ids, y) = _hooked_model(calls), _data()
    rows, losses = oracle_grads(model, F.cross_entropy, ids, y)
    want = stats_from_rows(rows, losses)
    torch.manual_seed(0)
    plain_rows, _ = oracle_grads(Tokens().double(), F.cross_entropy, ids, y)  # same weights, no hooks
    clamped_mean = plain_rows["a.weight"].mean(0).clamp(-0.02, 0.02)  # what one hook call on the batch gives
    assert (want["mean"]["a.weight"] - clamped_mean).abs().max() > 1e-3
    calls.clear()
    stats = persample.grad_stats(model, F.cross_entropy, ids, y, engine="fast", inner_products=True)
    assert calls == [(5, 6)] * (6 + 2)  # + examples 0 and B-1 alone: the spot check, once per input signature
    _assert_close(stats.mean, want["mean"])
    _assert_close(stats.var, want["var"])
    torch.testing.assert_close(stats.sq_norms, want["sq_norms"], rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(stats.inner_products, want["inner_products"], rtol=1e-9, atol=1e-13)
    _assert_close(persample.per_sample_grads(model, F.cross_entropy, ids, y), rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error", persample.SlowPathWarning)
        _assert_close(persample.grad_stats(model, F.cross_entropy, ids, y).mean, want["mean"])
    report = persample.explain(model, F.cross_entropy, ids, y)
    assert report.entry_points["grad_stats"] == "fast" and report.engines["fast"].exact, str(report)
    assert report.engines["vmap"].refusal.code == "PARAMETER_GRADIENT_HOOK"
    assert all(p.grad is None for p in model.parameters())


class SharedInput(nn.Module):
    """A Linear called on an input shared by the batch (batch dim 1): its output is expanded over the batch."""

    def __init__(self):
        super().__init__()
        self.table, self.head = nn.Linear(3, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(x + self.table(torch.ones(1, 3, dtype=x.dtype))))


class Unreached(nn.Module):
    """A Linear whose output does not reach the loss: the loop's gradient is None (zeros), no hook called."""

    def __init__(self):
        super().__init__()
        self.a, self.side = nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x):
        self.side(x)
        return self.a(x)


@pytest.mark.parametrize(
    "build, name, why",
    [
        (SharedInput, "table.weight", "other than the whole batch"),
        (Unreached, "side.weight", "does not reach the loss"),
    ],
)
def test_a_hook_whose_rows_the_loop_would_not_form_alike_is_refused_and_auto_is_exact(build, name, why):
    """Where the fast engine cannot show that each example's graph reaches the parameter through a call on
    the whole batch, H(0) versus the loop's untouched 0 could differ: refused, and auto's loop is exact."""
    torch.manual_seed(0)
    model = build().double()
    dict(model.named_parameters())[name].register_hook(lambda g: g + 1.0)  # H(0) ≠ 0
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(persample.NotExact, match=why) as raised:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert raised.value.code == "PARAMETER_GRADIENT_HOOK"
    rows, losses = oracle_grads(model, F.cross_entropy, x, y)
    with pytest.warns(persample.SlowPathWarning, match="gradient hook"):
        stats = persample.grad_stats(model, F.cross_entropy, x, y)
    _assert_close(stats.mean, stats_from_rows(rows, losses)["mean"])


def test_a_hook_returning_another_shape_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model[0].weight.register_hook(lambda g: g.sum(0))
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(persample.NotExact, match="returned") as raised:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert raised.value.code == "PARAMETER_GRADIENT_HOOK"


def test_module_backward_hooks_stay_on_the_loop_and_say_why():
    """A full backward hook may change the gradients reaching every module before it, per example: the fast
    and vmap engines refuse it (MODULE_BACKWARD_HOOK), and the SlowPathWarning and explain name it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model[2].register_full_backward_hook(lambda m, gin, gout: (gin[0] * 0.5,))
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.warns(persample.SlowPathWarning, match=r"backward hook") as record:
        persample.grad_stats(model, F.cross_entropy, x, y)
    assert "\n" not in str(record[0].message)
    report = persample.explain(model, F.cross_entropy, x, y)
    assert report.entry_points["grad_stats"] == "loop"
    assert {v.refusal.code for v in (report.engines["fast"], report.engines["vmap"])} == {"MODULE_BACKWARD_HOOK"}


def test_a_hook_on_a_sparse_embedding_is_refused():
    """The loop hands a sparse Embedding's hook a sparse gradient; the fast engine's rows are dense: refused."""
    torch.manual_seed(0)
    model = Tokens().double()
    model.embed = nn.Embedding(12, 6, sparse=True).double()
    model.embed.weight.register_hook(lambda g: g * 2)
    ids, y = _data()
    with pytest.raises(persample.NotExact, match="sparse") as raised:
        persample.grad_stats(model, F.cross_entropy, ids, y, engine="fast")
    assert raised.value.code == "PARAMETER_GRADIENT_HOOK"


def test_a_hook_under_reentrant_checkpointing_is_refused_before_any_backward():
    """The fast engine's backward() through a re-entrant checkpoint would call the hook on the batch's gradient:
    refused before it runs (the hook is never called), and auto's loop is exact."""
    from test_fast_reentrant import Stack, _batch

    torch.manual_seed(0)
    model, (x, y) = Stack().double(), _batch()
    calls: list = []
    model.block[0].weight.register_hook(lambda g: calls.append(1))
    with pytest.raises(persample.NotExact, match="re-entrant") as raised:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert raised.value.code == "PARAMETER_GRADIENT_HOOK" and calls == []
    assert all(p.grad is None for p in model.parameters())


def test_tracker_step_writes_the_users_own_backward_and_the_loops_statistics():
    """With the fast engine now taking a hooked model, Tracker.step must not write p.grad from the statistics'
    mean, (1/B) Σ_i H(g_i), which is not H of the batch's gradient that loss.backward() gives for a hook that
    is not linear: p.grad is the user's own backward's, the statistics the loop's."""
    calls: list = []
    model, (ids, y) = _hooked_model(calls), _data()
    rows, losses = oracle_grads(model, F.cross_entropy, ids, y)
    F.cross_entropy(model(ids), y).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    stats = persample.Tracker(model, F.cross_entropy).step(ids, y)
    _assert_close({n: p.grad for n, p in model.named_parameters()}, want, rtol=1e-12, atol=1e-15)
    _assert_close(stats.var, stats_from_rows(rows, losses)["var"])
