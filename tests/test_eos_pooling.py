"""Encoder-decoder classifiers (BART, MBart, PLBart, MVP; T5, mT5, UMT5) pool each example at its ``<eos>``:
``h[input_ids.eq(eos), :].view(B, -1, d)[:, -1, :]``. With one ``<eos>`` per example, the boolean mask has one
true entry in each of its B rows, and ``h[mask]``'s row i is example i's: rows in place, as ``h[arange(B), j]``.
The graph audit refused every boolean index of dim 0 but an all-true ``[B]`` one (``BATCH_MIXED``), and
``auto`` took the per-example loop (18 runs of the architecture sweep). A mask that moves a row to another
example's place stays refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from oracle_stats import assert_stats_match_rows, keyword_oracle_rows
from real_models import hf_model

pytest.importorskip("transformers")


def _class_ce(out, labels):
    return F.cross_entropy(out.logits, labels)


def _eos_batch(batch: int, eos: int, pad: int, lengths: list[int]):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (batch, 8), generator=g)
    mask = torch.zeros(batch, 8, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, pad)
    ids[range(batch), [n - 1 for n in lengths]] = eos
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": mask}, labels


# T5 at B = 4 only: its RMSNorm computes in float32, where the batch's cotangent 1/B rounds unless B is a power
# of 2, so at B = 3 the model's own batch gradient (plain autograd too) differs from the examples' by 1e-8.
@pytest.mark.parametrize(("family", "batch"), [("bart", 3), ("bart", 4), ("t5", 4)])
def test_a_classifier_that_pools_at_its_eos_takes_the_fast_engine(family, batch):
    torch.manual_seed(0)
    model = hf_model(family, "ForSequenceClassification").eval()
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    inputs, labels = _eos_batch(batch, eos, pad, [8, 6, 5, 3][:batch])
    rows, losses = keyword_oracle_rows(model, lambda out, i: _class_ce(out, labels[i : i + 1]), inputs, batch)
    assert_stats_match_rows(persample.grad_stats(model, _class_ce, inputs, labels, engine="fast"), rows, losses)
    assert persample.explain(model, _class_ce, inputs, labels).entry_points["grad_stats"] == "fast"


EOS = 9


class EosPool(nn.Module):
    """``h[ids.eq(EOS)]`` (the rows at the ``<eos>`` tokens, row-major), then a linear head on those rows."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        self.mix = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids)))[ids.eq(EOS)])


def _ids(eos_at: list[list[int]]) -> torch.Tensor:
    ids = torch.randint(0, EOS, (len(eos_at), 5), generator=torch.Generator().manual_seed(2))
    for i, positions in enumerate(eos_at):
        ids[i, positions] = EOS
    return ids


def test_a_mask_that_moves_a_row_to_another_example_stays_refused():
    """Example 0 has two ``<eos>`` and example 1 none: ``h[mask]`` still has B rows, but its row 1 is
    example 0's. The fast engine must refuse."""
    torch.manual_seed(0)
    model = EosPool().double()
    ids = _ids([[1, 3], [], [0], [4]])
    y = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(persample.NotExact) as raised:
        persample.grad_stats(model, F.mse_loss, ids, y, engine="fast")
    assert raised.value.code == "BATCH_MIXED"


def test_a_mask_with_one_entry_per_example_takes_the_fast_engine():
    torch.manual_seed(0)
    model = EosPool().double()
    ids = _ids([[1], [3], [0], [4]])
    y = torch.randn(4, 2, dtype=torch.float64)
    rows, losses = keyword_oracle_rows(model, lambda out, i: F.mse_loss(out, y[i : i + 1]), {"ids": ids}, 4)
    assert_stats_match_rows(persample.grad_stats(model, F.mse_loss, ids, y, engine="fast"), rows, losses)
