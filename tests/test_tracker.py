"""Tracker: equivalence with loss.backward(), hooks, every, clipping, check_every, atomic steps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
import persample._step_plan
from persample import MeanMismatchError, Tracker

from zoo import CASE_IDS, CASES, CentersBatch, call_model, oracle_grads

TRAINING_CASES = [
    CASES[CASE_IDS.index(n)] for n in ("mlp", "cnn_groupnorm_pool", "tied_weights", "lstm", "two_inputs", "hf_gpt2")
]


def _train(model, case, batches, *, tracker_kwargs=None, steps_per_update=1):
    """SGD+momentum; with tracker_kwargs=None the backward line is loss.backward()."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = None if tracker_kwargs is None else Tracker(model, case.loss_fn, **tracker_kwargs)
    for i, (inputs, targets) in enumerate(batches):
        if tracker is None:
            case.loss_fn(call_model(model, inputs), targets).backward()
        else:
            tracker.step(inputs, targets)
        if (i + 1) % steps_per_update == 0:
            opt.step()
            opt.zero_grad()
    return model


@pytest.mark.parametrize("case", TRAINING_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("every", [1, 2])
def test_training_matches_backward(case, every):
    model, _, _ = case.instantiate()
    batches = [case.make_batch(4) for _ in range(4)]
    plain = _train(copy.deepcopy(model), case, batches)
    tracked = _train(copy.deepcopy(model), case, batches, tracker_kwargs=dict(every=every))
    for (name, a), b in zip(plain.named_parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)


def test_gradient_accumulation_over_micro_batches_matches_backward():
    case = CASES[CASE_IDS.index("mlp")]
    model, _, _ = case.instantiate()
    batches = [case.make_batch(3) for _ in range(6)]
    plain = _train(copy.deepcopy(model), case, batches, steps_per_update=3)
    tracked = _train(copy.deepcopy(model), case, batches, tracker_kwargs={}, steps_per_update=3)
    for a, b in zip(plain.parameters(), tracked.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_adds_into_existing_grad_and_leaves_frozen_none():
    case = CASES[CASE_IDS.index("partly_frozen")]
    model, x, y = case.instantiate()
    model[2].weight.grad = torch.ones_like(model[2].weight)
    before = model[2].weight.grad.clone()
    stats = Tracker(model, case.loss_fn).step(x, y)
    torch.testing.assert_close(model[2].weight.grad, before + stats.mean["2.weight"], rtol=1e-9, atol=1e-12)
    assert model[0].weight.grad is None and model[0].bias.grad is None and model[2].bias.grad is None
    # p.grad must not alias the statistics handed to hooks.
    model[4].weight.grad.zero_()
    assert stats.mean["4.weight"].abs().sum() > 0


def test_hooks_run_in_order_every_k_and_can_be_removed():
    case = CASES[0]
    model, _, _ = case.instantiate()
    tracker = Tracker(model, case.loss_fn, every=3)
    calls = []
    first = tracker.register_hook(lambda t, s: calls.append(("first", t.steps, s.n)))
    tracker.register_hook(lambda t, s: calls.append(("second", t.steps, s.n)))
    results = [tracker.step(*case.make_batch(4)) for _ in range(7)]
    assert [r is not None for r in results] == [True, False, False, True, False, False, True]
    assert calls == [
        ("first", 0, 4),
        ("second", 0, 4),
        ("first", 3, 4),
        ("second", 3, 4),
        ("first", 6, 4),
        ("second", 6, 4),
    ]
    assert tracker.steps == 7
    first.remove()
    calls.clear()
    for _ in range(3):
        tracker.step(*case.make_batch(4))
    assert calls == [("second", 9, 4)]


def test_non_statistics_steps_do_no_per_example_work(monkeypatch):
    case = CASES[0]
    model, x, y = case.instantiate()
    tracker = Tracker(model, case.loss_fn, every=2)
    tracker.step(x, y)

    def forbidden(*args, **kwargs):
        raise AssertionError("per-example work on a plain step")

    monkeypatch.setattr(persample.tracker, "compute_stats", forbidden)
    assert tracker.step(x, y) is None


def test_clipping_matches_the_float64_oracle():
    case = CASES[CASE_IDS.index("cnn_groupnorm_pool")]
    model, x, y = case.instantiate(batch=6)
    grads, _ = oracle_grads(model, case.loss_fn, x, y)
    norms = torch.cat([g.reshape(6, -1) for g in grads.values()], 1).norm(dim=1)
    clip = norms.median().item()  # some examples clipped, some not
    factors = (clip / norms).clamp(max=1)
    stats = Tracker(model, case.loss_fn, clip_norm=clip).step(x, y)
    for name, p in model.named_parameters():
        expected = (factors.view(-1, *[1] * p.dim()) * grads[name]).mean(0)
        torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.norms, norms, rtol=1e-9, atol=1e-12)  # stats describe raw gradients
    assert ((factors < 1).sum() > 0) and ((factors == 1).sum() > 0)


def test_clipping_applies_on_steps_without_statistics():
    case = CASES[0]
    model, x, y = case.instantiate()
    tracker = Tracker(model, case.loss_fn, every=2, clip_norm=1e-3)
    tracker.step(x, y)
    model.zero_grad()
    assert tracker.step(x, y) is None
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert total <= 1e-3 * (1 + 1e-9)


def test_check_every_catches_a_model_that_couples_examples():
    torch.manual_seed(0)
    model = CentersBatch().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    tracker = Tracker(model, F.cross_entropy, check_every=2)
    with pytest.raises(MeanMismatchError, match=r"lin\.weight"):
        tracker.step(x, y)
    assert model.lin.weight.grad is None and tracker.steps == 0


def test_check_every_passes_on_an_honest_model_and_runs_on_its_schedule(monkeypatch):
    case = CASES[0]
    model, x, y = case.instantiate()
    seen = []
    real = persample._step_plan.check_batch_mean
    monkeypatch.setattr(persample._step_plan, "check_batch_mean", lambda *a, **k: seen.append(1) or real(*a, **k))
    tracker = Tracker(model, case.loss_fn, every=1, check_every=2)
    for _ in range(5):
        tracker.step(x, y)
    assert len(seen) == 3


def _grad_snapshot(model):
    return [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]


def _assert_grads_unchanged(model, snap):
    for p, (ref, values) in zip(model.parameters(), snap):
        assert p.grad is ref
        if values is not None:
            assert torch.equal(p.grad, values)


class _Fragile(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[-1] != 4:
            raise RuntimeError("fragile model refuses this input")
        return self.lin(x)


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("failure", ["bad_input", "hook", "model", "check"])
def test_a_step_that_raises_leaves_every_grad_as_it_was(failure, every):
    torch.manual_seed(0)
    model = CentersBatch() if failure == "check" else _Fragile()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    tracker = Tracker(model, F.cross_entropy, every=every, check_every=1 if failure == "check" else 0)
    for p in model.parameters():  # existing gradients to protect
        p.grad = torch.randn_like(p)
    if failure == "hook":
        tracker.register_hook(lambda t, s: (_ for _ in ()).throw(ValueError("hook failed")))
    snap = _grad_snapshot(model)
    bad_x = {"bad_input": torch.randn(4, 4), "model": torch.randn(5, 7)}.get(failure, x)
    expected = {"bad_input": ValueError, "hook": ValueError, "model": RuntimeError, "check": MeanMismatchError}[failure]
    with pytest.raises(expected) as info:
        tracker.step(bad_x, y)
    _assert_grads_unchanged(model, snap)
    if failure != "bad_input":
        assert any("p.grad was restored" in note for note in getattr(info.value, "__notes__", []))


def test_random_ops_advance_the_rng_like_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    tracker = Tracker(model, F.cross_entropy, randomness="different")
    first, second = tracker.step(x, y), tracker.step(x, y)
    assert not torch.equal(first.sq_norms, second.sq_norms)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(every=0), "every must be an integer"),
        (dict(check_every=-1), "check_every must be an integer"),
        (dict(clip_norm=0.0), "clip_norm must be a positive number"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Tracker(nn.Linear(2, 2), F.mse_loss, **kwargs)


def test_register_hook_needs_a_callable():
    with pytest.raises(TypeError, match="hook must be callable"):
        Tracker(nn.Linear(2, 2), F.mse_loss).register_hook(3)
