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
