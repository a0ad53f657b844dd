"""Relative position biases (issue 22: T5, MPNet): an Embedding on a (T, T) index without batch dim whose
output is rearranged (permute, unsqueeze, slicing, view, expand) and then broadcast over the batch's
attention scores, once or reused by several layers. The fast engine expands the Embedding's output over
the batch and applies each rearrangement to every example (watchers._per_example), so the Embedding's
per-example output gradient is the scores' gradient of that example, summed over every use. Uses that
are not rearrangements or broadcasts with batched tensors still refuse (EXPANSION_ESCAPES).
Oracle: a float64 loop of autograd per example."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import NotExact, Tracker

from zoo import assert_dicts_close, oracle_grads

B, T, D, H = 4, 5, 6, 2


class RelBiasAttention(nn.Module):
    """Two attention layers over x [B, T, D] whose scores [B, H, T, T] get a bias from an Embedding of a
    (T, T) bucket index (shape [T, T, H]), computed once and used by both layers as T5 and MPNet do."""

    def __init__(self, mode: str, heads: int = H):
        super().__init__()
        self.mode, self.h = mode, heads
        self.rel = nn.Embedding(7, self.h)
        self.q1, self.q2 = nn.Linear(D, self.h * 3), nn.Linear(D, self.h * 3)
        # no key bias: the softmax over keys cancels its gradient (zero up to rounding, for every example)
        self.k1, self.k2 = nn.Linear(D, self.h * 3, bias=False), nn.Linear(D, self.h * 3, bias=False)
        self.v, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def bias(self, x, mask):
        idx = torch.arange(T)
        buckets = (idx[None, :] - idx[:, None]).clamp(-3, 3) + 3  # [T, T], no batch dim
        values = self.rel(buckets)  # [T, T, H]
        if self.mode == "rearranged":  # narrow, unflatten, select, movedim, flatten
            wide = self.rel((idx[None, :] - torch.arange(T + 1)[:, None]).clamp(-3, 3) + 3)  # [T + 1, T, H]
            values = wide.narrow(0, 1, T).unflatten(2, (self.h, 1)).select(3, 0)  # [T, T, H]
            return values.movedim(2, 0).flatten(1, 2).unflatten(1, (T, T)).unsqueeze(0)
        if self.mode == "view":  # a view and a transpose instead of a permute
            return values.reshape(T * T, self.h).transpose(0, 1).view(1, self.h, T, T)
        values = values.permute([2, 0, 1]).unsqueeze(0)  # [1, H, T, T]
        if self.mode == "sliced":  # T5: position_bias[:, :, -T:, :]
            values = values[:, :, -T:, :]
        if self.mode == "expanded":  # MPNet: expand over the batch, then contiguous
            values = values.expand((x.shape[0], -1, T, T)).contiguous()
        if self.mode == "masked":  # T5 with an attention mask: the bias plus a batched mask, then reused
            values = values + mask
        return values

    def layer(self, x, q, k, bias):
        scores = (q(x).view(x.shape[0], T, self.h, 3).transpose(1, 2)) @ (
            k(x).view(x.shape[0], T, self.h, 3).permute(0, 2, 3, 1)
        )
        if self.mode == "in_place":  # T5: scores += position_bias
            scores += bias
        else:
            scores = scores + bias
        probs = scores.softmax(-1).mean(1)  # [B, T, T]
        return torch.tanh(probs @ self.v(x))

    def forward(self, x):
        mask = (x[:, None, None, :, 0] > 1.5).to(x.dtype) * -3.0  # [B, 1, 1, T], batched
        bias = self.bias(x, mask)
        h = self.layer(x, self.q1, self.k1, bias)
        if self.mode != "once":
            h = self.layer(h, self.q2, self.k2, bias)  # the same bias, reused
        return self.head(h.mean(1))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)


def _model(cls, *args):
    torch.manual_seed(0)
    model = cls(*args).double()
    with torch.no_grad():  # a bias large enough to matter in the softmax
        for p in model.parameters():
            p.mul_(3.0)
    return model


def _assert_exact(stats, grads):
    b = next(iter(grads.values())).shape[0]
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()})
    assert_dicts_close(stats.param_sq_norms, {k: g.reshape(b, -1).pow(2).sum(1) for k, g in grads.items()})


@pytest.mark.parametrize("mode", ["once", "reused", "in_place", "sliced", "expanded", "masked", "view", "rearranged"])
def test_relative_bias_is_exact_in_the_fast_engine(mode):
    model = _model(RelBiasAttention, mode)
    x, y = _data()
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    assert grads["rel.weight"].reshape(B, -1).std(0).max() > 1e-3  # the bias's gradient differs by example
    _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast"), grads)


def test_relative_bias_with_as_many_heads_as_examples_is_exact():
    """heads == B: the permuted bias [H, T, T] has dim 0 of the batch's size by coincidence."""
    for mode in ("reused", "expanded", "masked"):
        model = _model(RelBiasAttention, mode, B)
        x, y = _data()
        grads, _ = oracle_grads(model, F.cross_entropy, x, y)
        _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast"), grads)


