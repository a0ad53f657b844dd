"""A parameter used outside the module that owns it, by that module's parent (``PARAMETER_USED_OUTSIDE``).

JetMoE's mixture of attention experts is a module whose ``forward`` raises: its parent, the attention, calls
its ``map``/``reduce`` methods and reads its ``bias``; LongCat's MoE reads its router's classifier weight
itself; LFM-3's short convolution hands its ``Conv1d``'s weight to a function. The fast engine refused all of
these (the owner's calls do not cover the parameter's use), and ``auto`` took the loop (JetMoE, LongCat:
B forward + backward passes) or vmap. Now the parent of the owner becomes one fallback unit covering its
subtree (:func:`persample.engines.fast.plan.widen`), from the call that finds it on: its call covers the use,
its per-example gradients come from vmap of that call alone (else each example alone, its outputs compared
with the batch's rows), and their sum is checked against autograd's. The widening stops below the model's
root: a use outside even the widest module still refuses, and an entry point still gives the oracle's answer.

A fallback's ``functional_call`` that reads a parameter itself (a reference kept outside the module tree)
refuses (``PARAMETER_NOT_SUBSTITUTED``): torch.func would lose that term of each example's gradient.

And a fallback that returns its output ``[B, T, d]`` with its router's logits ``[B·T, E]`` (JetMoE's attention)
is computed on each example's rows alone, each output with its own rows per example (it was refused,
``FALLBACK_NOT_BATCHED``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.engines.fast import engine
from persample.engines.fast.plan import forget, widened_modules

from oracle_stats import oracle_stats
from zoo import assert_dicts_close

B, D = 5, 4


class Experts(nn.Module):
    """Weights its parent reads itself; never called (JetMoE's ``JetMoeMoA``)."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, D) / 2)
        self.bias = nn.Parameter(torch.randn(width) / 4)

    def forward(self, x):
        raise NotImplementedError("called through its parent's own code only")


class Block(nn.Module):
    """A residual block that applies its child's weights itself."""

    def __init__(self, nested: bool = False):
        super().__init__()
        self.nested = nested
        if nested:  # the owner one container deeper: the widening goes up two levels
            self.bank = nn.ModuleDict({"a": Experts()})
        else:
            self.experts = Experts()
        self.proj = nn.Linear(6, D)

    def owner(self) -> Experts:
        return self.bank["a"] if self.nested else self.experts  # type: ignore[return-value]

    def forward(self, x):
        experts = self.owner()
        return x + self.proj(torch.tanh(F.linear(x, experts.weight, experts.bias)))


class Net(nn.Module):
    def __init__(self, nested: bool = False, shared: bool = False, kept: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, D)
        self.blocks = nn.ModuleList([Block(nested), Block(nested)])
        self.head = nn.Linear(D, 3)
        self.shared, self.kept = shared, kept
        self._kept = [self.blocks[0].owner().weight]  # a plain list: not in the module tree
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        h = self.embed(x)
        h = self.blocks[0](h)
        if self.shared:  # the first block's weight used by the root too: outside every module but the root
            h = h + 0.1 * torch.tanh(F.linear(h, self.blocks[0].owner().weight)).sum(-1, keepdim=True)
        h = self.blocks[1](h)
        if self.kept:
            h = h + 0.1 * torch.tanh(h @ self._kept[0].T).sum(-1, keepdim=True)
        return self.head(torch.tanh(h))


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)


def _assert_oracle(stats, model, x, y):
    oracle = oracle_stats(model, F.cross_entropy, x, y)
    assert_dicts_close(stats.mean, oracle["mean"])
    assert_dicts_close(stats.var, oracle["var"])
    assert_dicts_close(stats.param_sq_norms, oracle["param_sq_norms"])
    torch.testing.assert_close(stats.losses, oracle["losses"], rtol=1e-12, atol=0)


def _fast_refuses_and_auto_is_exact(model, x, y, codes):
    """The fast engine refuses with one of ``codes``; ``engine="auto"`` gives the oracle's statistics."""
    with pytest.raises(persample.NotExact) as info:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert info.value.code in codes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = persample.grad_stats(model, F.cross_entropy, x, y)
    _assert_oracle(stats, model, x, y)


@pytest.mark.parametrize("nested", [False, True], ids=["parent", "grandparent"])
def test_the_parent_becomes_one_fallback_and_the_fast_engine_is_exact(nested):
    model = Net(nested=nested).double()
    x, y = _batch()
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")  # refused before: the old code
    _assert_oracle(stats, model, x, y)
    widened = {name for name, m in model.named_modules() if m in widened_modules(model)}
    # (nested: the ModuleDict between, never called, was widened first; the block above it covers it)
    blocks = {"blocks.0", "blocks.1"}
    assert widened == (blocks | {"blocks.0.bank", "blocks.1.bank"} if nested else blocks)
    report = persample.explain(model, F.cross_entropy, x, y)
    assert report.entry_points["grad_stats"] == "fast" and report.entry_points["Tracker.observe"] == "fast"
    treated = {m.name: m.treatment for m in report.modules}
    assert "blocks.0" in treated and "blocks.0.proj" not in treated  # one fallback unit for the whole block


