"""The fast engine's fixed per-call cost on small models (issue 22, branch pyoverhead): work skipped or
shared must leave every result and every refusal as it was.

- A Tracker step with a standard loss (a closed form) reads the per-example losses and their gradient at
  the output off the engine's own backward, as it already did for vmapped losses
  (``test_check_at_output_reuse.py``), instead of evaluating and differentiating them again: the weights,
  ``p.grad`` and the refusal of a batch loss that is not Σ_i w_i L_i stay as they were.
- ``GradStats.finite_flag`` reads each tensor once (its ends) instead of writing ``isfinite``'s copy:
  the same answer for every inf and NaN, anywhere, in any floating dtype.
- ``p.grad`` written from the statistics of a mean loss is never the statistics' own tensor.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import BatchLossMismatch

from zoo import oracle_grads


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    return model, x, y


CLASS_WEIGHTS = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
#: standard losses with a closed form (:mod:`persample.engines.fast.losses`), and how often the check still
#: evaluates the per-example losses itself in a Tracker step: never (unequal weights took a plain backward of
#: the batch loss for p.grad, whose forward's weights were derived again: one; now p.grad = Σ_i w_i g_i)
LOSSES = {
    "ce-mean": (lambda out, y: F.cross_entropy(out, y), 0),
    "ce-label-smoothing": (lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1), 0),
    "ce-class-weights": (lambda out, y: F.cross_entropy(out, y, weight=CLASS_WEIGHTS), 0),
    "mse": (F.mse_loss, 0),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_tracker_step_with_a_standard_loss_reads_its_weights_off_the_engines_backward(name, check_evaluations):
    model, x, y = _mlp()
    loss_fn, evaluations = LOSSES[name]
    if name == "mse":
        y = torch.randn(6, 3, dtype=torch.float64)
    reference = copy.deepcopy(model)
    grads, _ = oracle_grads(model, loss_fn, x, y)
    stats = persample.Tracker(model, loss_fn, engine="fast").step(x, y)
    # the check took the engine's losses and their gradient at the output (main: one evaluation more)
    assert len(check_evaluations) == evaluations
    loss_fn(reference(x), y).backward()
    for (k, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=k)
        torch.testing.assert_close(stats.mean[k], grads[k].mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.m2[k], grads[k].var(0, correction=0) * 6, rtol=1e-9, atol=1e-12)


def _centred_batch_loss(out, y):
    """Couples the examples: the logits centred on the batch's mean row."""
    return F.cross_entropy(out - out.mean(0, keepdim=True), y)


