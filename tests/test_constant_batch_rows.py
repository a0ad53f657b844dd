"""A constant the model makes with the batch's shape (RoFormer's and Longformer's default ``token_type_ids``,
``torch.zeros(input_shape)``) feeds an embedding: its dim 0 has the batch's size but it is neither an input nor an
activation, so the fast engine watches the embedding's output as a *suspect* (dim 0 may be a position). Added
elementwise to the word embeddings, a tensor batched on dim 0 of the same shape, its dim 0 is the batch's there;
the sum is an activation like any other. The fast engine followed the sum through the whole model as a suspect
and refused ``BATCH_DIM_AMBIGUOUS`` at the first transpose of dim 0 (Longformer's sequence-first attention) or
``stack(...).reshape_as`` (RoFormer's rotary embedding), and ``auto`` took the per-example loop (19 runs of the
architecture sweep). Constants whose dim 0 is a position stay refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from oracle_stats import assert_stats_match_rows, keyword_oracle_rows

transformers = pytest.importorskip("transformers")


def _token_ce(out, labels):
    return F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _oracle(model, loss_fn, inputs, targets):
    return keyword_oracle_rows(model, lambda out, i: loss_fn(out, targets[i : i + 1]), inputs, len(targets))


def _roformer():
    config = transformers.RoFormerConfig(
        vocab_size=40,
        embedding_size=8,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.RoFormerForMaskedLM(config).double().eval()


def _longformer():
    config = transformers.LongformerConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
        attention_window=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    return transformers.LongformerForTokenClassification(config).double().eval()


@pytest.mark.parametrize("arch", ["roformer", "longformer"])
@pytest.mark.parametrize("batch", [3, 4])
def test_a_default_token_type_constant_takes_the_fast_engine(arch, batch):
    model = _roformer() if arch == "roformer" else _longformer()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (batch, 8), generator=g)
    mask = torch.ones(batch, 8, dtype=torch.long)
    if arch == "roformer":  # a padded Longformer's own gradient is not finite (the sweep skips it too)
        mask[1, 5:] = 0
    labels = torch.randint(0, 2 if arch == "longformer" else 40, (batch, 8), generator=g).masked_fill(mask == 0, -100)
    inputs = {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}
    rows, losses = _oracle(model, _token_ce, inputs, labels)
    assert_stats_match_rows(persample.grad_stats(model, _token_ce, inputs, labels, engine="fast"), rows, losses)
    assert persample.explain(model, _token_ce, inputs, labels).entry_points["grad_stats"] == "fast"


class SequenceFirst(nn.Module):
    """Longformer's pattern: a constant ``zeros(B, T)`` of token types embedded and added to the word embeddings,
    then a sequence-first block (``h.transpose(0, 1)``). ``positions``: a constant whose dim 0 is a position
    (``arange(T)`` with T == B) embedded and broadcast over the batch, which must stay refused."""

    def __init__(self, positions: bool = False):
        super().__init__()
        self.word = nn.Embedding(10, 3)
        self.types = nn.Embedding(4, 3)
        self.mix = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.positions = positions

    def forward(self, ids):
        b, t = ids.shape
        types = torch.arange(t) if self.positions else torch.zeros(b, t, dtype=torch.long)
        h = self.word(ids) + self.types(types)
        h = self.mix(h.transpose(0, 1)).transpose(0, 1)  # sequence-first, as Longformer's self-attention
        return self.head(torch.tanh(h)).mean(1)


def _plain_oracle(model, x, y):
    rows: dict[str, list] = {n: [] for n, _ in model.named_parameters()}
    losses = []
    for i in range(len(x)):
        loss = F.mse_loss(model(x[i : i + 1]), y[i : i + 1])
        for (n, _), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            rows[n].append(g)
        losses.append(loss.detach())
    return {n: torch.stack(r) for n, r in rows.items()}, torch.stack(losses)


@pytest.mark.parametrize("batch", [3, 4])
def test_a_constant_of_the_batch_shape_added_to_an_activation_is_batched(batch):
    torch.manual_seed(0)
    model = SequenceFirst().double()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 10, (batch, 5), generator=g)
    y = torch.randn(batch, 2, generator=g, dtype=torch.float64)
    rows, losses = _plain_oracle(model, ids, y)
    assert_stats_match_rows(persample.grad_stats(model, F.mse_loss, ids, y, engine="fast"), rows, losses)


def test_a_constant_of_positions_broadcast_over_the_batch_stays_refused():
    """T == B: ``arange(T)`` looks batched on dim 0, but the embedding's rows are positions, shared by every
    example. The fast engine must refuse (a rule reading dim 0 as the batch would give example t position t's
    rows), and auto must still give the oracle's answer."""
    torch.manual_seed(0)
    model = SequenceFirst(positions=True).double()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 10, (4, 4), generator=g)
    y = torch.randn(4, 2, generator=g, dtype=torch.float64)
    with pytest.raises(persample.NotExact) as raised:
        persample.grad_stats(model, F.mse_loss, ids, y, engine="fast")
    assert raised.value.code == "BATCH_DIM_AMBIGUOUS"
    rows, losses = _plain_oracle(model, ids, y)
    assert_stats_match_rows(persample.grad_stats(model, F.mse_loss, ids, y, engine="auto"), rows, losses)
    assert persample.explain(model, F.mse_loss, ids, y).entry_points["grad_stats"] != "fast"


class FirstTokenPlusPositions(nn.Module):
    """T == B: a table of positions (``arange(T)``, dim 0 of the batch's size) added to each example's first
    token, a tensor batched on dim 0 of the same shape. Example b gets position b's row in the batch but every
    row alone: not per example, so the fast engine, which now reads the sum as batched, must still refuse."""

    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(10, 3)
        self.pos = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        return self.head(self.word(ids)[:, 0] + self.pos(torch.arange(ids.shape[1])))


def test_positions_added_to_a_batched_tensor_of_their_shape_stay_refused():
    torch.manual_seed(0)
    model = FirstTokenPlusPositions().double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 10, (4, 4), generator=g)
    y = torch.randn(4, 2, generator=g, dtype=torch.float64)
    with pytest.raises(persample.NotExact) as raised:
        persample.grad_stats(model, F.mse_loss, ids, y, engine="fast")
    assert raised.value.code == "EXAMPLE_DIFFERS_ALONE"
    assert persample.explain(model, F.mse_loss, ids, y).entry_points["grad_stats"] != "fast"
