"""The fast engine's per-model plan (persample/engines/fast/plan.py) is reused only while the model's
structure is unchanged: every change below, made after a first call that planned, must give the
oracle's statistics or the refusal on the second call, exactly as on a fresh model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import NotExact
from persample.engines.fast import plan as plan_module

from oracle_stats import oracle_stats
from zoo import assert_dicts_close


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(b=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


def _fast(model, x, y):
    return persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")


def _assert_oracle(model, x, y):
    got = _fast(model, x, y)
    want = oracle_stats(model, F.cross_entropy, x, y)
    assert got.mean.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_dicts_close(got.mean, want["mean"], 1e-9, 1e-11)
    assert_dicts_close(got.var, want["var"], 1e-9, 1e-11)
    assert_dicts_close(got.param_sq_norms, want["param_sq_norms"], 1e-9, 1e-11)


def _planned(model, x, y):
    """A first call, which plans; the plan is then reused by an unchanged model."""
    _assert_oracle(model, x, y)
    first = plan_module._PLANS[model]
    _fast(model, x, y)
    assert plan_module._PLANS[model] is first  # reused, not found again
    return first


def test_a_gradient_hook_added_after_the_first_call_is_seen():
    """The plan sees the hook: a hook on a rule module's weight is applied to each example's gradient (the
    oracle's loop honours it too); one on a rule-less module's parameter is refused."""
    model, (x, y) = _mlp(), _data()
    _planned(model, x, y)
    model[2].weight.register_hook(lambda g: g.clamp(-0.05, 0.05))
    _assert_oracle(model, x, y)
    model[1].register_parameter("gain", nn.Parameter(torch.ones(6, dtype=torch.float64)))  # structure changes
    model[1].gain.register_hook(lambda g: 2 * g)
    model[1].forward = lambda h: torch.tanh(h) * model[1].gain  # a module without a rule uses it
    with pytest.raises(NotExact) as err:
        _fast(model, x, y)
    assert err.value.code == "PARAMETER_GRADIENT_HOOK"


def test_a_module_backward_hook_added_after_the_first_call_is_refused():
    model, (x, y) = _mlp(), _data()
    _planned(model, x, y)
    model[1].register_full_backward_hook(lambda m, gi, go: (gi[0] * 2,))
    with pytest.raises(NotExact) as err:
        _fast(model, x, y)
    assert err.value.code == "MODULE_BACKWARD_HOOK"


def test_a_forward_hook_added_after_the_first_call_is_seen():
    model, (x, y) = _mlp(), _data()
    _planned(model, x, y)
    model[0].register_forward_hook(lambda m, args, out: out * 3)  # the Linear's rule no longer applies as is
    _assert_oracle(model, x, y)


def test_a_replaced_parameter_is_used():
    model, (x, y) = _mlp(), _data()
    _planned(model, x, y)
    model[0].weight = nn.Parameter(torch.randn_like(model[0].weight))
    _assert_oracle(model, x, y)


def test_requires_grad_toggled_after_the_first_call():
    model, (x, y) = _mlp(), _data()
    _planned(model, x, y)
    model[0].weight.requires_grad_(False)
    _assert_oracle(model, x, y)
    model[0].weight.requires_grad_(True)
    _assert_oracle(model, x, y)


def test_a_swapped_module_that_mixes_the_batch_is_refused():
    model, (x, y) = _mlp(), _data()
    _planned(model, x, y)
    model[1] = nn.BatchNorm1d(6).double()  # training mode: each output reads the whole batch
    with pytest.raises(persample.PersampleError) as err:
        _fast(model, x, y)
    assert err.value.code


def test_train_eval_flip_after_the_first_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double().eval()
    x, y = _data()
    _planned(model, x, y)
    model.train()  # BatchNorm now normalises with the batch's statistics
    with pytest.raises(persample.PersampleError) as err:
        _fast(model, x, y)
    assert err.value.code
    model.eval()
    _assert_oracle(model, x, y)


def test_a_new_input_shape_after_the_first_call():
    model, (x, y) = _mlp(), _data(5)
    _planned(model, x, y)
    _assert_oracle(model, *_data(7))


def test_a_setting_the_fingerprint_does_not_cover_is_asked_again():
    """``Embedding.scale_grad_by_freq`` is read by the rule's ``accepts``, not by the fingerprint."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.tensor([[1, 2, 2], [3, 3, 3], [0, 1, 9], [4, 5, 6]])
    y = torch.tensor([0, 1, 2, 0])
    _planned(model, x, y)
    model[0].scale_grad_by_freq = True  # scaled by the batch's counts: the rule no longer accepts it
    fresh = copy.deepcopy(model)
    with pytest.raises(NotExact) as want:
        _fast(fresh, x, y)
    with pytest.raises(NotExact) as err:
        _fast(model, x, y)
    assert err.value.code == want.value.code


def test_the_plan_does_not_keep_the_model_alive():
    import gc
    import weakref

    model, (x, y) = _mlp(), _data()
    _fast(model, x, y)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


class _TwoTowers(nn.Module):
    """A text tower the batch uses and a vision tower it does not (a text-only batch)."""

    def __init__(self):
        super().__init__()
        self.text = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.vision = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))

    def forward(self, x, image=None):
        out = self.text(x)
        return out if image is None else out + self.vision(image)


