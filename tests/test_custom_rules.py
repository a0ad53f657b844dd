"""register_rule / check_rule: a user's closed form under the built-in rules' assumptions, and one harness
(float64 loop of autograd, random shapes from hypothesis) that every built-in rule also runs through."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import persample
from persample.errors import NotExact
from zoo import assert_dicts_close, oracle_grads

FEW = settings(max_examples=6, deadline=None, derandomize=True)
dims = st.integers(1, 5)
batch = st.integers(2, 5)


@FEW
@given(b=batch, t=st.integers(1, 4), d=dims, p=dims, bias=st.booleans())
def test_linear_rule_through_the_harness(b, t, d, p, bias):
    torch.manual_seed(0)
    assert persample.check_rule(nn.Linear(d, p, bias=bias), torch.randn(b, t, d)).rule == "linear"
    assert persample.check_rule(nn.Linear(d, p, bias=bias), torch.randn(b, d)).rule == "linear"


@FEW
@given(
    b=batch, c=dims, o=dims, k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 1), two_d=st.booleans()
)
def test_conv_rule_through_the_harness(b, c, o, k, stride, pad, two_d):
    torch.manual_seed(0)
    conv = (nn.Conv2d if two_d else nn.Conv1d)(c, o, k, stride=stride, padding=pad)
    x = torch.randn(b, c, *((k + 3, k + 2) if two_d else (k + 4,)))
    assert persample.check_rule(conv, x).rule == "conv"


@FEW
@given(b=batch, t=st.integers(1, 4), v=st.integers(2, 9), d=dims)
def test_embedding_rule_through_the_harness(b, t, v, d):
    torch.manual_seed(0)
    assert persample.check_rule(nn.Embedding(v, d), torch.randint(0, v, (b, t))).rule == "embedding"


@FEW
@given(b=batch, t=st.integers(1, 4), d=st.integers(2, 6), kind=st.sampled_from(["layer", "rms", "group", "bn"]))
def test_norm_rules_through_the_harness(b, t, d, kind):
    torch.manual_seed(0)
    if kind == "layer":
        module, x, rule = nn.LayerNorm(d), torch.randn(b, t, d), "layer_norm"
    elif kind == "rms":
        module, x, rule = nn.RMSNorm(d), torch.randn(b, t, d), "layer_norm"
    elif kind == "group":
        module, x, rule = nn.GroupNorm(1 if d % 2 else 2, d), torch.randn(b, d, t + 1), "group_norm"
    else:
        module, x, rule = nn.BatchNorm1d(d), torch.randn(b, d, t + 1), "batch_norm_eval"
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
        module.eval()
    with torch.no_grad():  # affine parameters away from their initial values
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    assert persample.check_rule(module, x).rule == rule


def test_hf_conv1d_rule_through_the_harness():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(5, 3)
    assert persample.check_rule(conv, torch.randn(4, 2, 3)).rule == "hf_conv1d"


class Scale(nn.Module):
    """y = x ∘ w over the last dim: g_i = Σ_t x_it ∘ δ_it."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w


def _scale_rule(module, x, gy):
    return {"w": (x * gy).reshape(len(x), -1, x.shape[-1]).sum(1)}


@pytest.fixture
def scale_rule():
    persample.register_rule(Scale, _scale_rule, params=("w",))
    yield
    persample.unregister_rule(Scale)


@FEW
@given(b=batch, t=st.integers(1, 4), d=dims)
def test_a_registered_rule_through_the_harness(b, t, d):
    persample.register_rule(Scale, _scale_rule, params=("w",))
    try:
        torch.manual_seed(0)
        assert persample.check_rule(Scale(d), torch.randn(b, t, d)).rule == "Scale"
    finally:
        persample.unregister_rule(Scale)


def test_a_registered_rule_is_used_inside_a_model_and_exact(scale_rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    report = persample.explain(model, F.mse_loss, x, y)
    assert [m.treatment for m in report.modules][1] == "rule: Scale"
    stats = persample.grad_stats(model, F.mse_loss, x, y, engine="fast")
    grads, _ = oracle_grads(model, F.mse_loss, x, y)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()})
    assert_dicts_close(stats.param_sq_norms, {k: g.reshape(6, -1).pow(2).sum(1) for k, g in grads.items()})


def test_a_wrong_rule_is_refused_on_every_call():
    persample.register_rule(Scale, lambda m, x, gy: {"w": 2 * _scale_rule(m, x, gy)["w"]}, params=("w",))
    try:
        with pytest.raises(NotExact) as info:  # the sum check refuses it before any number comes out
            persample.check_rule(Scale(3), torch.randn(4, 3))
        assert info.value.code == "CUSTOM_RULE_SUM_MISMATCH"
    finally:
        persample.unregister_rule(Scale)


def test_a_rule_wrong_only_in_its_spread_is_caught_by_the_harness():
    """g_i + c_i with Σ_i c_i = 0 passes the sum check; the harness's variance and norms catch it."""

    def shifted(m, x, gy):
        g = _scale_rule(m, x, gy)["w"]
        return {"w": g + torch.linspace(-1, 1, len(g), dtype=g.dtype)[:, None]}

    persample.register_rule(Scale, shifted, params=("w",))
    try:
        with pytest.raises(AssertionError, match="var differs from the float64 oracle"):
            persample.check_rule(Scale(3), torch.randn(5, 3))
    finally:
        persample.unregister_rule(Scale)


def test_a_rule_of_the_wrong_shape_is_refused_not_used(scale_rule):
    persample.register_rule(Scale, lambda m, x, gy: {"w": (x * gy)[:1]}, params=("w",))
    torch.manual_seed(0)
    model = nn.Sequential(Scale(3), nn.Linear(3, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(NotExact) as info:
        persample.grad_stats(model, F.mse_loss, x, y, engine="fast")
    assert info.value.code == "RULE_NOT_APPLICABLE"
    auto = persample.grad_stats(model, F.mse_loss, x, y)
    grads, _ = oracle_grads(model, F.mse_loss, x, y)
    assert_dicts_close(auto.mean, {k: g.mean(0) for k, g in grads.items()})


def test_a_subclass_with_its_own_forward_takes_the_fallback(scale_rule):
    class ShiftedScale(Scale):
        def forward(self, x):
            return (x + 1) * self.w

    with pytest.raises(NotExact) as info:
        persample.check_rule(ShiftedScale(3), torch.randn(4, 3))
    assert info.value.code == "RULE_NOT_APPLICABLE" and "its own forward" in str(info.value)


def test_unregistered_the_module_takes_the_fallback_again(scale_rule):
    persample.unregister_rule(Scale)
    torch.manual_seed(0)
    report = persample.explain(Scale(3), lambda out, t: (out * t).sum(), torch.randn(4, 3), torch.randn(4, 3))
    assert report.modules[0].treatment.startswith("fallback")
    persample.unregister_rule(nn.Linear)  # a built-in rule cannot be removed
    assert persample.check_rule(nn.Linear(2, 2), torch.randn(3, 2)).rule == "linear"


def test_bad_registrations():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        persample.register_rule(int, _scale_rule)
    with pytest.raises(TypeError, match="callable"):
        persample.register_rule(Scale, None)
    with pytest.raises(ValueError, match="params"):
        persample.register_rule(Scale, _scale_rule, params=())
