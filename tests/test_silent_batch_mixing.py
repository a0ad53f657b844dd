"""Forwards that mix the examples along the batch dim are refused by the fast engine and observe.

``h.roll(1, 0)`` inside ``forward`` used to give statistics 40–300% off with no error: the layer rules read
row i of an activation and of an output gradient as example i's, but after a roll, a sort, a mean over
dim 0 or ``h.T @ h`` row i carries other examples. ``engine="auto"`` then computes each example alone
(vmap, or the loop): loss_fn on a batch of one, which is the oracle below.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from zoo import assert_dicts_close, oracle_grads

PERMUTATION = [1, 0, 3, 2, 5, 4]

MIXES = {
    "roll": lambda h: h.roll(1, 0),
    "sort": lambda h: h.sort(0).values,
    "centre": lambda h: h - h.mean(0),
    "gram": lambda h: h @ (h.T @ h) / 10,
    "cumsum": lambda h: h.cumsum(0) / 3,
    "flip": lambda h: h.flip(0),
    "permutation": lambda h: h[torch.tensor(PERMUTATION[: h.shape[0]]) % h.shape[0]],
    "max": lambda h: h + h.max(0).values,
    "sum_keepdim": lambda h: h + h.sum(0, keepdim=True) / 6,
    "softmax0": lambda h: h.softmax(0),
    "shift_by_cat": lambda h: torch.cat([h[1:], h[:1]]),
    "mixup": lambda h: 0.7 * h + 0.3 * h.flip(0),
}


class Mixing(nn.Module):
    def __init__(self, mix, where):
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)
        self.mix, self.where = mix, where

    def forward(self, x):
        if self.where == "input":
            x = self.mix(x)
        h = torch.tanh(self.a(x))
        if self.where == "hidden":
            h = self.mix(h)
        return self.b(h)


CASES = [(name, where) for name in MIXES for where in ("hidden", "input") if not (name == "gram" and where == "input")]
IDS = [f"{n}-{w}" for n, w in CASES]


def _case(name, where):
    torch.manual_seed(0)
    model = Mixing(MIXES[name], where).double()
    return model, torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))


@pytest.mark.parametrize("name,where", CASES, ids=IDS)
def test_fast_and_observe_refuse(name, where):
    model, x, y = _case(name, where)
    with pytest.raises(persample.NotExact, match=r"the forward mixes the examples of the batch.*\[BATCH_MIXED\]"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(persample.NotExact, match=r"the forward mixes the examples of the batch.*\[BATCH_MIXED\]"):
        with tracker.observe(y):
            F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize(
    "name,where",
    [c for c in CASES if c[0] != "permutation"],
    ids=[i for i, c in zip(IDS, CASES) if c[0] != "permutation"],
)
def test_auto_is_the_batch_of_one_oracle(name, where):
    model, x, y = _case(name, where)
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)  # loss_fn(model(x_i[None]), y_i[None]), float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = persample.grad_stats(model, F.cross_entropy, x, y)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})


@pytest.mark.parametrize(
    "op",
    [
        lambda h: h[torch.arange(h.shape[0])],
        lambda h: h[:, 1:].mean(1, keepdim=True) + h,
        lambda h: h.softmax(-1),
        lambda h: h.sort(-1).values,
        lambda h: h.cumsum(1),
        lambda h: h.flip(1),
        lambda h: h.roll(1, 1),
        lambda h: h[:],
        lambda h: h - h.mean(1, keepdim=True),
    ],
    ids=["arange-index", "mean1", "softmax-1", "sort-1", "cumsum1", "flip1", "roll1", "full-slice", "centre1"],
)
@pytest.mark.parametrize("where", ["hidden", "input"])
def test_ops_that_keep_examples_apart_stay_on_the_fast_engine(op, where):
    torch.manual_seed(0)
    model = Mixing(op, where).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})


def test_a_sequence_model_pooling_over_positions_stays_on_the_fast_engine():
    torch.manual_seed(0)

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

        def forward(self, x):  # [B, T, 5]
            return self.b(torch.tanh(self.a(x)).mean(1).softmax(-1))

    model = Pool().double()
    x, y = torch.randn(6, 7, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})


def test_a_running_mean_of_the_inputs_kept_in_a_buffer_is_not_mixing():
    """``x.mean(0)`` into a buffer that the forward does not use changes no example's output."""
    torch.manual_seed(0)

    class Running(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)
            self.register_buffer("ema", torch.zeros(5, dtype=torch.float64))

        def forward(self, x):
            self.ema.mul_(0.9).add_(0.1 * x.mean(0))
            return self.b(torch.tanh(self.a(x)))

    model = Running().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})


