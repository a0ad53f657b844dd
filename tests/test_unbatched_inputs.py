"""Rule modules called on inputs without a batch dim (``self.pos(torch.arange(T))``), and the cases where
the batch dim of a broadcast is ambiguous (issue 13). Oracle: a float64 loop of autograd per example."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import NotExact, Tracker

from zoo import assert_dicts_close, gpt2_tiny, oracle_grads


class Pos(nn.Module):
    """GPT-style: token embeddings [B, T, d] plus position embeddings of ``arange(T)``, shape [T, d]."""

    def __init__(self, mode: str = "add"):
        super().__init__()
        self.mode = mode
        self.tok, self.pos, self.head = nn.Embedding(20, 8), nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, x):
        positions = self.pos(torch.arange(x.shape[1]))
        if self.mode == "add":
            h = self.tok(x) + positions
        elif self.mode == "scaled":  # a derived expansion: a scale and a cast, then the batch
            h = positions.to(torch.float64) * 0.5 + self.tok(x)
        elif self.mode == "in_place":  # BERT's `embeddings += position_embeddings`
            h = self.tok(x)
            h += positions
        elif self.mode == "reads_shape":  # the model sees the original shape, not the expansion's
            assert positions.shape == (x.shape[1], 8) and len(positions) == x.shape[1] and positions.dim() == 2
            h = self.tok(x) + positions
        return self.head(h.mean(1))


class LinearPositions(nn.Module):
    """A Linear and a LayerNorm on a table of positions without batch dim (float coordinates)."""

    def __init__(self):
        super().__init__()
        self.coords = nn.Linear(2, 6)
        self.norm = nn.LayerNorm(6)
        self.inp, self.head = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):  # x: [B, T, 3]
        t = torch.linspace(0, 1, x.shape[1], dtype=x.dtype)
        table = self.norm(self.coords(torch.stack([t, t * t], 1)))  # [T, 6]: rule modules on no batch dim
        return self.head(torch.tanh(self.inp(x) - table).mean(1))


def _tokens(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (b, t), generator=g), torch.randint(0, 3, (b,), generator=g)


def _expected(model, loss_fn, x, y):
    grads, losses = oracle_grads(model, loss_fn, x, y)
    b = losses.shape[0]
    return grads, {k: g.reshape(b, -1).pow(2).sum(1) for k, g in grads.items()}


def _assert_stats(stats, grads, sq_norms, rtol=1e-9):
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()}, rtol=rtol)
    assert_dicts_close(stats.param_sq_norms, sq_norms, rtol=rtol)
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()}, rtol=rtol)


@pytest.mark.parametrize("mode", ["add", "scaled", "in_place", "reads_shape"])
def test_positions_without_batch_dim_are_exact_in_the_fast_engine_observe_and_step(mode):
    torch.manual_seed(0)
    model = Pos(mode).double()
    x, y = _tokens(6, 5)
    grads, sq = _expected(model, F.cross_entropy, x, y)
    _assert_stats(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast"), grads, sq)
    tracker = Tracker(model, F.cross_entropy)
    with tracker.observe(y) as observed:
        F.cross_entropy(model(x), y).backward()
    _assert_stats(observed.stats, grads, sq)
    observed_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # observe left the user's own backward unchanged
    assert_dicts_close(observed_grad, {n: p.grad for n, p in model.named_parameters()}, rtol=0, atol=0)
    model.zero_grad()
    _assert_stats(tracker.step(x, y), grads, sq)
    assert_dicts_close({n: p.grad for n, p in model.named_parameters()}, {k: g.mean(0) for k, g in grads.items()})


def test_linear_and_layernorm_on_a_table_without_batch_dim():
    torch.manual_seed(0)
    model = LinearPositions().double()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    grads, sq = _expected(model, F.cross_entropy, x, y)
    _assert_stats(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast"), grads, sq)
    with Tracker(model, F.cross_entropy).observe(y) as observed:
        F.cross_entropy(model(x), y).backward()
    _assert_stats(observed.stats, grads, sq)


def test_hugging_face_gpt2_with_one_dimensional_position_ids():
    """GPT-2 (transformers 5) makes position_ids = arange(T)[None] itself (batch dim of size 1); here the
    caller passes arange(T) without batch dim, which wpe then sees."""

    class ArangePositions(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = gpt2_tiny()

        def forward(self, ids):
            return self.gpt(ids, position_ids=torch.arange(ids.shape[1])).logits

    def loss_fn(logits, ids):  # next-token loss, mean over the example's tokens
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    torch.manual_seed(0)
    model = ArangePositions().double()
    ids = torch.randint(0, 40, (4, 6))
    grads, sq = _expected(model, loss_fn, ids, ids)
    _assert_stats(persample.grad_stats(model, loss_fn, ids, ids, engine="fast"), grads, sq)
    tracker = Tracker(model, loss_fn)
    with tracker.observe(ids) as observed:
        loss_fn(model(ids), ids).backward()
    _assert_stats(observed.stats, grads, sq)
    model.zero_grad()
    _assert_stats(tracker.step(ids, ids), grads, sq)


# ------------------------------------------------------------------------ ambiguous: refused


class HeadsEqualBatch(nn.Module):
    """Position embeddings [1, T, d] added to a [B, H, T, d] tensor: dim 0 of the expansion would line up
    with the heads, not with the batch (silently wrong before when H == B)."""

    def __init__(self, heads=4):
        super().__init__()
        self.heads = heads
        self.inp, self.pos, self.head = nn.Linear(2, heads * 3), nn.Embedding(5, 3), nn.Linear(3, 2)

    def forward(self, x):  # [B, T, 2]
        b, t, _ = x.shape
        h = self.inp(x).view(b, t, self.heads, 3).permute(0, 2, 1, 3)
        return self.head((h + self.pos(torch.arange(t).unsqueeze(0))).mean((1, 2)))


class Scale(nn.Module):
    """A module without a closed-form rule (its gradients come from torch.func, checked by their sum)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x * self.w