@pytest.mark.parametrize("clip_norm", [None, 0.7])
def test_parameters_the_backward_never_reaches_are_exact_zeros(clip_norm):
    torch.manual_seed(0)
    model, (x, y) = _TwoTowers().double(), _data()
    got = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast", inner_products=True, clip_norm=clip_norm)
    want = oracle_stats(model, F.cross_entropy, x, y, clip_norm=clip_norm)
    assert_dicts_close(got.mean, want["mean"], 1e-9, 1e-11)
    assert_dicts_close(got.var, want["var"], 1e-9, 1e-11)
    assert_dicts_close(got.param_sq_norms, want["param_sq_norms"], 1e-9, 1e-11)
    torch.testing.assert_close(got.inner_products, want["inner_products"], rtol=1e-9, atol=1e-11)
    if clip_norm is not None:
        assert_dicts_close(got.clipped_mean, want["clipped_mean"], 1e-9, 1e-11)
    for name in ("vision.0.weight", "vision.2.bias"):
        assert not got.mean[name].any() and not got.var[name].any() and not got.param_sq_norms[name].any()
        assert got.mean[name].dtype == torch.float64


def test_unreached_parameters_form_no_per_example_rows(monkeypatch):
    from persample.engines.fast import engine

    torch.manual_seed(0)
    model, (x, y) = _TwoTowers().double(), _data()
    shapes = []
    real = engine.ZeroPiece._unscaled
    monkeypatch.setattr(engine.ZeroPiece, "_unscaled", lambda self, *a, **k: shapes.append(a) or real(self, *a, **k))
    persample.grad_stats(model, F.cross_entropy, x, y, engine="fast", inner_products=True, clip_norm=0.7)
    assert shapes == []


def test_tracker_steps_reuse_one_plan():
    """The Tracker hooks the model's root for each step (its first forward); the root owns no
    parameter, so the plan is kept, and the statistics stay the oracle's."""
    model, (x, y) = _mlp(), _data()
    tracker = persample.Tracker(model, F.cross_entropy)
    tracker.step(x, y)
    first = plan_module._PLANS[model]
    stats = tracker.step(x, y)
    assert plan_module._PLANS[model] is first
    want = oracle_stats(model, F.cross_entropy, x, y)
    assert_dicts_close(stats.var, want["var"], 1e-9, 1e-11)


def test_a_forward_hook_on_a_container_after_the_first_call_is_seen():
    model, (x, y) = _mlp(), _data()
    _planned(model, x, y)
    model.register_forward_hook(lambda m, args, out: out * 3)  # the root (no parameters): the plan is kept
    _assert_oracle(model, x, y)
