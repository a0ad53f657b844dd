"""nn.EmbeddingBag with one bag per example (2-D ids, or 1-D ids with offsets): the fast engine's rows
W_i = Σ_{j ∈ bag i} w_j e_{id_j} b_iᵀ against the float64 oracle loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.engines.fast.rules import find_rule

from zoo import assert_dicts_close, oracle_grads

V, D, B = 13, 4, 4
LENGTHS = [3, 1, 0, 4]  # entries that are not padding (example 2 has none)


class Bags(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, **options)
        self.head = nn.Linear(D, 2)

    def forward(self, ids, offsets=None, weights=None):
        return self.head(torch.tanh(self.bag(ids, offsets, per_sample_weights=weights)))


class FlatBags(nn.Module):
    """Batched ids [B, L] flattened into one 1-D ids tensor with offsets (bags of L entries; shorter bags
    padded with ``padding_idx``), as a recommender's forward does."""

    def __init__(self, last_offset=False, **options):
        super().__init__()
        self.model, self.last_offset = Bags(include_last_offset=last_offset, **options), last_offset

    def forward(self, ids, weights=None):
        size, length = ids.shape
        offsets = torch.arange(size + 1 if self.last_offset else size) * length
        return self.model(ids.reshape(-1), offsets, None if weights is None else weights.reshape(-1))


def _padded_batch(weighted):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, V, (B, max(LENGTHS)), generator=g)
    for i, n in enumerate(LENGTHS):
        ids[i, n:] = 0  # padding entries when padding_idx=0 (example 2's bag is all padding)
    inputs = {"ids": ids}
    if weighted:
        inputs["weights"] = torch.rand(ids.shape, generator=g, dtype=torch.float64)
    return inputs, torch.randn(B, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    "options, weighted",
    [
        ({"mode": "sum"}, False),
        ({"mode": "mean"}, False),
        ({"mode": "sum"}, True),
        ({"mode": "mean", "padding_idx": 0}, False),
        ({"mode": "sum", "padding_idx": 0}, True),
        ({"mode": "sum", "include_last_offset": True}, False),
    ],
    ids=["sum", "mean", "weighted", "mean-padding", "weighted-padding", "last-offset"],
)
def test_offsets_bags_are_exact(options, weighted):
    torch.manual_seed(0)
    last = options.pop("include_last_offset", False)
    model = FlatBags(last, **options).double()
    assert find_rule(model.model.bag).name == "embedding_bag"
    inputs, y = _padded_batch(weighted)
    want, _ = oracle_grads(model, F.mse_loss, inputs, y)
    assert_dicts_close(persample.per_sample_grads(model, F.mse_loss, inputs, y, engine="fast"), want)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_two_dimensional_bags_are_exact(mode):
    torch.manual_seed(0)
    model = Bags(mode=mode, padding_idx=0).double()
    g = torch.Generator().manual_seed(2)
    ids, y = torch.randint(0, V, (B, 5), generator=g), torch.randn(B, 2, generator=g, dtype=torch.float64)
    ids[0, :2] = 0
    want, _ = oracle_grads(model, F.mse_loss, ids, y)
    assert_dicts_close(persample.per_sample_grads(model, F.mse_loss, ids, y, engine="fast"), want)
    stats = persample.grad_stats(model, F.mse_loss, ids, y, engine="fast")
    torch.testing.assert_close(stats.var["bag.weight"], want["bag.weight"].var(0), rtol=1e-9, atol=1e-12)


def test_max_mode_takes_the_fallback():
    assert find_rule(nn.EmbeddingBag(V, D, mode="max")) is None
