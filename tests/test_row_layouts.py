"""Issue 22 (task opt22): layers the fast engine now covers exactly, each against the float64 loop oracle.

- train-mode InstanceNorm with ``track_running_stats=True``: it normalises each example with that example's
  own statistics and only writes its running buffers, never reads them, so the per-example gradients do not
  depend on them (the ``instance_norm`` rule); the buffers end as the user's own forward + backward leaves
  them (``Tracker.step``: one update with the batch's statistics; the functional API: untouched). In eval
  mode the buffers are read: no rule, the exact fallback.
- rule layers (Linear, LayerNorm) called on a (B·T, D) flattening of a batch-first activation and reshaped
  back (OPT's decoder layer), or on a sequence-first (T, B, D) tensor (``batch_first=False`` encoder
  layers): the rule reads example i's rows where the flattening or the transpose put them. Flattenings that
  mix the examples (a reshape after a transpose that puts T first) keep refusing.

The oracle is the loop over examples, each alone (tests/zoo.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import Tracker
from persample.engines.fast.rules import find_rule

from oracle_stats import oracle_stats
from zoo import assert_dicts_close, oracle_grads

F64 = torch.float64


def _check_fast(model, x, y, loss_fn=F.cross_entropy):
    stats = persample.grad_stats(model, loss_fn, x, y, engine="fast")
    grads, losses = oracle_grads(model, loss_fn, x, y)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()})
    sq = sum(g.flatten(1).square().sum(1) for g in grads.values())
    torch.testing.assert_close(stats.sq_norms, sq, rtol=1e-9, atol=1e-12)
    rows = persample.per_sample_grads(model, loss_fn, x, y, engine="fast")
    assert_dicts_close(rows, grads)


# ------------------------------------------------------------------------------------- InstanceNorm


def _instance_norm_model(dim: int) -> nn.Module:
    torch.manual_seed(0)
    norm = (nn.InstanceNorm1d if dim == 1 else nn.InstanceNorm2d)(3, affine=True, track_running_stats=True)
    with torch.no_grad():
        norm.weight.add_(torch.randn(3) * 0.3)
        norm.bias.add_(torch.randn(3) * 0.3)
        norm.running_mean.add_(torch.randn(3))  # buffers far from the batch's statistics: read, they would show
        norm.running_var.mul_(3.0)
    pool = nn.AdaptiveAvgPool1d(1) if dim == 1 else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(norm, nn.Tanh(), pool, nn.Flatten(), nn.Linear(3, 3)).to(F64)


def _instance_batch(dim: int):
    torch.manual_seed(1)
    shape = (4, 3, 7) if dim == 1 else (4, 3, 5, 4)
    return torch.randn(shape, dtype=F64) * 2 + 0.5, torch.randint(0, 3, (4,))


@pytest.mark.parametrize("dim", [1, 2])
def test_train_mode_instance_norm_with_running_stats_is_exact_and_leaves_buffers_untouched(dim):
    model, (x, y) = _instance_norm_model(dim).train(), _instance_batch(dim)
    assert find_rule(model[0]) is not None and find_rule(model[0]).name == "instance_norm"
    before = {n: b.clone() for n, b in model.named_buffers()}
    _check_fast(copy.deepcopy(model), x, y)  # the oracle's own forwards update a copy's buffers
    persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    persample.grad_stats(model, F.cross_entropy, x, y)  # auto
    persample.per_sample_grads(model, F.cross_entropy, x, y)
    persample.check_mean(model, F.cross_entropy, x, y)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    assert persample.explain(model, F.cross_entropy, x, y).entry_points["grad_stats"] == "fast"


@pytest.mark.parametrize("dim", [1, 2])
def test_tracker_step_updates_instance_norm_buffers_once_with_the_batch_statistics(dim):
    model, (x, y) = _instance_norm_model(dim).train(), _instance_batch(dim)
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()  # the user's own step: one forward, one update
    Tracker(model, F.cross_entropy, engine="fast").step(x, y)
    for (n, b), (_, want) in zip(model.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(b, want, rtol=0, atol=0, msg=n)
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=n)


def test_eval_mode_instance_norm_reads_its_buffers_and_takes_the_exact_fallback():
    model, (x, y) = _instance_norm_model(2).eval(), _instance_batch(2)
    assert find_rule(model[0]) is None  # it reads running_mean / running_var: not the rule's x̂
    _check_fast(model, x, y)


# ------------------------------------------------------------------- flattenings and sequence-first calls

B, T, D = 4, 3, 5


class FlatFeedForward(nn.Module):
    """OPT's decoder-layer shape: LayerNorm, fc1, fc2 on the (B·T, D) flattening, a residual there, viewed back.

    ``mix``: how the flattening is made and undone — "none" (reshape of the batch-first tensor, exact),
    "seq-first" (a reshape after a transpose that puts T first: rows of different examples interleave),
    "roll" (the flat output rolled by 2T rows: examples swapped two apart, of the same parity), "regroup"
    (the flat output viewed back as (T, B, ·) and transposed)."""

    def __init__(self, mix: str = "none"):
        super().__init__()
        self.mix = mix
        self.embed = nn.Linear(2, D)
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 7)
        self.fc2 = nn.Linear(7, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.embed(x)  # (B, T, D), batch-first
        shape = h.shape
        flat = h.transpose(0, 1).reshape(-1, D) if self.mix == "seq-first" else h.reshape(-1, D)
        y = flat + self.fc2(torch.relu(self.fc1(self.norm(flat))))
        if self.mix == "roll":
            y = y.roll(2 * T, 0)
        if self.mix == "seq-first":
            h = y.view(T, -1, D).transpose(0, 1)
        elif self.mix == "regroup":
            h = y.view(T, -1, D).transpose(0, 1)
        else:
            h = y.view(shape)
        return self.head(torch.tanh(h)).mean(1)


class SeqFirstBlock(nn.Module):
    """A batch-first input transposed to (T, B, D), a LayerNorm and a Linear there, transposed back;
    ``roll``: the sequence-first activation rolled by 2 along its batch dim (examples of one parity swapped)."""

    def __init__(self, roll: bool = False):
        super().__init__()
        self.roll = roll
        self.norm = nn.LayerNorm(2)
        self.proj = nn.Linear(2, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = x.transpose(0, 1)  # (T, B, 2)
        h = self.proj(self.norm(h) * 2.0 + 1.0)
        if self.roll:
            h = h.roll(2, 1)
        return self.head(torch.tanh(h.transpose(0, 1))).mean(1)


def _sequence_batch():
    torch.manual_seed(2)
    return torch.randn(B, T, 2, dtype=F64), torch.randint(0, 3, (B,))


def _built(cls, *args):
    torch.manual_seed(0)
    return cls(*args).to(F64)


def test_rule_layers_on_a_flattening_of_the_batch_read_each_examples_rows():
    model, (x, y) = _built(FlatFeedForward), _sequence_batch()
    _check_fast(model, x, y)
    assert persample.explain(model, F.cross_entropy, x, y).entry_points["grad_stats"] == "fast"


def test_rule_layers_on_a_sequence_first_tensor_read_each_examples_slice():
    model, (x, y) = _built(SeqFirstBlock), _sequence_batch()
    _check_fast(model, x, y)


@pytest.mark.parametrize(
    "cls, args, code",
    [
        (FlatFeedForward, ("seq-first",), "EXPANSION_ESCAPES"),  # no place: T first, then flattened
        (FlatFeedForward, ("roll",), "BATCH_MIXED"),  # a named op along the flattened rows
        (FlatFeedForward, ("regroup",), "BATCH_MIXED"),  # the probe of the rows
        (SeqFirstBlock, (True,), "BATCH_MIXED"),  # a named op along the batch dim of a sequence-first tensor
    ],
    ids=["flattened-after-transpose", "rolled-rows", "regrouped-rows", "seq-first-rolled"],
)
def test_flattenings_and_transposes_that_mix_the_examples_are_refused_and_auto_stays_exact(cls, args, code):
    model, (x, y) = _built(cls, *args), _sequence_batch()
    with pytest.raises(persample.NotExact) as err:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert err.value.code == code
    stats = persample.grad_stats(model, F.cross_entropy, x, y)  # auto: another engine, exact
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()})


@pytest.mark.parametrize("cls", [FlatFeedForward, SeqFirstBlock], ids=["flattening", "seq-first"])
def test_observe_reads_placed_calls_from_the_users_backward(cls):
    model, (x, y) = _built(cls), _sequence_batch()
    want = oracle_stats(model, F.cross_entropy, x, y)
    tracker = Tracker(model, F.cross_entropy, inner_products=True)
    with tracker.observe(y) as observed:
        F.cross_entropy(model(x), y).backward()
    assert_dicts_close(observed.stats.mean, want["mean"])
    assert_dicts_close(observed.stats.var, want["var"], atol=1e-11)
    assert_dicts_close(observed.stats.param_sq_norms, want["param_sq_norms"])


@pytest.mark.parametrize(
    "cls, args", [(FlatFeedForward, ("roll",)), (FlatFeedForward, ("regroup",)), (SeqFirstBlock, (True,))]
)
def test_observe_refuses_placed_calls_whose_rows_mix(cls, args):
    model, (x, y) = _built(cls, *args), _sequence_batch()
    tracker = Tracker(model, F.cross_entropy)
    with pytest.raises(persample.NotExact) as err:
        with tracker.observe(y):
            F.cross_entropy(model(x), y).backward()
    assert err.value.code == "BATCH_MIXED"


def test_observe_on_opt_with_a_padded_batch_gives_the_loops_statistics():
    """OPT's decoder layer (LayerNorm, fc1, fc2 on the (B·T, D) flattening; positions from a cumsum of the
    padding mask): observe around the user's backward gives the loop's statistics. OPT computes some
    norms in float32 inside a float64 model (tests/test_real_models.py NOISE_FAMILIES): atol 1e-7 of the
    field's largest value."""
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from real_models import all_cases

    case = next(c for c in all_cases() if c.id == "hf-opt-mask-padded")
    model, inputs, targets = case.instantiate()
    loop = persample.grad_stats(model, case.loss_fn, inputs, targets, engine="loop")
    tracker = Tracker(model, case.loss_fn)
    with tracker.observe(targets) as observed:
        case.loss_fn(model(**inputs), targets).backward()
    for field in ("mean", "var"):
        got, want = getattr(observed.stats, field), getattr(loop, field)
        scale = max(float(v.abs().max()) for v in want.values())
        assert_dicts_close(got, want, rtol=1e-7, atol=1e-7 * scale)