def test_the_widening_is_kept_so_later_calls_run_one_forward(monkeypatch):
    model = Net().double()
    x, y = _batch()
    persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    first = model.forwards
    assert first >= 2  # refused once per block, then exact
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert model.forwards - first == 1
    _assert_oracle(stats, model, x, y)
    grads = persample.per_sample_grads(model, F.cross_entropy, x, y, engine="fast")
    rows = oracle_stats(model, F.cross_entropy, x, y)
    assert_dicts_close({n: g.mean(0) for n, g in grads.items()}, rows["mean"])
    forget(model)  # a plan dropped (the structure changed): the widening is still known, nothing is refused
    refusals = []
    original = engine.widened_refusal
    monkeypatch.setattr(engine, "widened_refusal", lambda *a: refusals.append(a) or original(*a))
    _assert_oracle(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast"), model, x, y)
    assert refusals == []


def test_explain_on_a_fresh_model_names_the_fast_engine():
    model = Net().double()
    x, y = _batch()
    report = persample.explain(model, F.cross_entropy, x, y)
    assert report.engines["fast"].exact and report.entry_points["grad_stats"] == "fast"


def test_a_use_outside_every_module_but_the_root_still_refuses_and_auto_stays_exact():
    codes = ("PARAMETER_USED_OUTSIDE", "FALLBACK_SUM_MISMATCH")
    _fast_refuses_and_auto_is_exact(Net(shared=True).double(), *_batch(), codes)


def test_a_kept_reference_read_by_a_widened_fallback_refuses():
    codes = ("PARAMETER_USED_OUTSIDE", "PARAMETER_NOT_SUBSTITUTED", "FALLBACK_SUM_MISMATCH")
    _fast_refuses_and_auto_is_exact(Net(kept=True).double(), *_batch(), codes)


class KeptInside(nn.Module):
    """A block that reads its child's weight through a list of its own: inside the block's call, but not
    substituted by ``functional_call``."""

    def __init__(self):
        super().__init__()
        self.experts = Experts()
        self.proj = nn.Linear(6, D)
        self._kept = [self.experts.weight]

    def forward(self, x):
        return x + self.proj(torch.tanh(F.linear(x, self._kept[0], self.experts.bias)))


def test_a_fallback_reading_a_parameter_itself_refuses_parameter_not_substituted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, D), KeptInside(), nn.Linear(D, 3)).double()
    _fast_refuses_and_auto_is_exact(model, *_batch(), ("PARAMETER_NOT_SUBSTITUTED",))


def test_observe_refuses_the_first_step_and_is_exact_from_the_next():
    model = Net().double()
    x, y = _batch()
    tracker = persample.Tracker(model, F.cross_entropy, on_refusal="skip")
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tracker.observe(y):
                F.cross_entropy(model(x), y).backward()
    assert tracker.skipped == [0]
    _assert_oracle(tracker.last_stats, model, x, y)


T, E = 3, 4


class RoutedAttention(nn.Module):
    """Returns its output ``[B, T, d]`` and its router's logits over the flattened tokens ``[B·T, E]``, both
    reaching the loss (JetMoE's attention returns them so); ``coupled``: the router's weights normalised over
    every token of the batch (examples meet)."""

    def __init__(self, coupled: bool = False):
        super().__init__()
        self.router = nn.Parameter(torch.randn(E, D) / 2)
        self.value = nn.Parameter(torch.randn(D, D) / 2)
        self.coupled = coupled

    def forward(self, x):
        flat = x.reshape(-1, D)
        logits = flat @ self.router.T
        weights = torch.softmax(logits, dim=0 if self.coupled else -1)
        gate = weights.max(-1).values
        return (flat @ self.value.T * gate[:, None]).view_as(x), logits


class RoutedNet(nn.Module):
    def __init__(self, coupled: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, D)
        self.attention = RoutedAttention(coupled)
        self.head = nn.Linear(D + E, 3)

    def forward(self, tokens):
        out, logits = self.attention(self.embed(tokens))
        pooled = torch.cat([out.mean(1), logits.view(tokens.shape[0], -1, E).mean(1)], -1)
        return self.head(torch.tanh(pooled))


def _tokens():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 7, (B, T), generator=g), torch.randint(0, 3, (B,), generator=g)


def test_a_fallback_returning_token_rows_beside_its_output_is_exact():
    model = RoutedNet().double()
    tokens, y = _tokens()
    stats = persample.grad_stats(model, F.cross_entropy, tokens, y, engine="fast")  # FALLBACK_NOT_BATCHED before
    _assert_oracle(stats, model, tokens, y)


def test_token_rows_that_meet_other_examples_refuse():
    model = RoutedNet(coupled=True).double()
    tokens, y = _tokens()
    with pytest.raises(persample.NotExact) as info:
        persample.grad_stats(model, F.cross_entropy, tokens, y, engine="fast")
    assert info.value.code in ("TOKEN_ROWS_DIFFER", "BATCH_MIXED")
