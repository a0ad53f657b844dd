"""The fast engine equals the vmap engine and the oracle; where it cannot be exact it says so."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import persample
from persample.engines.fast import pieces as pieces_module
from persample import NotExact

from dropout_masks import DropoutMasks, replay_oracle
from oracle_stats import oracle_stats
from zoo import CASE_IDS, CASES, assert_dicts_close, call_model, oracle_grads


def _stats(model, loss_fn, x, y, engine, **kw):
    return persample.grad_stats(model, loss_fn, x, y, engine=engine, inner_products=True, clip_norm=0.7, **kw)


def assert_oracle_stats(fast, want, var=True, rtol=1e-9, atol=1e-11):
    """Every field of ``fast`` against the float64 loop oracle's (``oracle_stats``, clip_norm=0.7)."""
    assert fast.n == want["n"]
    assert_dicts_close(fast.mean, want["mean"], rtol, atol)
    if var:
        assert_dicts_close(fast.var, want["var"], rtol, atol)
    assert_dicts_close(fast.param_sq_norms, want["param_sq_norms"], rtol, atol)
    assert_dicts_close(fast.clipped_mean, want["clipped_mean"], rtol, atol)
    torch.testing.assert_close(fast.inner_products, want["inner_products"], rtol=rtol, atol=atol)
    torch.testing.assert_close(fast.losses, want["losses"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("batch", [5, 6])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fast_with_every_option_equals_the_oracle_on_the_zoo(case, batch):
    model, x, y = case.instantiate(batch=batch)
    assert_oracle_stats(_stats(model, case.loss_fn, x, y, "fast"), oracle_stats(model, case.loss_fn, x, y, 0.7))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fast_without_the_variance_equals_the_oracle_on_the_zoo(case):
    """``var=False`` takes other paths (means of formed layers from one sum, no second moments)."""
    model, x, y = case.instantiate(batch=5)
    fast = _stats(model, case.loss_fn, x, y, "fast", var=False)
    assert fast.m2 is None
    assert_oracle_stats(fast, oracle_stats(model, case.loss_fn, x, y, 0.7), var=False)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fast_equals_the_oracle(case):
    model, x, y = case.instantiate(batch=4)
    grads, losses = oracle_grads(model, case.loss_fn, x, y)
    stats = persample.grad_stats(model, case.loss_fn, x, y, engine="fast")
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-11)
    assert_dicts_close(stats.param_sq_norms, {k: g.reshape(4, -1).pow(2).sum(1) for k, g in grads.items()})
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)


def _conv_variants():
    return [
        nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=1),
        nn.Conv1d(3, 6, 4, padding="same", padding_mode="reflect", groups=3),
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), bias=False),
        nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular", groups=3),
        nn.Conv2d(3, 4, 3, padding="same", dilation=2, padding_mode="replicate"),
        nn.Conv2d(3, 4, 3, padding="same"),
        nn.Conv1d(3, 2, 3, padding="valid"),
        nn.Conv2d(3, 3, 3, padding="same", groups=3),
        nn.Conv3d(3, 2, 2, stride=(1, 2, 1)),
    ]


@pytest.mark.parametrize("conv", _conv_variants(), ids=lambda c: repr(c))
def test_convolution_rule_variants(conv):
    torch.manual_seed(0)
    spatial = {nn.Conv1d: (9,), nn.Conv2d: (7, 6), nn.Conv3d: (5, 4, 5)}[type(conv)]
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(4, 3, *spatial, dtype=torch.float64)
    model(x)
    y = torch.randn(4, 2, dtype=torch.float64)
    assert_oracle_stats(_stats(model, F.mse_loss, x, y, "fast"), oracle_stats(model, F.mse_loss, x, y, 0.7))