# Contractions and reductions over the batch dim, written as users write them: einsum with the batch letter
# summed, tensordot / bmm / baddbmm / matmul of transposed views, attention over the batch, distances,
# covariances, normalisation over dim 0, train-mode functional batch norm, scatters from other rows.
_ROWS = torch.tensor([1, 0, 3, 2, 5, 4])
CONTRACTIONS = {
    "einsum-bi,bj->ij": lambda h: h @ torch.einsum("bi,bj->ij", h, h) / 10,
    "einsum-bi,ci->bc": lambda h: torch.einsum("bi,ci->bc", h, h) @ h / 10,
    "einsum-bi->i": lambda h: h + torch.einsum("bi->i", h) / 10,
    "tensordot-dim0": lambda h: h @ torch.tensordot(h, h, dims=([0], [0])) / 10,
    "bmm-transposed": lambda h: h @ torch.bmm(h.T.unsqueeze(0), h.unsqueeze(0))[0] / 10,
    "baddbmm-transposed": lambda h: (
        h @ torch.baddbmm(torch.zeros(1, 4, 4, dtype=h.dtype), h.T.unsqueeze(0), h.unsqueeze(0))[0] / 10
    ),
    "matmul-h-hT": lambda h: torch.matmul(h, h.T) @ h / 10,
    "attention-over-batch": lambda h: (h @ h.T).softmax(-1) @ h,
    "sdpa-over-batch": lambda h: F.scaled_dot_product_attention(h[None], h[None], h[None])[0],
    "cdist": lambda h: torch.cdist(h, h) @ h / 10,
    "pdist": lambda h: h * torch.pdist(h).sum() / 10,
    "normalize-dim0": lambda h: F.normalize(h, dim=0),
    "logsumexp0": lambda h: h - h.logsumexp(0),
    "vector_norm0": lambda h: h / torch.linalg.vector_norm(h, dim=0),
    "median0": lambda h: h - h.median(0).values,
    "quantile0": lambda h: h - h.quantile(0.5, dim=0),
    "amax0": lambda h: h - h.amax(0),
    "mean-of-all": lambda h: h - h.mean(),
    "layer_norm-over-batch": lambda h: F.layer_norm(h, h.shape),
    "group_norm-of-transpose": lambda h: F.group_norm(h.T[None], 1)[0].T,
    "detached-centre": lambda h: h - h.detach().mean(0),
    "diff0": lambda h: torch.cat([h[:1], h.diff(dim=0)]),
    "transpose-reshape": lambda h: h.T.reshape(h.shape),
    "index_add-other-rows": lambda h: torch.zeros_like(h).index_add(0, _ROWS[: h.shape[0]] % h.shape[0], h),
    "scatter_add-other-rows": lambda h: torch.zeros_like(h).scatter_add(
        0, (_ROWS[: h.shape[0]] % h.shape[0])[:, None].expand_as(h), h
    ),
    "index_put-other-rows": lambda h: torch.zeros_like(h).index_put((_ROWS[: h.shape[0]] % h.shape[0],), h),
    # on a batch of one these are NaN (an unbiased spread of one row): the oracle's answer too
    "std0": lambda h: h / h.std(0),
    "var0": lambda h: h + h.var(0, keepdim=True),
    "cov": lambda h: h @ torch.cov(h.T),
    "corrcoef": lambda h: h @ torch.corrcoef(h.T) / 4,
}


def _contraction(name):
    torch.manual_seed(0)
    model = Mixing(CONTRACTIONS[name], "hidden").double()
    return model, torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))


