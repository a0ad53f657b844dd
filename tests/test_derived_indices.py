"""Embedding indices derived from the inputs without gradient (issue 22): RoBERTa-style position ids, a cumsum of
the padding mask along the sequence, are per example and take the fast engine; the same cumsum along the
batch dim mixes the examples (example i's positions depend on the examples before it) and must be refused,
while engine="auto" still returns the float64 loop's answer.

The oracle is the loop over examples, each alone (tests/zoo.py): for the batch-dim cumsum, example i alone
gets the positions of a batch of one, which is what its per-example gradient means."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import persample
from persample.errors import PersampleError

from zoo import assert_dicts_close, oracle_grads

PAD = 1


class PositionsFromIds(nn.Module):
    """Token + position embeddings, positions = cumsum of (ids != PAD) along ``dim`` (RoBERTa's is dim 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.tokens = nn.Embedding(12, 4, padding_idx=PAD)
        self.positions = nn.Embedding(16, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        mask = ids.ne(PAD).long()
        positions = (torch.cumsum(mask, dim=self.dim) * mask + PAD).clamp_max(15)
        return self.head(torch.tanh(self.tokens(ids) + self.positions(positions))).mean(1)


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(2, 12, (4, 5))
    ids[1, 3:] = PAD
    ids[2, 2:] = PAD
    return ids, torch.randint(0, 3, (4,))


def _model(dim):
    torch.manual_seed(0)
    return PositionsFromIds(dim).double()


def test_positions_from_a_cumsum_along_the_sequence_take_the_fast_engine():
    model, (ids, y) = _model(1), _batch()
    stats = persample.grad_stats(model, nn.functional.cross_entropy, ids, y, engine="fast")
    grads, _ = oracle_grads(model, nn.functional.cross_entropy, ids, y)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()})


def test_positions_from_a_cumsum_along_the_batch_are_refused():
    """Used to return the batch's numbers as per-example gradients (the watcher followed floating tensors
    only): off from the loop by up to 45 % of the largest element, silently."""
    model, (ids, y) = _model(0), _batch()
    with pytest.raises(PersampleError) as info:
        persample.grad_stats(model, nn.functional.cross_entropy, ids, y, engine="fast")
    assert info.value.code == "BATCH_MIXED" and "cumsum along dim 0" in str(info.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = persample.grad_stats(model, nn.functional.cross_entropy, ids, y)
    grads, _ = oracle_grads(model, nn.functional.cross_entropy, ids, y)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