class SequenceModel(nn.Module):
    def __init__(self, d, p, norm):
        super().__init__()
        self.embed = nn.Embedding(11, d, padding_idx=0)
        self.norm = norm
        self.proj = nn.Linear(d, p)
        self.head = nn.Linear(p, 2)

    def forward(self, tokens):
        h = self.proj(self.norm(self.embed(tokens)))
        return self.head(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("d, p, length", [(8, 8, 2), (4, 4, 20), (6, 3, 1)], ids=["ghost", "materialise", "T=1"])
@pytest.mark.parametrize("norm", ["layer", "rms", "layer2d"])
def test_sequence_rules_ghost_and_materialised_paths(d, p, length, norm):
    torch.manual_seed(1)
    layer = {
        "layer": nn.LayerNorm(d),
        "rms": nn.RMSNorm(d, eps=1e-5),
        "layer2d": nn.Sequential(nn.Unflatten(-1, (2, d // 2)), nn.LayerNorm((2, d // 2)), nn.Flatten(-2)),
    }[norm]
    model = SequenceModel(d, p, layer).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.weight.uniform_(0.5, 1.5)
    tokens = torch.randint(0, 11, (5, length))
    tokens[0, 0] = 0  # padding_idx gets no gradient
    y = torch.randn(5, 2, dtype=torch.float64)
    assert_oracle_stats(_stats(model, F.mse_loss, tokens, y, "fast"), oracle_stats(model, F.mse_loss, tokens, y, 0.7))


def test_subclasses_are_matched_by_isinstance():
    class MyLinear(nn.Linear):
        pass

    from persample.engines.fast.rules import find_rule

    assert find_rule(MyLinear(2, 3)).name == "linear"
    assert find_rule(nn.ConvTranspose2d(2, 3, 3)) is None  # not a Conv2d: falls back to torch.func


def test_mlp_statistics_never_materialise_per_example_gradients(monkeypatch):
    def forbidden(self, start, stop, out=None):
        raise AssertionError("materialised B x P gradients")

    monkeypatch.setattr(pieces_module.OuterPiece, "_unscaled", forbidden)  # every chunk is formed here
    monkeypatch.setattr(pieces_module.Piece, "_unscaled", forbidden)
    case = CASES[CASE_IDS.index("mlp")]
    model, x, y = case.instantiate(batch=8)
    stats = persample.grad_stats(model, case.loss_fn, x, y, engine="fast", inner_products=True, clip_norm=1.0)
    assert stats.var is not None and stats.inner_products is not None


def test_var_false_gives_mean_and_norms_only():
    case = CASES[CASE_IDS.index("cnn_groupnorm_pool")]
    model, x, y = case.instantiate()
    stats = persample.grad_stats(model, case.loss_fn, x, y, engine="fast", var=False)
    assert stats.var is None
    want = oracle_stats(model, case.loss_fn, x, y)
    assert_dicts_close(stats.param_sq_norms, want["param_sq_norms"])
    assert_dicts_close(stats.mean, want["mean"])


# --------------------------------------------------------------- where fast cannot be exact


class EscapedTie(nn.Module):
    """Uses the embedding's weight in its own forward, outside the Embedding module."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, tokens):
        return torch.tanh(self.mix(self.embed(tokens))) @ self.embed.weight.T


class TimeMajor(nn.Module):
    """Moves the batch to dim 1 before a Linear (as old sequence code does)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):  # x: [B, T, 3]
        h = torch.tanh(self.inp(x.transpose(0, 1)))  # [T, B, 4]
        return self.out(h.mean(0))


class TimeMajorBatchCentred(TimeMajor):
    """TimeMajor, centred over dim 1 of its [T, B, 4] activations: the batch, so the examples mix. (TimeMajor
    itself is exact: the Linear reads example i at index i of dim 1, the place its transpose put it.)"""

    def forward(self, x):  # x: [B, T, 3]
        h = torch.tanh(self.inp(x.transpose(0, 1)))  # [T, B, 4]
        return self.out((h - h.mean(1, keepdim=True)).mean(0))


class BroadcastMisuse(nn.Module):
    """A position embedding whose broadcast output is reduced over its own batch dim."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(6, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):  # x: [B, 6, 4]
        positions = self.pos(torch.arange(6).unsqueeze(0))  # [1, 6, 4]
        return self.out(x.mean(1) + positions.sum(0).sum(0))


class NotBatchFirst(nn.Module):
    """A rule-less module whose output puts the batch on dim 1."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):  # [B, T, 3] -> [T, B, 2]
        return (x @ self.w).transpose(0, 1)


class WrapsNotBatchFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.core = NotBatchFirst()
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.core(x).mean(0))


class DropoutInFallback(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        return F.dropout(x @ self.w, 0.3, training=True)


NOT_EXACT = [
    (
        "escaped_tie",
        EscapedTie,
        lambda: (torch.randint(0, 10, (5, 3)), torch.randint(0, 10, (5, 3))),
        lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()),
        "outside the module",
    ),
    (
        "time_major_T_ne_B",
        TimeMajorBatchCentred,
        lambda: (torch.randn(5, 7, 3), torch.randn(5, 2)),
        F.mse_loss,
        "mixes the examples",
    ),
    ("time_major_T_eq_B", TimeMajor, lambda: (torch.randn(5, 5, 3), torch.randn(5, 2)), F.mse_loss, "ambiguous"),
    ("broadcast_misuse", BroadcastMisuse, lambda: (torch.randn(5, 6, 4), torch.randn(5, 2)), F.mse_loss, "broadcast"),
    (
        "fallback_not_batch_first",
        WrapsNotBatchFirst,
        lambda: (torch.randn(5, 7, 3), torch.randn(5, 2)),
        F.mse_loss,
        "not batched",
    ),
]


@pytest.mark.parametrize("name, build, batch, loss_fn, message", NOT_EXACT, ids=[c[0] for c in NOT_EXACT])
def test_not_exact_is_reported_and_auto_falls_back_to_vmap(name, build, batch, loss_fn, message):
    torch.manual_seed(0)
    model = build().double()
    x, y = batch()
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y
    with pytest.raises(NotExact, match=message):
        persample.grad_stats(model, loss_fn, x, y, engine="fast")
    auto = persample.grad_stats(model, loss_fn, x, y, engine="auto")
    grads, _ = oracle_grads(model, loss_fn, x, y)
    assert_dicts_close(auto.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(auto.param_sq_norms, {k: g.reshape(5, -1).pow(2).sum(1) for k, g in grads.items()})


def test_random_ops_inside_a_fallback_are_not_exact():
    torch.manual_seed(0)
    model = nn.Sequential(DropoutInFallback(), nn.Linear(3, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(NotExact, match="draws random numbers"):
        persample.grad_stats(model, F.mse_loss, x, y, engine="fast", randomness="different")


def test_dropout_in_rule_layers_is_exact_for_the_masks_drawn():
    """With randomness='different' the fast engine sees the batch's own dropout masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    with DropoutMasks() as rec:
        stats = persample.grad_stats(model, F.mse_loss, x, y, engine="fast", randomness="different")
    grads, _ = replay_oracle(model, F.mse_loss, x, y, rec.batch_masks(1, 6))  # the masks drawn, replayed
    assert stats.n == 6
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()})
    assert_dicts_close(stats.param_sq_norms, {k: g.reshape(6, -1).pow(2).sum(1) for k, g in grads.items()})


def test_hooks_are_removed_even_when_the_model_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        persample.grad_stats(model, F.mse_loss, torch.randn(4, 3), torch.randn(4, 3), engine="fast")
    assert not model.lin._forward_hooks and not model.lin._forward_pre_hooks


def test_auto_is_what_tracker_uses_and_matches_backward():
    case = CASES[CASE_IDS.index("hf_gpt2")]
    model, x, y = case.instantiate()
    tracker = persample.Tracker(model, case.loss_fn)
    assert tracker.stats_options["engine"] == "auto"
    want = oracle_stats(model, case.loss_fn, x, y)
    reference = copy.deepcopy(model)
    case.loss_fn(call_model(reference, x), y).backward()
    stats = tracker.step(x, y)
    assert_dicts_close(stats.param_sq_norms, want["param_sq_norms"])
    assert_dicts_close(stats.mean, want["mean"])
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_dicts_close(grads, {n: p.grad for n, p in reference.named_parameters() if p.grad is not None})
    assert_dicts_close(grads, want["mean"])  # p.grad = (w·B)·mean, w = 1/B


def test_captured_calls_do_not_outlive_the_computation():
    """Hooks on captured outputs must not reference them back (a leak autograd's C++ storage hides)."""
    import gc

    from persample.engines.fast.units import Call

    case = CASES[CASE_IDS.index("hf_gpt2")]
    model, x, y = case.instantiate()

    def live_calls():
        gc.collect()
        return sum(isinstance(o, Call) for o in gc.get_objects())

    before = live_calls()
    for _ in range(3):
        persample.grad_stats(model, case.loss_fn, x, y, engine="fast")
    assert live_calls() == before


@pytest.mark.parametrize("name", ["mlp", "cnn_groupnorm_pool", "hf_gpt2"])
def test_a_call_leaves_nothing_for_the_garbage_collector_to_free(name):
    """Everything a call captured is freed when it returns, by reference counting alone. Held in a
    reference cycle, the activations, output gradients and graph nodes of one step stayed alive
    into the next (twice the activation memory) and made the collector run about every 7 calls."""
    import gc

    from persample.engines.fast.units import Call, Unit

    case = CASES[CASE_IDS.index(name)]
    model, x, y = case.instantiate()
    persample.grad_stats(model, case.loss_fn, x, y, engine="fast")
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        persample.grad_stats(model, case.loss_fn, x, y, engine="fast")
        gc.collect()
        held = [type(o).__name__ for o in gc.garbage if isinstance(o, (Tensor, Call, Unit, torch.autograd.graph.Node))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert held == []


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.name in ("tied_weights", "hf_gpt2", "cnn_groupnorm_pool", "transformer_encoder")],
    ids=lambda c: c.name,
)
def test_chunked_materialisation_gives_the_same_statistics(case, monkeypatch):
    """Force pieces to be formed a few examples at a time (the path large layers take)."""
    model, x, y = case.instantiate(batch=5)
    reference = oracle_stats(model, case.loss_fn, x, y, 0.7)
    monkeypatch.setattr(pieces_module, "CHUNK_ELEMENTS", 64)
    assert_oracle_stats(_stats(model, case.loss_fn, x, y, "fast"), reference)


def _pieces_with_their_gradients():
    """(piece, its per-example gradients [B, *shape] formed independently of the piece's reductions)."""
    torch.manual_seed(0)
    b, t, p, d, s = 5, 3, 4, 6, 2.5
    act, grad = torch.randn(b, t, d, dtype=torch.float64), torch.randn(b, t, p, dtype=torch.float64)
    outer = s * torch.einsum("btp,btd->bpd", grad, act)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect").double()
    x, gy = torch.randn(b, 4, 5, 5, dtype=torch.float64), torch.randn(b, 6, 5, 5, dtype=torch.float64)
    conv_grads = []
    for i in range(b):  # autograd, one example at a time
        w = conv.weight.detach().clone().requires_grad_()
        out = F.conv2d(F.pad(x[i : i + 1], (1, 1, 1, 1), mode="reflect"), w, None, 1, 0, 1, 2)
        conv_grads.append(s * torch.autograd.grad(out, w, gy[i : i + 1])[0])
    return [
        (pieces_module.OuterPiece(act, grad, torch.Size([p, d]), scale=s), outer),
        (pieces_module.OuterPiece(act, grad, torch.Size([d, p]), transposed=True, scale=s), outer.transpose(1, 2)),
        (pieces_module.ConvPiece(conv, x, gy, conv.weight.shape, scale=s), torch.stack(conv_grads).squeeze(1)),
        (pieces_module.DensePiece(outer / s, scale=s), outer),
    ]


@pytest.mark.parametrize("index", range(4), ids=["outer", "outer_transposed", "conv_grouped_reflect", "dense"])
def test_piece_reductions_match_the_formed_gradients(index):
    piece, g = _pieces_with_their_gradients()[index]
    weights = torch.rand(g.shape[0], dtype=torch.float64)
    probe = torch.randn(g[0].numel() // g.shape[1], 3, dtype=torch.float64)
    torch.testing.assert_close(
        piece.weighted_sum(weights), torch.einsum("b,b...->...", weights, g), rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(
        piece.projected_sum(probe), g.sum(0).reshape(g.shape[1], -1) @ probe, rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(piece.materialize(0, g.shape[0]), g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(piece.sq_norms(), g.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(piece.second_moment(), g.pow(2).sum(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        piece.sq_norms(), g.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12
    )  # now from the cached pass


@pytest.mark.parametrize("kind", ["dense", "one_element"])
def test_sum_check_by_probes_sees_small_differences_in_large_layers(kind):
    """A dense difference (a regulariser) of 1% of max|mean| is caught, and one element off by 10%.
    (Probes dilute a single element's difference by about sqrt(columns), so a lone element
    needs to be larger than the 1e-3 relative tolerance of the whole-tensor check.)"""
    from persample.engines.fast.engine import EXACT_CHECK_NUMEL, means_that_differ

    torch.manual_seed(1)
    act, grad = torch.randn(8, 1, 300), torch.randn(8, 1, 200)
    assert 300 * 200 > EXACT_CHECK_NUMEL  # the probe path
    piece = pieces_module.OuterPiece(act, grad, torch.Size([200, 300]))
    mean = piece.weighted_sum(torch.full((8,), 1 / 8))
    assert means_that_differ({"w": piece}, {"w": mean}, float64_rtol=1e-6) == []
    size = mean.abs().max()
    off = mean.clone()
    if kind == "dense":
        off += 1e-2 * size * torch.randn_like(mean)
    else:
        off[17, 42] += 1e-1 * size
    assert means_that_differ({"w": piece}, {"w": off}, float64_rtol=1e-6) == ["w"]