def test_a_bucket_index_with_as_many_positions_as_examples_is_refused():
    """T == B: the (T, T) index has dim 0 of the batch's size and comes from no input, so it may be one row
    per example as well as one per position; the fast engine cannot tell, and refuses. auto is exact."""
    model = _model(RelBiasAttention, "reused")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(T, T, D, generator=g, dtype=torch.float64), torch.randint(0, 3, (T,), generator=g)
    with pytest.raises(NotExact) as err:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert err.value.code == "BATCH_DIM_AMBIGUOUS"
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y), grads)


@pytest.mark.parametrize("mode", ["reused", "expanded"])
def test_relative_bias_is_exact_under_observe_and_step(mode):
    model = _model(RelBiasAttention, mode)
    x, y = _data(1)
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    tracker = Tracker(model, F.cross_entropy)
    with tracker.observe(y) as observed:
        F.cross_entropy(model(x), y).backward()
    _assert_exact(observed.stats, grads)
    model.zero_grad()
    _assert_exact(tracker.step(x, y), grads)
    assert_dicts_close({n: p.grad for n, p in model.named_parameters()}, {k: g.mean(0) for k, g in grads.items()})


def test_explain_predicts_the_fast_engine_for_a_relative_bias():
    model = _model(RelBiasAttention, "reused")
    x, y = _data()
    report = persample.explain(model, F.cross_entropy, x, y)
    assert report.engines["fast"].exact
    assert report.entry_points["grad_stats"] == "fast"


# ------------------------------------------------------------------------------ still refused


class LeakyBias(nn.Module):
    """The bias reaches the batched scores through a permute, and ALSO the loss by another path that is
    not a broadcast over the batch: each example's output would then depend on every example's share."""

    def __init__(self, leak: str):
        super().__init__()
        self.leak = leak
        self.rel = nn.Embedding(7, H)
        self.q, self.head = nn.Linear(D, H * T), nn.Linear(T, 3)

    def forward(self, x):
        idx = torch.arange(T)
        bias = self.rel((idx[None, :] - idx[:, None]).clamp(-3, 3) + 3).permute(2, 0, 1)  # [H, T, T]
        if self.leak == "rolled":  # expanded over the batch by the model itself, then rows of other examples
            bias = bias.expand(x.shape[0], H, T, T).roll(1, 0)
        scores = self.q(x).view(x.shape[0], T, H, T).transpose(1, 2) + bias  # [B, H, T, T]: exact so far
        h = scores.softmax(-1).mean((1, 2))  # [B, T]
        if self.leak == "sum":  # a full reduction of the bias, added to every example
            h = h + bias.sum()
        elif self.leak == "matmul":  # a product that is not a broadcast over the batch
            h = h + (bias @ bias).mean((0, 1))
        elif self.leak == "tensor_index":  # advanced indexing with a tensor
            h = h + bias[torch.tensor([1, 0])].mean((0, 1))
        elif self.leak == "batch_summed":  # the batch-summed scores meet the bias un-expanded
            h = h + (scores.sum(0) * bias).mean((0, 1))
        return self.head(h)