@pytest.mark.parametrize("name", list(CONTRACTIONS))
def test_contractions_over_the_batch_are_refused_by_fast_and_observe_and_exact_through_auto(name):
    model, x, y = _contraction(name)
    with pytest.raises(persample.NotExact) as err:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert err.value.code == "BATCH_MIXED"
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(persample.NotExact) as err:
        with tracker.observe(y):
            F.cross_entropy(model(x), y).backward()
    assert err.value.code == "BATCH_MIXED"
    assert "cannot be shown apart" not in str(err.value)  # found, not a probe that could not run
    model.zero_grad()
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        stats = persample.grad_stats(model, F.cross_entropy, x, y)
    for k, g in grads.items():
        torch.testing.assert_close(stats.mean[k], g.mean(0), rtol=1e-9, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(
            stats.param_sq_norms[k], g.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12, equal_nan=True
        )


@pytest.mark.parametrize(
    "mix",
    [lambda h: F.batch_norm(h, None, None, training=True), lambda h: h[torch.tensor([1, 0, 3, 2, 5, 4])]],
    ids=["functional-batch_norm-training", "fixed-permutation-of-6-rows"],
)
def test_a_mixing_model_that_fails_on_one_example_is_refused_with_a_code(mix):
    """Refused by fast and observe; ``auto``'s batch-of-one fallback runs the model on one example, where it
    raises its own error (a batch norm of one row, an index past row 0): that becomes a refusal with a code."""
    torch.manual_seed(0)
    model = Mixing(mix, "hidden").double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(persample.NotExact) as err:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert err.value.code == "BATCH_MIXED"
    with pytest.raises(persample.NotExact) as err:
        with persample.Tracker(model, F.cross_entropy).observe(y):
            F.cross_entropy(model(x), y).backward()
    assert err.value.code == "BATCH_MIXED"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        with pytest.raises(persample.UnsupportedModelError) as err:
            persample.grad_stats(model, F.cross_entropy, x, y)
    assert err.value.code == "BATCH_OF_ONE_FAILS"
    assert isinstance(err.value.__cause__, (ValueError, IndexError, RuntimeError))


def test_eval_mode_functional_batch_norm_stays_on_the_fast_engine():
    torch.manual_seed(0)
    mean, var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    model = Mixing(lambda h: F.batch_norm(h, mean, var, training=False), "hidden").double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})


def test_a_width_equal_to_the_batch_size_is_exact_and_a_broadcast_across_it_is_refused(monkeypatch):
    """With D == B, an activation's shape cannot tell rows from columns: a plain MLP stays on the fast
    engine without probing the rows, while ``h + h.sum(1)`` (example k's sum added to column k of every
    row) is refused."""
    from persample.engines.fast import audit

    probes = []
    original = audit.rows_leak
    monkeypatch.setattr(audit, "rows_leak", lambda *a, **k: probes.append(1) or original(*a, **k))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads, _ = oracle_grads(plain, F.cross_entropy, x, y)
    stats = persample.grad_stats(plain, F.cross_entropy, x, y, engine="fast")
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})
    assert not probes
    model = Mixing(lambda h: h + h.sum(1) / 4, "hidden").double()
    model.a, model.b = nn.Linear(5, 6).double(), nn.Linear(6, 3).double()
    with pytest.raises(persample.NotExact) as err:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert err.value.code == "BATCH_MIXED"


class _SquareCNN(nn.Module):
    """Six channels at B = 6: every activation has a dim of the batch's size after dim 0."""

    def __init__(self, mix=None):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.norm = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)
        self.mix = mix

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.norm(self.conv(x))), 2)
        if self.mix is not None:
            h = self.mix(h)
        h = F.avg_pool2d(self.conv2(h), 1)
        return self.head(F.adaptive_avg_pool2d(h, 1).view(h.shape[0], -1))


#: Mixes that keep every shape (B = C = 6), so only the probe of the rows can see them.
SQUARE_MIXES = {
    "transpose01": lambda h: h.transpose(0, 1),
    "permute": lambda h: h.permute(1, 0, 2, 3),
    "einsum-swap": lambda h: torch.einsum("bchw->cbhw", h),
    "group_norm-of-transpose": lambda h: F.group_norm(h.transpose(0, 1), 2).transpose(0, 1),
    # slices, concatenations, stacks and expansions keep rows along other dims only
    "shift-by-cat": lambda h: torch.cat([h[1:], h[:1]]),
    "unbind-and-stack-on-dim-1": lambda h: torch.stack(h.unbind(0), 1),
    "first-example-expanded": lambda h: h + h[:1].expand_as(h),
    "channel-scaled-by-another-example": lambda h: h * h[:, :1, :1, :1].reshape(1, -1, 1, 1),
}


def _counted_probes(monkeypatch) -> list:
    from persample.engines.fast import audit

    probes: list = []
    original = audit.rows_leak
    monkeypatch.setattr(audit, "rows_leak", lambda *a, **k: probes.append(1) or original(*a, **k))
    return probes


