"""The fast engine's closed form for ``nn.MultiheadAttention`` against the float64 oracle loop.

in_proj and out_proj are Linear maps around scaled dot-product attention, which never mixes
examples: their per-example gradients come from the recomputed attention's ∂q, ∂k, ∂v (the rule
checks the recomputed output against the module's). Self- and cross-attention, batch_first both
ways, boolean and float masks (``key_padding_mask``, 2-D and 3-D ``attn_mask``), attention weights
that reach the loss; settings the rule does not cover take the exact fallback.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import NotExact
from persample.engines.fast.rules import find_rule

from zoo import assert_dicts_close, oracle_grads

E, H, T, S, B = 8, 2, 5, 3, 4


class Attention(nn.Module):
    """Linear → MultiheadAttention (self, or cross over a second input) → Linear on the mean position."""

    def __init__(self, kind="self", batch_first=True, need_weights=False, weights_in_loss=False, mask=None, **mha):
        super().__init__()
        self.kind, self.batch_first, self.mask = kind, batch_first, mask
        self.need_weights, self.weights_in_loss = need_weights, weights_in_loss
        self.embed = nn.Linear(4, E)
        self.memory = nn.Linear(4, E)
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **mha)
        self.head = nn.Linear(E, 2)

    def forward(self, x, memory=None, padding=None, per_head=None):
        q = self.embed(x)
        if self.kind == "self":
            k = v = q
        elif self.kind == "cross":
            k = v = self.memory(memory)
        else:  # key and value from different tensors
            k, v = self.memory(memory), torch.tanh(self.memory(memory))
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            if self.kind == "self":
                k = v = q
            elif self.kind == "cross":
                v = k
        mask = self.mask
        if per_head is not None:  # [B, H, T, S] → the [B·H, T, S] attn_mask
            mask = per_head.reshape(-1, *per_head.shape[2:])
        out, weights = self.mha(
            q, k, v, key_padding_mask=padding, attn_mask=mask, need_weights=self.need_weights, average_attn_weights=True
        )
        if not self.batch_first:
            out = out.transpose(0, 1)
        y = self.head(out.mean(1))
        if self.weights_in_loss:
            y = y + weights.square().sum((1, 2)).unsqueeze(1)
        return y


def _inputs(kind, padding=None, per_head=None, float_masks=False):
    g = torch.Generator().manual_seed(1)
    source = T if kind == "self" else S
    inputs = {"x": torch.randn(B, T, 4, generator=g, dtype=torch.float64)}
    if kind != "self":
        inputs["memory"] = torch.randn(B, S, 4, generator=g, dtype=torch.float64)
    if padding:
        keep = torch.ones(B, source, dtype=torch.bool)
        keep[1, -1] = keep[3, -2:] = False  # example 1 ignores its last key, example 3 its last two
        inputs["padding"] = (
            ~keep if not float_masks else torch.zeros(B, source, dtype=torch.float64).masked_fill(~keep, -1e9)
        )
    if per_head:
        m = torch.rand(B, H, T, source, generator=g) < 0.3
        m[..., 0] = False  # every query attends to at least one key
        inputs["per_head"] = m if not float_masks else torch.randn(B, H, T, source, generator=g, dtype=torch.float64)
    return inputs, torch.randn(B, 2, generator=g, dtype=torch.float64)


def _check(model, inputs, targets, *, rule=True):
    torch.manual_seed(0)
    model = model.double()
    assert (find_rule(model.mha) is not None) == rule
    want, _ = oracle_grads(model, F.mse_loss, inputs, targets)
    got = persample.per_sample_grads(model, F.mse_loss, inputs, targets, engine="fast")
    assert_dicts_close(got, want)
    stats = persample.grad_stats(model, F.mse_loss, inputs, targets, engine="fast")
    for name, rows in want.items():
        torch.testing.assert_close(stats.mean[name], rows.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.var[name], rows.var(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.param_sq_norms[name], rows.flatten(1).square().sum(1), rtol=1e-9, atol=1e-12)


def _causal(source):
    return torch.triu(torch.ones(T, source, dtype=torch.bool), diagonal=1)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", ["self", "cross", "kv_apart"])
def test_rule_is_exact(kind, batch_first):
    torch.manual_seed(0)
    inputs, targets = _inputs(kind)
    _check(Attention(kind, batch_first), inputs, targets)


@pytest.mark.parametrize("float_masks", [False, True], ids=["bool", "float"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("masks", ["padding", "causal", "padding+causal", "per_head"])
def test_rule_is_exact_with_masks(masks, batch_first, float_masks):
    torch.manual_seed(0)
    inputs, targets = _inputs("self", padding="padding" in masks, per_head=masks == "per_head", float_masks=float_masks)
    mask = _causal(T) if "causal" in masks else None
    if mask is not None and float_masks:
        mask = torch.zeros(T, T, dtype=torch.float64).masked_fill(mask, float("-inf"))
    _check(Attention("self", batch_first, mask=mask), inputs, targets)


def test_rule_is_exact_for_cross_attention_with_padded_memory():
    torch.manual_seed(0)
    inputs, targets = _inputs("cross", padding=True)
    mask = torch.rand(T, S) < 0.3
    mask[:, 0] = False  # every query keeps its first key (example 3 pads the last two)
    _check(Attention("cross", mask=mask), inputs, targets)


@pytest.mark.parametrize("average", [True, False])
def test_attention_weights_that_reach_the_loss(average):
    torch.manual_seed(0)
    inputs, targets = _inputs("self", padding=True)
    model = Attention("self", need_weights=True, weights_in_loss=True)
    if not average:
        model.forward = _per_head_weights(model)
    _check(model, inputs, targets)


def _per_head_weights(model):
    def forward(x, padding=None):
        q = model.embed(x)
        out, weights = model.mha(q, q, q, key_padding_mask=padding, average_attn_weights=False)
        return model.head(out.mean(1)) + weights[:, 1].square().sum((1, 2)).unsqueeze(1)

    return forward


def test_without_biases_and_with_frozen_in_projection():
    torch.manual_seed(0)
    inputs, targets = _inputs("self", padding=True)
    model = Attention("self", bias=False)
    _check(model, inputs, targets)
    model.mha.in_proj_weight.requires_grad_(False)
    _check(model, inputs, targets)


@pytest.mark.parametrize(
    "options",
    [{"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 6, "vdim": 5}],
    ids=["bias_kv", "zero_attn", "kdim"],
)
def test_settings_outside_the_rule_take_the_exact_fallback(options):
    torch.manual_seed(0)
    inputs, targets = _inputs("self" if "kdim" not in options else "kv_apart")
    model = Attention("self" if "kdim" not in options else "kv_apart", **options)
    if "kdim" in options:
        model.memory = nn.Linear(4, 6)
        model.forward = _kdim_forward(model)
    _check(model, inputs, targets, rule=False)


def _kdim_forward(model):
    value = nn.Linear(4, 5).double()
    model.value = value

    def forward(x, memory):
        out, _ = model.mha(model.embed(x), model.memory(memory), model.value(memory), need_weights=False)
        return model.head(out.mean(1))

    return forward


def test_transformer_encoder_layer_uses_the_rule():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True).double()
    model = nn.Sequential(nn.Linear(4, E), layer).double()
    assert find_rule(layer.self_attn).name == "multihead_attention"
    x = torch.randn(B, T, 4, dtype=torch.float64)
    y = torch.randn(B, T, E, dtype=torch.float64)
    want, _ = oracle_grads(model, F.mse_loss, x, y)
    assert_dicts_close(persample.per_sample_grads(model, F.mse_loss, x, y, engine="fast"), want)


def test_ambiguous_sequence_first_batch_is_refused():
    """batch_first=False with T == B: dim 0 of the [T, B, E] input could be the batch."""
    torch.manual_seed(0)
    model = Attention("self", batch_first=False).double()
    x, y = torch.randn(T, T, 4, dtype=torch.float64), torch.randn(T, 2, dtype=torch.float64)
    with pytest.raises(NotExact) as err:
        persample.per_sample_grads(model, F.mse_loss, x, y, engine="fast")
    assert err.value.code == "BATCH_DIM_AMBIGUOUS"


@pytest.mark.parametrize("need_weights", [False, True])
def test_a_query_with_every_key_masked(need_weights):
    """scaled_dot_product_attention gives such a query 0 (need_weights=False), the explicit path NaN:
    the rule recomputes either (NaN rows then make the oracle's rows NaN too)."""
    torch.manual_seed(0)
    inputs, targets = _inputs("cross", padding=True)
    inputs["padding"][3] = True  # example 3 attends to nothing
    model = Attention("cross", need_weights=need_weights).double()
    want, _ = oracle_grads(model, F.mse_loss, inputs, targets)
    got = persample.per_sample_grads(model, F.mse_loss, inputs, targets, engine="fast")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, equal_nan=True)
