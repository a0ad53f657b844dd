"""Mixture-of-experts routing in the fast engine (issue 22): tokens of different examples meet in one expert.

An MoE block flattens its ``[B, T, d]`` hidden states to ``[B·T, d]`` token rows, routes each row to its top-k
experts, gathers each expert's rows, and adds the results back with ``index_add_``. Every row still belongs
to one example, row r to example r // T: the fast engine reads such a call as one on token rows
(``Call.rows_per_example``), a row-wise rule (the router's or a shared expert's Linear) gets its pieces on
the ``[B, T, d]`` reshape (per example, the sum over its rows: a segment sum), and a module without a rule
(the experts' 3-D parameters, a router with raw weights) is called again on each example's segment of rows
alone. The map row → example is checked on the graph, bit by bit of the example index, and each segment's
outputs against the batch's rows. The models here are hand-written in Hugging Face 5's layout (experts as
3-D parameters, a top-k router returning logits, weights and indices); the real Hugging Face MoE models
(Mixtral, Qwen2-MoE, OLMoE, GraniteMoE) are cases of the real-model matrix (tests/real_models.py).

The oracle is the float64 loop of autograd of tests/zoo.py, one example at a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import NotExact

from zoo import oracle_grads

B, T, D, V, C = 4, 5, 6, 11, 3


class Router(nn.Module):
    """Top-k router with a raw weight (Hugging Face's ``TopKRouter``): logits, normalised weights, indices."""

    def __init__(self, experts: int, k: int):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.randn(experts, D))

    def forward(self, x):
        logits = F.linear(x, self.weight)
        weights, index = logits.softmax(-1).topk(self.k, -1)
        weights /= weights.sum(-1, keepdim=True)
        return logits, weights, index


class Experts(nn.Module):
    """E experts as 3-D parameters: expert e maps a row x to W2[e] tanh(W1[e] x + c[e]). Each expert gathers
    its rows (``x[token]``) and adds its output, times the routing weight, back into them (``index_add_``).
    ``capacity``: each expert takes only the first ``capacity`` rows routed to it in the whole flattened
    batch (Switch-style token dropping), so a row's routing depends on other examples' rows."""

    def __init__(self, experts: int, hidden: int = 7, capacity: int | None = None):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(experts, hidden, D) / D**0.5)
        self.c = nn.Parameter(0.1 * torch.randn(experts, hidden))
        self.w2 = nn.Parameter(torch.randn(experts, D, hidden) / hidden**0.5)
        self.capacity = capacity

    def forward(self, x, index, weights):
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            token, slot = torch.where(index == e)
            if self.capacity is not None:
                token, slot = token[: self.capacity], slot[: self.capacity]
            if token.numel():
                h = torch.tanh(F.linear(x[token], self.w1[e], self.c[e]))
                out.index_add_(0, token, F.linear(h, self.w2[e]) * weights[token, slot, None])
        return out


class TopKMoE(nn.Module):
    """Embedding → h + MoE(h) → Linear head, token logits ``[B, T, C]``. The MoE block flattens h to token
    rows; ``linear_router``: an ``nn.Linear`` router (a rule) with the top-k in the block; ``shared``: a
    shared expert of nn.Linear layers on every row (Qwen2-MoE's); ``swap``: rows of examples 0 and 2 trade
    places before the experts when the batch has them (an example's output then reads another's tokens)."""

    def __init__(self, experts=4, k=2, capacity=None, linear_router=False, shared=False, swap=False):
        super().__init__()
        self.k, self.swap = k, swap
        self.embed = nn.Embedding(V, D)
        self.router = nn.Linear(D, experts, bias=False) if linear_router else Router(experts, k)
        self.experts = Experts(experts, capacity=capacity)
        self.shared = nn.Sequential(nn.Linear(D, 8), nn.SiLU(), nn.Linear(8, D)) if shared else None
        self.head = nn.Linear(D, C)

    def forward(self, ids):
        h = self.embed(ids)
        batch, length, d = h.shape
        x = h.reshape(-1, d)
        if isinstance(self.router, Router):
            _, weights, index = self.router(x)
        else:
            weights, index = self.router(x).softmax(-1).topk(self.k, -1)
            weights = weights / weights.sum(-1, keepdim=True)
        if self.swap and batch >= 3:
            rows = torch.arange(batch * length).reshape(batch, length)[[2, 1, 0, *range(3, batch)]].reshape(-1)
            x, weights, index = x[rows], weights[rows], index[rows]
        out = self.experts(x, index, weights)
        if self.shared is not None:
            out = out + self.shared(x)
        return self.head(h + out.reshape(batch, length, d))