def test_a_batch_loss_that_is_not_a_sum_of_the_standard_per_example_losses_is_still_refused(check_evaluations):
    model, x, y = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    tracker = persample.Tracker(model, persample.BatchLoss(_centred_batch_loss, per_example=F.cross_entropy))
    with pytest.raises(BatchLossMismatch):
        tracker.step(x, y)
    assert check_evaluations == []  # refused from the engine's own gradient at the output
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_p_grad_from_the_statistics_is_never_the_statistics_tensor():
    model, x, y = _mlp()
    stats = persample.Tracker(model, F.cross_entropy, engine="fast").step(x, y)
    kept = {k: v.clone() for k, v in stats.mean.items()}
    for k, p in model.named_parameters():
        assert p.grad.untyped_storage().data_ptr() != stats.mean[k].untyped_storage().data_ptr()
        p.grad.zero_()  # an optimizer's zero_grad(set_to_none=False)
    for k, v in stats.mean.items():
        assert torch.equal(v, kept[k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_flag_sees_every_inf_and_nan(dtype, bad):
    model, x, y = _mlp()
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    stats = dataclasses.replace(
        stats,
        mean={k: v.to(dtype) for k, v in stats.mean.items()},
        param_sq_norms={k: v.to(dtype) for k, v in stats.param_sq_norms.items()},
    )
    assert stats.is_finite() and stats.finite_flag().dim() == 0
    for field in ("mean", "param_sq_norms"):
        for k in getattr(stats, field):
            for position in (0, -1):
                values = {name: v.clone() for name, v in getattr(stats, field).items()}
                values[k].view(-1)[position] = bad
                broken = dataclasses.replace(stats, **{field: values})
                assert not broken.is_finite(), (field, k, position)


def test_finite_flag_keeps_huge_finite_values_and_mixed_dtypes_finite():
    model, x, y = _mlp()
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    names = list(stats.mean)
    huge = {k: (v * 1e300 if i % 2 else v.float()) for i, (k, v) in enumerate(stats.mean.items())}
    empty = {**huge, names[0]: huge[names[0]][:0]}  # (an empty tensor has nothing to check)
    for mean in (huge, empty):
        assert dataclasses.replace(stats, mean=mean).is_finite()
    mixed = {**huge, names[1]: torch.full_like(huge[names[1]], float("nan"))}
    assert not dataclasses.replace(stats, mean=mixed).is_finite()


class _RootWithParameter(nn.Module):
    """A model whose root has a parameter of its own (a learned output scale)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        return self.lin(x) * self.scale


def _root_models():
    torch.manual_seed(0)
    return {"root-parameter": _RootWithParameter().double(), "bare-linear": nn.Linear(5, 3).double()}


@pytest.fixture
def plans_made(monkeypatch):
    """How often the fast engine finds a model's plan afresh (units, rules, hooks, sharding)."""
    import persample.engines.fast.plan as plan

    calls = []
    original = plan._found

    def counted(model):
        calls.append(1)
        return original(model)

    monkeypatch.setattr(plan, "_found", counted)
    return calls


@pytest.mark.parametrize("kind", ["root-parameter", "bare-linear"])
def test_tracker_steps_on_a_root_with_parameters_keep_one_plan_and_its_rules(kind, plans_made):
    """The Tracker hooks the model's root anew each step (to keep the first forward's output). On a root
    with parameters of its own that hook changed the plan's fingerprint, so every step found the plan
    afresh (and ran the spot check again), and a bare ``nn.Linear`` lost its rule to the fallback."""
    import persample.engines.fast.plan as plan

    model = _root_models()[kind]
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    reference = copy.deepcopy(model)
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    tracker = persample.Tracker(model, F.cross_entropy, engine="fast")
    for step in range(3):
        for p in model.parameters():
            p.grad = None
        stats = tracker.step(x, y)
        for k, g in grads.items():
            torch.testing.assert_close(stats.mean[k], g.mean(0), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(stats.param_sq_norms[k], g.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
    assert len(plans_made) == 1
    if kind == "bare-linear":  # its rule (a root with a parameter of its own is a fallback: not a rule's module)
        assert [rule is not None for _, _, rule, _ in plan._PLANS[model].units] == [True]
    F.cross_entropy(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["root-parameter", "bare-linear"])
def test_a_users_forward_hook_on_such_a_root_still_changes_the_plan(kind, plans_made):
    model = _root_models()[kind]
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    tracker = persample.Tracker(model, F.cross_entropy)
    tracker.step(x, y)
    model.register_forward_hook(lambda module, args, output: output * 2.0)  # changes what the root computes
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    stats = tracker.step(x, y)
    assert len(plans_made) == 2
    for k, g in grads.items():
        torch.testing.assert_close(stats.mean[k], g.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.param_sq_norms[k], g.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)


def test_call_counts_times_every_entry_point_interleaved():
    """``benchmarks/call_counts.py --time``: a CPU time per entry point, the Tracker's two kinds of step apart."""
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parent.parent / "benchmarks")
    sys.path.insert(0, bench)
    try:
        import call_counts
        import cases
    finally:
        sys.path.remove(bench)
    times = call_counts.cpu_times(cases.mlp_problem(4), 2)
    expected = {"plain", "grad_stats-fast", "grad_stats-fast-novar", "observe", "observe-novar"}
    assert set(times) == expected | {"tracker-step-stats", "tracker-step-plain"}
    assert all(ms >= 0 for ms in times.values())
    assert set(call_counts.cpu_times(cases.mlp_problem(4), 1, ["observe"])) == {"observe", "observe-novar"}


def test_flat_leaves_of_an_ops_arguments_are_pytrees_leaves():
    """``flat_leaves`` takes an op's scalars (ints, dtypes, slices, ...) as leaves without pytree: the
    same leaves, in the same order, as ``tree_flatten``; and none of those types is a pytree node."""
    from torch.utils._pytree import SUPPORTED_NODES, tree_flatten

    from persample._batch import _SCALAR_LEAVES, flat_leaves

    assert not _SCALAR_LEAVES & set(SUPPORTED_NODES)
    t = torch.ones(2)
    args = (t, 3, -1.5, True, 2j, "sum", b"x", slice(0, 2), ..., torch.float32, torch.device("cpu"))
    nested = [args, {"k": (4, [t, torch.Size([2, 3])])}, None]
    for value in (*args, args, nested):
        leaves, expected = flat_leaves(value), tree_flatten(value)[0]
        expected = [leaf for leaf in expected if leaf is not None]  # (flat_leaves: None is no leaf)
        assert len(leaves) == len(expected)
        assert all(a is b or (type(a) is type(b) and a == b) for a, b in zip(leaves, expected))
