"""nn.Embedding subclasses with their own forward (Hugging Face's learned positional and scaled word
embeddings): the fast engine re-runs the forward to find the ids and the constant factor, and forms
W_i = c · Σ_t e_{id_it} b_itᵀ; against the float64 oracle loop, or refused with a code."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import NotExact
from persample.engines.fast.rules import find_rule

from zoo import assert_dicts_close, oracle_grads

B, T, V, D = 4, 6, 11, 5


class Positions(nn.Embedding):
    """BART's encoder: arange(T) + offset, expanded to the batch."""

    def forward(self, ids):
        bsz, length = ids.shape[:2]
        return super().forward(torch.arange(length).expand(bsz, -1) + 2)


class PositionsOfBatchOne(nn.Embedding):
    """BART's decoder: positions of batch 1, broadcast by the addition."""

    def forward(self, ids, offset=0):
        return super().forward(torch.arange(offset, offset + ids.shape[1]).unsqueeze(0) + 2)


class Scaled(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2.5


class Offset(nn.Embedding):
    """Ids made from the input element by element (OPT-style offset, clamped)."""

    def forward(self, ids):
        return super().forward((ids + 1).clamp(max=self.num_embeddings - 1))


class Flipped(nn.Embedding):
    """Ids made from the input by an op that reorders the rows: dim 0 is no longer the batch."""

    def forward(self, ids):
        return super().forward(ids.flip(0))


class ScaledByBuffer(nn.Embedding):
    """Gemma: a 0-d buffer, cast to the weight's dtype."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(1.7), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class Squashed(nn.Embedding):
    """Another op on the lookup: not covered."""

    def forward(self, ids):
        return torch.tanh(super().forward(ids))


class Unbatched(nn.Embedding):
    """Positions [T] with no batch dim: exact (expanded over the batch), but ambiguous when T = B."""

    def forward(self, ids):
        return super().forward(torch.arange(ids.shape[1]))


class FromShape(nn.Embedding):
    """Blenderbot: positions from the input's shape alone (a ``torch.Size`` and an int, no tensor), no
    batch dim."""

    def forward(self, input_shape, past_length=0):
        return super().forward(torch.arange(past_length, past_length + input_shape[1]))


class FromShapeModel(nn.Module):
    def __init__(self, length):
        super().__init__()
        self.words = nn.Embedding(V, D, padding_idx=0)
        self.positions = FromShape(length, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.words(ids) + self.positions(ids.shape))).mean(1)


class Model(nn.Module):
    def __init__(self, positions, words=None):
        super().__init__()
        self.words = words or nn.Embedding(V, D, padding_idx=0)
        self.positions = positions
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.words(ids) + self.positions(ids))).mean(1)


def _batch(length=T):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, length), generator=g)
    ids[1, -2:] = 0  # padding
    return ids, torch.randn(B, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Model(Positions(T + 2, D)),
        lambda: Model(PositionsOfBatchOne(T + 2, D)),
        lambda: Model(Positions(T + 2, D), words=Scaled(V, D, padding_idx=0)),
        lambda: Model(Unbatched(T, D), words=Offset(V, D)),
        lambda: Model(Positions(T + 2, D), words=ScaledByBuffer(V, D, padding_idx=0)),
        lambda: FromShapeModel(T),
    ],
    ids=[
        "positions",
        "positions-batch-1",
        "scaled-words",
        "positions-without-batch-dim+offset-words",
        "buffer-scaled-words",
        "positions-from-the-shape-alone",
    ],
)
def test_subclass_rule_is_exact(build):
    torch.manual_seed(0)
    model = build().double()
    ids, y = _batch()
    assert find_rule(model.positions).name == "embedding_recomputed"
    want, _ = oracle_grads(model, F.mse_loss, ids, y)
    assert_dicts_close(persample.per_sample_grads(model, F.mse_loss, ids, y, engine="fast"), want)
    stats = persample.grad_stats(model, F.mse_loss, ids, y, engine="fast")
    for name, rows in want.items():
        torch.testing.assert_close(stats.var[name], rows.var(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.param_sq_norms[name], rows.flatten(1).square().sum(1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "build, length, code",
    [
        (lambda: Model(Positions(T + 2, D), words=Squashed(V, D)), T, "RULE_NOT_APPLICABLE"),
        # a position table of length B: the row probe (BATCH_MIXED) or the rule (BATCH_DIM_AMBIGUOUS) refuses
        (lambda: Model(Unbatched(B, D)), B, ("BATCH_MIXED", "BATCH_DIM_AMBIGUOUS")),
        (lambda: Model(Positions(T + 2, D), words=Flipped(V, D)), T, "BATCH_MIXED"),
        # from the shape alone, T = B: dim 0 could be the batch's, so not expanded; the row probe refuses
        (lambda: FromShapeModel(B), B, ("BATCH_MIXED", "BATCH_DIM_AMBIGUOUS")),
    ],
    ids=["other-op", "positions-without-batch-dim-of-length-B", "rows-reordered", "from-the-shape-of-length-B"],
)
def test_what_the_rule_does_not_cover_is_refused_and_auto_stays_exact(build, length, code):
    torch.manual_seed(0)
    model = build().double()
    ids, y = _batch(length)
    with pytest.raises(NotExact) as err:
        persample.per_sample_grads(model, F.mse_loss, ids, y, engine="fast")
    assert err.value.code in ((code,) if isinstance(code, str) else code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        assert_dicts_close(
            persample.per_sample_grads(model, F.mse_loss, ids, y), oracle_grads(model, F.mse_loss, ids, y)[0]
        )
