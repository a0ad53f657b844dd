"""observe around a model with ``nn.Embedding(sparse=True)`` (redteam, docs/redteam.md): its p.grad is a sparse
tensor, on which observe's check of Σ_i g_i against the p.grad increment crashed (NotImplementedError for
``linalg_vector_norm`` on SparseCPU). The increment is now read densified; the statistics are the oracle's."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import persample

from oracle_stats import oracle_stats
from zoo import assert_dicts_close


class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(10, 4, sparse=True)
        self.out = nn.Linear(4, 3)

    def forward(self, t):
        return self.out(torch.tanh(self.e(t)).mean(1))


def test_observe_reads_a_sparse_embedding_gradient():
    model = _Bag().double()
    g = torch.Generator().manual_seed(1)
    tokens, y = torch.randint(0, 10, (5, 4), generator=g), torch.randint(0, 3, (5,), generator=g)
    dense = copy.deepcopy(model)
    dense.e.sparse = False  # the same function, with dense gradients for the oracle
    oracle = oracle_stats(dense, F.cross_entropy, tokens, y)
    model.zero_grad(set_to_none=True)
    with persample.Tracker(model, F.cross_entropy).observe(y) as observed:
        F.cross_entropy(model(tokens), y).backward()
    assert model.e.weight.grad.is_sparse  # the user's backward, as it was
    assert_dicts_close(observed.stats.mean, oracle["mean"])
    assert_dicts_close(observed.stats.var, oracle["var"])
