"""Qwen3.5 builds its position ids as ``arange(T).view(1, 1, -1).expand(4, B, -1)`` (text, temporal, height,
width) and splits them ``ids[0]``, ``ids[1:]``. At B = 4 the slice ``[1:]`` takes part of dim 0 of a raw
tensor whose dim 0 has the batch's size, which the fast engine's watcher refused as rows of other examples
(``BATCH_MIXED``), and ``auto`` took the per-example loop (17 runs of the architecture sweep). A tensor
expanded over dim 0 (stride 0) has one row, repeated: no row of it is an example's, and selecting rows of it
gives no example another's values. A slice of a real batch of positions stays refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample

from oracle_stats import assert_stats_match_rows, keyword_oracle_rows


class FourWayPositions(nn.Module):
    """Qwen3.5's pattern: positions expanded to ``[4, B, T]``; row 0 embeds the text positions, rows 1: turn
    the hidden state by their angles, one section each (a rotary embedding without parameters). ``batched``:
    the positions are a cumsum of each example's own mask, repeated (a copy, different per example)."""

    def __init__(self, batched: bool = False):
        super().__init__()
        self.word = nn.Embedding(10, 3)
        self.text = nn.Embedding(8, 3)
        self.head = nn.Linear(3, 2)
        self.register_buffer("freq", torch.tensor([0.3, 0.7, 1.1]))
        self.batched = batched

    def forward(self, ids):
        b, t = ids.shape
        if self.batched:
            positions = (ids > 0).long().cumsum(-1).clamp(max=7)[None].repeat(4, 1, 1)
        else:
            positions = torch.arange(t).view(1, 1, -1).expand(4, b, -1)
        text, grid = positions[0], positions[1:]
        h = self.word(ids) + self.text(text)
        h = h * torch.cos(sum(grid[k].to(h.dtype)[..., None] * self.freq[k] for k in range(3)))
        return self.head(torch.tanh(h)).mean(1)


def _ids(batch: int) -> torch.Tensor:
    return torch.randint(0, 10, (batch, 5), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("batch", [3, 4])
def test_rows_of_positions_expanded_over_the_batch_take_the_fast_engine(batch):
    torch.manual_seed(0)
    model = FourWayPositions().double()
    ids = _ids(batch)
    y = torch.randn(batch, 2, dtype=torch.float64)
    rows, losses = keyword_oracle_rows(model, lambda out, i: F.mse_loss(out, y[i : i + 1]), {"ids": ids}, batch)
    assert_stats_match_rows(persample.grad_stats(model, F.mse_loss, ids, y, engine="fast"), rows, losses)


def test_a_slice_of_a_batch_of_positions_stays_refused():
    """``[4, B, T]`` built by ``repeat`` (a copy, not an expansion) at B = 4: ``[1:]`` takes rows of a tensor
    whose dim 0 may be the batch's; the watcher cannot tell, so the fast engine still refuses."""
    torch.manual_seed(0)
    model = FourWayPositions(batched=True).double()
    ids = _ids(4)
    y = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(persample.NotExact) as raised:
        persample.grad_stats(model, F.mse_loss, ids, y, engine="fast")
    assert raised.value.code == "BATCH_MIXED"


def test_a_qwen3_5_text_model_takes_the_fast_engine(monkeypatch):
    """Full attention only: the gated delta net computes in float32, which 1e-9 cannot hold (the sweep covers it
    at the model's own batch-vs-example discrepancy)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3_5TextConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        layer_types=["full_attention"],
        use_cache=False,
    )
    # its RMSNorm computes in float32 (x.float()), which 1e-9 cannot hold: the same norm in float64
    norm = transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5RMSNorm
    monkeypatch.setattr(norm, "forward", lambda self, x: self._norm(x) * (1.0 + self.weight))
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(config).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (4, 6), generator=g)
    labels = torch.randint(0, 40, (4, 6), generator=g)

    def token_ce(out, labels):
        return F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())

    rows, losses = keyword_oracle_rows(model, lambda out, i: token_ce(out, labels[i : i + 1]), {"input_ids": ids}, 4)
    stats = persample.grad_stats(model, token_ce, {"input_ids": ids}, labels, engine="fast")
    assert_stats_match_rows(stats, rows, losses)
    assert persample.explain(model, token_ce, {"input_ids": ids}, labels).entry_points["grad_stats"] == "fast"