class FlatWrittenAcrossExamples(nn.Module):
    """Frozen inputs flattened to (B·T, 2), then the last example's rows copied over the first's in place (a view
    of the flattening: no gradient shows it), before a Linear: the first output depends on the last example."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        flat = x.reshape(-1, 2).clone()
        rows = flat[:]
        rows[:T] = rows[-T:].clone()
        return self.head(torch.tanh(self.proj(flat)).view(-1, T, D)).mean(1)


def test_a_flattening_written_with_other_examples_rows_loses_its_place():
    model, (x, y) = _built(FlatWrittenAcrossExamples), _sequence_batch()
    with pytest.raises(persample.NotExact) as err:  # read by its place, the statistics would be wrong
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert err.value.code == "EXPANSION_ESCAPES"  # as before places: an input without a batch dim


def _made(op: str, t, *args):
    from persample.engines.fast.places import made

    out = getattr(t, op)(*args)
    return made(op, (t, *args), out, 4, lambda _: True)


def test_places_are_read_off_the_ops_own_arguments():
    from persample.engines.fast.places import Place

    t = torch.zeros(4, 3, 2, 5)
    assert _made("reshape", t, -1, 5) == Place(positions=(3, 2))
    assert _made("reshape", t, 12, 10) == Place(positions=(3,))  # merges both ends: rows 3i … 3i + 2
    assert _made("view", t, 24, 5) == Place(positions=(3, 2))
    assert _made("flatten", t, 0, 1) == Place(positions=(3,))
    assert _made("reshape", t, 4, 30) is None  # dim 0 is the batch: nothing to place
    assert _made("reshape", t, 6, 20) is None  # 6 rows for 4 examples: rows straddle examples
    assert _made("view", t, torch.int16) is None  # another dtype: not a reshape
    assert _made("transpose", t, 0, 2) == Place(dim=2)
    assert _made("transpose", t, 1, 2) is None  # dim 0 stays
    assert _made("movedim", t, 0, 3) == Place(dim=3)
    assert _made("permute", t, 1, 2, 0, 3) == Place(dim=2)
    same = torch.zeros(4, 4, 3)  # T == B: read off the arguments, not the shapes
    from persample.engines.fast.places import made

    assert made("transpose", (same, 0, 1), same.transpose(0, 1), 4, lambda _: True) is None  # dim 0 is B long
    assert made("reshape", (t, -1, 5), t.reshape(-1, 5), 4, lambda _: False) is None  # not batched there


class FlatHeads(nn.Module):
    """(B, T, 2, 3) flattened to (B·T, 6) (both ends merged) before a Linear, viewed back."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = x.repeat(1, 1, 3).view(-1, T, 2, 3) * 1.5
        return self.head(torch.tanh(self.proj(h.reshape(-1, 6))).view(-1, T, D)).mean(1)


def test_a_reshape_that_merges_both_ends_reads_each_examples_rows():
    model, (x, y) = _built(FlatHeads), _sequence_batch()
    _check_fast(model, x, y)