def test_channels_equal_to_the_batch_size_are_exact_without_a_probe(monkeypatch):
    """Convolutions, GroupNorm, pooling and a flattening view compute each example on its own whatever its
    channel count: a CNN with as many channels as examples stays on the fast engine, exact, with no probe of
    the rows (a backward through the whole model on every call)."""
    probes = _counted_probes(monkeypatch)
    torch.manual_seed(0)
    model = _SquareCNN().double()
    x, y = torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert not probes


def test_a_per_sample_op_between_two_transposes_is_exact():
    """Pooling is per sample and per channel, so a pool run on the transposed batch keeps the examples apart:
    exact, not refused."""
    torch.manual_seed(0)
    model = _SquareCNN(lambda h: F.max_pool2d(h.transpose(0, 1), 1).transpose(0, 1)).double()
    x, y = torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})


@pytest.mark.parametrize("name", list(SQUARE_MIXES))
def test_a_shape_keeping_mix_across_square_channels_is_still_refused(name):
    """The same model with the batch and the channels swapped somewhere: every shape is as before, so only
    the transpose's own node, the probe or the spot check can tell; fast and observe refuse with a code."""
    torch.manual_seed(0)
    model = _SquareCNN(SQUARE_MIXES[name]).double()
    x, y = torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    _assert_fast_and_observe_refuse_mixing(model, F.cross_entropy, x, y)


def _assert_fast_and_observe_refuse_mixing(model, loss_fn, x, y):
    with pytest.raises(persample.NotExact) as err:
        persample.grad_stats(model, loss_fn, x, y, engine="fast")
    assert err.value.code in ("BATCH_MIXED", "EXAMPLE_DIFFERS_ALONE")
    with pytest.raises(persample.NotExact) as err:
        with persample.Tracker(model, loss_fn).observe(y):
            loss_fn(model(x), y).backward()
    assert err.value.code in ("BATCH_MIXED", "EXAMPLE_DIFFERS_ALONE")


class _HeadsAsExamples(nn.Module):
    """Self-attention written as Hugging Face writes it, with as many heads as examples (4 at B = 4):
    ``[B, T, H, d]`` transposed to ``[B, H, T, d]``, fused attention, and back, so every attention tensor
    has a dim of the batch's size off dim 0 (the shapes cannot tell heads from examples). ``mix`` changes
    the keys before the attention."""

    heads, width = 4, 3

    def __init__(self, mix=None):
        super().__init__()
        self.qkv = nn.Linear(5, 3 * self.heads * self.width)
        self.out = nn.Linear(self.heads * self.width, 2)
        self.mix = mix

    def forward(self, x):
        batch, length, _ = x.shape
        split = self.qkv(x).view(batch, length, 3, self.heads, self.width)
        q, k, v = (split[:, :, i].transpose(1, 2) for i in range(3))
        if self.mix is not None:
            k = self.mix(k)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(h.transpose(1, 2).reshape(batch, length, -1)).mean(1)


#: Key mixes that keep every shape at B = H: only the probe of the rows (or a named check) can see them.
KEY_MIXES = {
    "heads-and-examples-swapped": lambda k: k.transpose(0, 1),
    "permuted-dim-0-to-1": lambda k: k.permute(1, 0, 2, 3),
    "keys-of-the-batch-mean": lambda k: k + k.mean(0, keepdim=True),
}


def test_attention_with_as_many_heads_as_examples_is_exact_without_a_probe(monkeypatch):
    """Transposes and permutes that leave dim 0 in place, and fused attention on activations, compute each
    example's rows alone whatever H is: no probe of the rows (on the larger GPT-2 of the benchmarks, 8 heads
    at B = 8, a whole extra backward on every call), and the statistics are the float64 oracle's."""
    probes = _counted_probes(monkeypatch)
    torch.manual_seed(0)
    model = _HeadsAsExamples().double()
    x, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    grads, _ = oracle_grads(model, F.mse_loss, x, y)
    stats = persample.grad_stats(model, F.mse_loss, x, y, engine="fast")
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()})
    assert not probes


@pytest.mark.parametrize("name", list(KEY_MIXES))
def test_keys_from_other_examples_are_still_refused_with_as_many_heads_as_examples(name):
    """The same attention with every query attending to other examples' keys (heads and examples swapped in
    the keys alone, or the batch's mean added): refused by fast and observe."""
    torch.manual_seed(0)
    model = _HeadsAsExamples(KEY_MIXES[name]).double()
    x, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    _assert_fast_and_observe_refuse_mixing(model, F.mse_loss, x, y)