@pytest.mark.parametrize("leak", ["sum", "matmul", "tensor_index", "batch_summed", "rolled"])
def test_a_bias_that_also_reaches_the_loss_otherwise_is_refused(leak):
    model = _model(LeakyBias, leak)
    x, y = _data()
    with pytest.raises(NotExact) as err:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    if leak == "rolled":  # the graph audit sees rows of other examples
        assert err.value.code == "BATCH_MIXED"
    else:
        assert err.value.code == "EXPANSION_ESCAPES"
    if leak != "batch_summed":  # a model of the batch (its summed scores), not of each example: no exact answer
        grads, _ = oracle_grads(model, F.cross_entropy, x, y)
        _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y), grads)  # auto: another engine


class FlattenedRows(nn.Module):
    """OPT's decoder: a LayerNorm on the batch's tokens flattened to rows [B·T, D], then viewed back to
    [B, T, D]. The rows hold the batch: the view must not be applied per example to an expansion (it would
    bring the batch to dim 1 under the expansion's). The flattening of a batch-first activation is a place
    (persample/engines/fast/places.py, task opt22): the LayerNorm reads example i's rows i·T … (i+1)·T − 1,
    and no expansion is made."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.head = nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, 3)

    def forward(self, x):
        h = self.norm(self.inp(x).reshape(-1, D))  # [B·T, D]
        return self.head(h.view(x.shape[0], T, D))  # [B, T, 3], the model's output


def _token_mean_loss(out, y):
    return F.cross_entropy(out.mean(1), y)


def test_the_batchs_own_rows_flattened_are_read_by_their_place_not_expanded():
    model = _model(FlattenedRows)
    x, y = _data()
    grads, _ = oracle_grads(model, _token_mean_loss, x, y)
    _assert_exact(persample.grad_stats(model, _token_mean_loss, x, y, engine="fast"), grads)
    _assert_exact(persample.grad_stats(model, _token_mean_loss, x, y), grads)


# ------------------------------------------------- rows of a raw input gathered in place (DeBERTa's own loss)


class GatheredInput(nn.Module):
    """The forward gathers rows of its raw input along dim 0, as DeBERTa-v2's own loss gathers the labelled
    rows of ``labels`` (``torch.gather(labels, 0, (labels >= 0).nonzero().view(-1))``)."""

    def __init__(self, rows: str):
        super().__init__()
        self.rows = rows
        self.a, self.b = nn.Linear(D, 4), nn.Linear(4, 3)

    def forward(self, x):  # x: [B, D]
        kept = (x[:, 0] > -1e9).nonzero().view(-1)  # every row: arange(B)
        if self.rows == "gather":
            x = torch.gather(x, 0, kept[:, None].expand(-1, x.shape[1]))
        elif self.rows == "index_select":
            x = torch.index_select(x, 0, kept)
        elif self.rows == "permuted":  # rows of other examples: mixing
            x = torch.gather(x, 0, kept.flip(0)[:, None].expand(-1, x.shape[1]))
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("rows", ["gather", "index_select", "permuted"])
def test_rows_of_a_raw_input_gathered_in_place_are_not_mixing(rows):
    model = _model(GatheredInput, rows)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)
    if rows == "permuted":
        with pytest.raises(NotExact) as err:
            persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
        assert err.value.code == "BATCH_MIXED"
        return
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast"), grads)


# ------------------------------------------------------------------- Hugging Face T5 and MPNet, under observe


@pytest.mark.parametrize("case_id", ["hf-t5-mask-padded", "hf-mpnet-mask-padded"])
def test_hugging_face_relative_bias_under_observe(case_id):
    """The real-model matrix checks every entry point but observe; here observe (the user's own
    backward) on T5 and MPNet with padded batches, against the matrix's float64 loop oracle at its
    tolerance (T5 computes its norms in float32: docs/coverage.md)."""
    pytest.importorskip("transformers")
    import test_real_models as matrix

    from zoo import call_model

    case = matrix.BY_ID[case_id]
    model, inputs, targets = case.instantiate()
    with Tracker(model, case.loss_fn).observe(targets) as observed:
        case.loss_fn(call_model(model, inputs), targets).backward()
    assert matrix.stats_mismatch(observed.stats, matrix.expected(case_id), inner_products=False) is None