def token_ce(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def problem(seed: int = 0, **options):
    torch.manual_seed(seed)
    model = TopKMoE(**options).double()
    return model, torch.randint(0, V, (B, T)), torch.randint(0, C, (B, T))


def close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(linear_router=True), dict(shared=True), dict(k=1, linear_router=True, shared=True)],
    ids=["router-raw", "router-linear", "shared-expert", "top1-linear-shared"],
)
def test_segment_sums_equal_the_float64_loop(options):
    """Router, 3-D experts and shared expert on token rows: the fast engine's statistics and per-example
    gradients are the loop's, at 1e-9 (refused before issue 22: FALLBACK_NOT_BATCHED / EXPANSION_ESCAPES)."""
    model, ids, y = problem(**options)
    rows, losses = oracle_grads(model, token_ce, ids, y)
    stats = persample.grad_stats(model, token_ce, ids, y, engine="fast", inner_products=True)
    close(stats.mean, {n: g.mean(0) for n, g in rows.items()})
    close(stats.var, {n: g.var(0) for n, g in rows.items()})
    flat = torch.cat([g.reshape(B, -1) for g in rows.values()], 1)
    torch.testing.assert_close(stats.sq_norms, flat.pow(2).sum(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.inner_products, flat @ flat.mean(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)
    assert persample.explain(model, token_ce, ids, y).entry_points["grad_stats"] == "fast"


def test_per_sample_grads_and_tracker_step_take_the_fast_engine():
    model, ids, y = problem(shared=True)
    rows, _ = oracle_grads(model, token_ce, ids, y)
    close(persample.per_sample_grads(model, token_ce, ids, y), rows)
    persample.Tracker(model, token_ce).step(ids, y)
    close({n: p.grad for n, p in model.named_parameters()}, {n: g.mean(0) for n, g in rows.items()})


def test_observe_around_the_users_backward():
    model, ids, y = problem(shared=True)
    rows, _ = oracle_grads(model, token_ce, ids, y)
    with persample.Tracker(model, token_ce).observe(y) as seen:
        token_ce(model(ids), y).backward()
    close(seen.stats.mean, {n: g.mean(0) for n, g in rows.items()})
    close(seen.stats.var, {n: g.var(0) for n, g in rows.items()})


def _refused_as_mixed_and_auto_exact(model, ids, y):
    """The fast engine refuses BATCH_MIXED at the token rows; auto warns and gives the oracle's mean."""
    with pytest.raises(NotExact) as info:
        persample.grad_stats(model, token_ce, ids, y, engine="fast")
    assert info.value.code == "BATCH_MIXED", str(info.value)
    assert "token rows" in str(info.value)
    rows, _ = oracle_grads(model, token_ce, ids, y)
    with pytest.warns(persample.SlowPathWarning):
        stats = persample.grad_stats(model, token_ce, ids, y)
    close(stats.mean, {n: g.mean(0) for n, g in rows.items()})


def test_rows_that_move_to_another_example_are_refused():
    """Examples 0 and 2 trade token rows before the experts: the same parity, so one probe of the even
    examples cannot see it; the bit-by-bit probe does (BATCH_MIXED), and auto stays exact."""
    model, ids, y = problem(swap=True)
    _refused_as_mixed_and_auto_exact(model, ids, y)


def test_a_row_that_mixes_two_examples_is_refused():
    """Each token row adds the row before it in the flattened batch: the first token of an example reads the
    last token of the one before."""

    class Mixing(TopKMoE):
        def forward(self, ids):
            h = self.embed(ids)
            x = h.reshape(-1, D)
            x = x + 0.5 * torch.cat([x[:1] * 0, x[:-1]])
            _, weights, index = self.router(x)
            return self.head(h + self.experts(x, index, weights).reshape(h.shape))

    torch.manual_seed(0)
    model = Mixing().double()
    ids, y = torch.randint(0, V, (B, T)), torch.randint(0, C, (B, T))
    with pytest.raises(NotExact) as info:
        persample.grad_stats(model, token_ce, ids, y, engine="fast")
    assert info.value.code == "BATCH_MIXED", str(info.value)


def test_an_expert_capacity_over_the_batch_is_refused():
    """Token dropping by expert capacity routes an example's rows by the other examples' (no gradient shows
    it): each segment, recomputed alone, differs from its rows in the batch (TOKEN_ROWS_DIFFER)."""
    model, ids, y = problem(capacity=4)
    with pytest.raises(NotExact) as info:
        persample.grad_stats(model, token_ce, ids, y, engine="fast")
    assert info.value.code == "TOKEN_ROWS_DIFFER", str(info.value)
    assert "experts" in str(info.value)


def test_experts_that_draw_random_numbers_are_not_recomputed():
    """Dropout inside the experts (train mode, randomness="different"): a segment recomputed alone would
    draw other masks, so the engine stops before the draw (FALLBACK_NOT_ISOLATED)."""

    class DroppingExperts(Experts):
        def forward(self, x, index, weights):
            return F.dropout(super().forward(x, index, weights), 0.5, self.training)

    model, ids, y = problem()
    model.experts.__class__ = DroppingExperts
    with pytest.raises(NotExact) as info:
        persample.grad_stats(model.train(), token_ce, ids, y, engine="fast", randomness="different")
    assert info.value.code == "FALLBACK_NOT_ISOLATED", str(info.value)
    assert "random" in str(info.value)


def test_a_capacity_mask_over_the_flattened_batch_is_refused():
    """The same capacity computed in the block, without gradient (a cumsum of the routing mask over all
    token rows), and fed to the experts as routing weights: no graph and no recomputed segment shows it;
    the user-code watcher follows the mixed rows into the forward (BATCH_MIXED), and auto stays exact."""

    class BlockCapacity(TopKMoE):
        def forward(self, ids):
            h = self.embed(ids)
            x = h.reshape(-1, D)
            _, weights, index = self.router(x)
            with torch.no_grad():
                onehot = F.one_hot(index[:, 0], 4)
                keep = ((onehot.cumsum(0) * onehot).sum(-1) <= 3).to(x.dtype)
            out = self.experts(x, index, weights * keep[:, None])
            return self.head(h + out.reshape(h.shape))

    torch.manual_seed(0)
    model = BlockCapacity().double()
    ids, y = torch.randint(0, V, (B, T)), torch.randint(0, C, (B, T))
    _refused_as_mixed_and_auto_exact(model, ids, y)


class LinearExperts(nn.Module):
    """Experts as a ModuleList of nn.Linear layers, each applied to its gathered rows ``x[token]``."""

    def __init__(self, experts: int = 4, k: int = 2):
        super().__init__()
        self.k = k
        self.embed = nn.Embedding(V, D)
        self.router = nn.Linear(D, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, D)) for _ in range(experts))
        self.head = nn.Linear(D, C)

    def forward(self, ids):
        h = self.embed(ids)
        x = h.reshape(-1, D)
        weights, index = self.router(x).softmax(-1).topk(self.k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if token.numel():
                out = out.index_add(0, token, expert(x[token]) * weights[token, slot, None])
        return self.head(h + out.reshape(h.shape))


def test_linear_experts_on_gathered_rows_equal_the_float64_loop():
    """Experts as nn.Linear layers on their gathered rows ``x[token]``: however many rows an expert got (one,
    B, B·k or any other count), each row's example is read off the graph by the probe of the rows, bit by
    bit of the example index, and the Linear rule's pieces are sums over each example's own rows. Refused
    before issue 22 (EXPANSION_ESCAPES); the shapes and seeds give experts of 1, B and B·k rows."""
    for seed, batch, length in [(7, 2, 3), (18, 4, 4), (8, 2, 3), (22, 4, 2), (0, 3, 4), (3, 2, 3), (0, 2, 3)]:
        torch.manual_seed(seed)
        model = LinearExperts().double()
        ids, y = torch.randint(0, V, (batch, length)), torch.randint(0, C, (batch, length))
        stats = persample.grad_stats(model, token_ce, ids, y, engine="fast", inner_products=True)
        rows, losses = oracle_grads(model, token_ce, ids, y)
        close(stats.mean, {n: g.mean(0) for n, g in rows.items()})
        close(stats.var, {n: g.var(0) for n, g in rows.items()})
        flat = torch.cat([g.reshape(batch, -1) for g in rows.values()], 1)
        torch.testing.assert_close(stats.sq_norms, flat.pow(2).sum(1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.inner_products, flat @ flat.mean(0), rtol=1e-9, atol=1e-12)