class SequenceFirst(nn.Module):
    """A learned bias (an Embedding of one id, [1, 1, d]) added to a sequence-first [T, B, d] tensor (an
    activation, or the raw input): with T == B, the expansion's dim 0 lines up with time, not with the
    batch. No rule sees a position dim of size B, so this was silently wrong before."""

    def __init__(self, raw_input: bool):
        super().__init__()
        self.raw_input = raw_input
        self.scale, self.bias, self.head = Scale(), nn.Embedding(1, 3), nn.Linear(3, 2)

    def forward(self, x):  # [B, T, 3]
        h = (x if self.raw_input else self.scale(x)).transpose(0, 1)  # [T, B, 3]
        h = h + self.bias(torch.zeros(1, 1, dtype=torch.long))
        h = torch.tanh(h.transpose(0, 1)).mean(1)
        return self.head(self.scale(h) if self.raw_input else h)


class SoftPositions(nn.Module):
    """Each example mixes the position table with its own weights, w [B, T] @ pos(arange(T)) [T, d]: with
    T == B the table's dim 0 looks batched but is contracted (silently wrong before)."""

    def __init__(self, t):
        super().__init__()
        self.t = t
        self.score, self.pos, self.head = nn.Linear(2, 1), nn.Embedding(t, 3), nn.Linear(3, 2)

    def forward(self, x):  # [B, T, 2]
        w = torch.softmax(self.score(x).squeeze(-1), -1)
        return self.head(w @ self.pos(torch.arange(self.t)))


AMBIGUOUS = [
    ("arange_T_equals_B", lambda: Pos(), lambda: _tokens(6, 6), "ambiguous"),
    (
        "heads_equal_batch",
        lambda: HeadsEqualBatch(4),
        lambda: (torch.randn(4, 5, 2), torch.randint(0, 2, (4,))),
        "lines up with dim 1",
    ),
    (
        "contracted_table_T_equals_B",
        lambda: SoftPositions(4),
        lambda: (torch.randn(4, 4, 2), torch.randint(0, 2, (4,))),
        "contracts its dim 0",
    ),
    (
        "contracted_table_T_ne_B",
        lambda: SoftPositions(5),
        lambda: (torch.randn(4, 5, 2), torch.randint(0, 2, (4,))),
        "not a broadcast over the batch",
    ),
    (
        "sequence_first_activation_T_equals_B",
        lambda: SequenceFirst(False),
        lambda: (torch.randn(4, 4, 3), torch.randint(0, 2, (4,))),
        "may be sequence-first",
    ),
    (
        "sequence_first_raw_input_T_equals_B",
        lambda: SequenceFirst(True),
        lambda: (torch.randn(4, 4, 3), torch.randint(0, 2, (4,))),
        "may be sequence-first",
    ),
]


