"""Refusals name the operation that actually happened.

On BERT and RoBERTa (T == B or a token-type buffer expanded to the batch), the suspect-output watcher
read ``F.dropout(x, p, training=False)``'s ``False`` as dim 0 (a bool is an int) and ``reshape``'s sizes as
dims, and refused with "dropout moves its dim 0". Ops are now read by where their dim argument is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.engines.fast.watchers import _moves_dim_zero_op

from zoo import assert_dicts_close, oracle_grads


def test_flags_and_sizes_are_not_dims():
    x = torch.zeros(4, 4, 4, 4)
    assert not _moves_dim_zero_op("dropout", (x, 0.1, False), {})
    assert not _moves_dim_zero_op("dropout", (x,), {"p": 0.0, "training": False})
    assert not _moves_dim_zero_op("reshape", (x, 4, 4, 16), {})
    assert not _moves_dim_zero_op("view", (x, (4, 64)), {})
    assert not _moves_dim_zero_op("layer_norm", (x, (4,)), {})
    assert not _moves_dim_zero_op("narrow", (x, 1, 0, 2), {})  # dim 1, start 0
    assert _moves_dim_zero_op("transpose", (x, 0, 1), {})
    assert _moves_dim_zero_op("narrow", (x, 0, 1, 2), {})
    assert _moves_dim_zero_op("sum", (x,), {"dim": 0})
    assert not _moves_dim_zero_op("sum", (x, -1), {})
    assert _moves_dim_zero_op("flip", (x, (0,)), {})


class PositionsThenTranspose(nn.Module):
    """An Embedding of arange(T) with T == B (a suspect: dim 0 may be a position), then ops that keep
    it as it is (dropout in eval, a reshape), then one that moves its dim 0."""

    def __init__(self, move: bool):
        super().__init__()
        self.pos, self.lin, self.move = nn.Embedding(8, 4), nn.Linear(4, 3), move

    def forward(self, x):  # x: [B, 4]
        p = F.dropout(self.pos(torch.arange(x.shape[0])), 0.1, False)
        p = p.reshape(x.shape[0], 4)
        if self.move:
            p = p.transpose(0, 1).reshape(x.shape[0], 4)
        return self.lin(x + p)


def test_the_refusal_names_the_transpose_not_dropout_or_reshape():
    torch.manual_seed(0)
    model = PositionsThenTranspose(move=True).double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(persample.NotExact, match="transpose moves its dim 0") as info:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert "dropout" not in str(info.value) and "reshape" not in str(info.value)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("B,T", [(4, 4), (4, 6), (3, 5)])
def test_bert_and_roberta_are_exact_on_the_fast_engine(family, B, T):
    from real_models import hf_model

    torch.manual_seed(0)
    model = hf_model(family, "ForSequenceClassification")
    inputs, y = {"input_ids": torch.randint(3, 40, (B, T))}, torch.randint(0, 3, (B,))

    def loss_fn(out, t):
        return F.cross_entropy(out.logits, t)

    grads, _ = oracle_grads(model, loss_fn, inputs, y)
    stats = persample.grad_stats(model, loss_fn, inputs, y, engine="fast")
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()})