@pytest.mark.parametrize("build, batch, message", [c[1:] for c in AMBIGUOUS], ids=[c[0] for c in AMBIGUOUS])
def test_an_ambiguous_batch_dim_is_refused_and_auto_and_step_stay_exact(build, batch, message):
    torch.manual_seed(0)
    model = build().double()
    x, y = batch()
    x = x.double() if x.is_floating_point() else x
    grads, sq = _expected(model, F.cross_entropy, x, y)
    with pytest.raises(NotExact, match=message):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    _assert_stats(persample.grad_stats(model, F.cross_entropy, x, y, engine="auto"), grads, sq)
    with pytest.raises(NotExact, match=message):
        with Tracker(model, F.cross_entropy).observe(y):
            F.cross_entropy(model(x), y).backward()
    model.zero_grad()
    _assert_stats(Tracker(model, F.cross_entropy).step(x, y), grads, sq)


class MisusedPositions(nn.Module):
    """The expansion's other uses: a reduction over dim 0, for [1, T] and for [T] position ids."""

    def __init__(self, size_one: bool):
        super().__init__()
        self.size_one = size_one
        self.pos, self.out = nn.Embedding(6, 4), nn.Linear(4, 2)

    def forward(self, x):  # [B, 6, 4]
        ids = torch.arange(6)
        positions = self.pos(ids[None] if self.size_one else ids)
        return self.out(x.mean(1) + positions.sum(0).reshape(-1, 4).sum(0))


@pytest.mark.parametrize("size_one", [True, False])
def test_a_refused_expansion_leaves_the_users_forward_and_backward_unchanged(size_one):
    """observe must never change what the user's own forward computes, even where it then refuses: every
    use that is not a broadcast is computed on the original (unexpanded) output. Before, ``sum(0)`` summed
    the expansion's B copies and p.grad came out B times too large for ``pos``."""
    torch.manual_seed(0)
    model = MisusedPositions(size_one).double()
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    expected_loss = F.mse_loss(model(x), y)
    expected_loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    losses = []
    with pytest.raises(NotExact, match="not a broadcast over the batch"):
        with Tracker(model, F.mse_loss).observe(y):
            loss = F.mse_loss(model(x), y)
            losses.append(loss.detach())
            loss.backward()
    assert torch.equal(losses[0], expected_loss.detach())
    assert_dicts_close({n: p.grad for n, p in model.named_parameters()}, expected, rtol=0, atol=0)


def test_a_rule_that_reads_dim_0_as_its_batch_is_not_expanded():
    """GroupNorm on [T, C, L] normalises each of the T rows: no batch dim to add, so no closed form."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.head = nn.GroupNorm(2, 4), nn.Linear(8, 2)
            self.register_buffer("table", torch.randn(3, 4, 2))

        def forward(self, x):  # [B, 3, 4, 2]
            return self.head((x + self.norm(self.table)).mean(1).flatten(1))

    torch.manual_seed(0)
    model = Model().double()
    x, y = torch.randn(5, 3, 4, 2, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(NotExact, match="dim 0 is not the batch"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    grads, sq = _expected(model, F.cross_entropy, x, y)
    _assert_stats(persample.grad_stats(model, F.cross_entropy, x, y), grads, sq)


def test_outputs_of_frozen_layers_watched_for_their_batch_dim_stay_exact():
    """A rule module fed by a frozen layer (its input has dim 0 == B but no gradient: watched, since a
    constant could look the same) stays on the fast path through attention, whose own transposes (inside
    the rule-less module, handled as a whole) are not the model moving dim 0."""

    class FrozenThenAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8).requires_grad_(False)
            self.lin = nn.Linear(8, 8)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.lin(self.emb(x)))
            a, _ = self.att(h, h, h, need_weights=False)
            return self.head((a + h).mean(1))

    torch.manual_seed(0)
    model = FrozenThenAttention().double()
    x, y = _tokens(5, 6)
    grads, sq = _expected(model, F.cross_entropy, x, y)
    _assert_stats(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast"), grads, sq)
    with Tracker(model, F.cross_entropy).observe(y) as observed:
        F.cross_entropy(model(x), y).backward()
    _assert_stats(observed.stats, grads, sq)
