"""Exact or refuse: the engine guards, one class of silent error at a time.

Each test here failed (a wrong number or an unclear crash) before the guard it
names existed. The real-model matrix (``test_real_models.py``) runs the same
classes on Hugging Face, PEFT and timm-style models; these are the minimal cases.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.engines.fast.rules import find_rule

from zoo import assert_dicts_close, gpt2_tiny, lm_loss, oracle_grads


def _oracle_stats(model, loss_fn, x, y):
    grads, losses = oracle_grads(model, loss_fn, x, y)
    return (
        {k: g.mean(0) for k, g in grads.items()},
        {k: g.var(0) for k, g in grads.items()},
        {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()},
        losses,
    )


def _assert_exact(stats, model, loss_fn, x, y):
    mean, var, sq, losses = _oracle_stats(model, loss_fn, x, y)
    assert_dicts_close(stats.mean, mean)
    assert_dicts_close(stats.var, var)
    assert_dicts_close(stats.param_sq_norms, sq)
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------- rule contract


class ScaledLinear(nn.Linear):
    """An equalised-learning-rate Linear: same parameters, different function."""

    def forward(self, x):
        return F.linear(x, self.weight * 0.1, self.bias)


def test_a_rule_applies_only_to_the_forward_it_was_written_for():
    assert find_rule(nn.Linear(3, 2)) is not None
    assert find_rule(ScaledLinear(3, 2)) is None
    patched = nn.Linear(3, 2)
    patched.forward = lambda x: F.linear(x, patched.weight * 2)
    assert find_rule(patched) is None
    hooked = nn.Linear(3, 2)
    hooked.register_forward_hook(lambda m, a, out: out * 2)
    assert find_rule(hooked) is None


def test_subclass_with_its_own_forward_is_exact_in_the_fast_engine():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast"), model, F.cross_entropy, x, y)


def test_forward_hook_that_rescales_an_output_is_honoured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model[0].register_forward_hook(lambda m, a, out: out * 2)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast"), model, F.cross_entropy, x, y)


def test_parameter_gradient_hook_is_refused_by_vmap_and_honoured_by_fast_and_auto():
    """vmap refuses a parameter's hook; the fast engine applies it to each example's gradient (a Linear's
    rule forms them), as the loop does; a hook on a module without a rule sends auto to the loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model[0].weight.register_hook(lambda g: g * 0.5)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(persample.NotExact, match=r"'0.weight' has a gradient hook"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="vmap")
    _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast"), model, F.cross_entropy, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", persample.SlowPathWarning)
        stats = persample.grad_stats(model, F.cross_entropy, x, y)
    _assert_exact(stats, model, F.cross_entropy, x, y)
    model[1] = nn.PReLU().double()  # no closed-form rule: its hooked weight's rows are not formed
    model[1].weight.register_hook(lambda g: g * 0.5)
    with pytest.raises(persample.NotExact, match=r"'1.weight' has a gradient hook.*no built-in closed-form rule"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    with pytest.warns(persample.SlowPathWarning, match="per-example loop"):
        stats = persample.grad_stats(model, F.cross_entropy, x, y)
    _assert_exact(stats, model, F.cross_entropy, x, y)


# ------------------------------------------------------------------- per-example losses


class ComputesItsOwnLoss(nn.Module):
    """Returns (logits, the batch's mean loss), as Hugging Face models do with labels=."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x, labels):
        logits = self.lin(x)
        return logits, F.cross_entropy(logits, labels)


def test_a_loss_the_model_computed_for_the_batch_is_never_broadcast():
    torch.manual_seed(0)
    model = ComputesItsOwnLoss().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    own_loss = lambda out: out[1]  # noqa: E731
    with pytest.raises(persample.NotExact, match="shared by the whole batch"):
        persample.grad_stats(model, own_loss, (x, y), engine="fast")
    stats = persample.grad_stats(model, own_loss, (x, y))
    grads, losses = oracle_grads(model, own_loss, (x, y))
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()})
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- randomness


def test_same_randomness_draws_one_mask_for_every_example_in_the_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    state = torch.random.get_rng_state()
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="loop", randomness="same")
    rows = []
    for i in range(4):  # the oracle: every example starts from the same generator state
        torch.random.set_rng_state(state)
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, [model[0].weight])[0])
    torch.testing.assert_close(stats.mean["0.weight"], torch.stack(rows).mean(0), rtol=1e-9, atol=1e-12)
    with pytest.raises(persample.NotExact, match="randomness='same'"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast", randomness="same")


# ------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("ratio", [1e3, 1e4])
def test_variance_has_no_catastrophic_cancellation_in_float32(ratio):
    """|ḡ|/σ = ratio per element: Σg² − Bḡ² in float32 loses every digit at 1e4."""
    torch.manual_seed(0)
    B, d = 64, 16
    x = 1.0 + torch.randn(B, d) / ratio  # nearly the same input for every example
    model = nn.Linear(d, 1, bias=False)
    y = torch.full((B, 1), -5.0)  # a large, nearly constant output gradient
    stats = persample.grad_stats(model, F.mse_loss, x, y, engine="fast")
    model64 = nn.Linear(d, 1, bias=False).double()
    model64.load_state_dict(model.state_dict())
    grads, _ = oracle_grads(model64, F.mse_loss, x.double(), y.double())
    exact = grads["weight"].var(0)
    relative = ((stats.var["weight"].double() - exact).abs() / exact).max().item()  # every element
    assert relative < 1e-3, relative


# ------------------------------------------------------------------------ clear messages


def test_inference_mode_says_where_to_call():
    model, x, y = nn.Linear(3, 2), torch.randn(4, 3), torch.randint(0, 2, (4,))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside the .*inference_mode"):
        persample.grad_stats(model, F.cross_entropy, x, y)


def test_the_loop_is_the_only_engine_that_warns():
    torch.manual_seed(0)
    model, x, y = nn.Linear(3, 2).double(), torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for engine in ("auto", "fast", "vmap", "loop"):
            _assert_exact(
                persample.grad_stats(model, F.cross_entropy, x, y, engine=engine), model, F.cross_entropy, x, y
            )


def test_observe_on_an_empty_batch_says_so():
    model = nn.Linear(3, 2)
    tracker = persample.Tracker(model, F.cross_entropy)
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one example"):
        with tracker.observe(empty):
            F.cross_entropy(model(torch.zeros(0, 3)), empty).backward()


@pytest.mark.parametrize("engine", ["auto", "fast", "vmap", "loop"])
def test_keyword_options_without_tensors_are_passed_through(engine):
    """``use_cache=False`` and friends reach every call of the model, batched or per example."""
    torch.manual_seed(0)
    model = gpt2_tiny().double()
    tokens = torch.randint(0, 40, (3, 6))
    inputs = {"input_ids": tokens, "use_cache": False, "return_dict": True}
    stats = persample.grad_stats(model, lm_loss, inputs, tokens, engine=engine)
    grads, losses = oracle_grads(model, lm_loss, {"input_ids": tokens}, tokens)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)
    if engine == "auto":
        tracker = persample.Tracker(model, lm_loss)
        tracker.step(inputs, tokens)
        assert_dicts_close({n: p.grad for n, p in model.named_parameters()}, {k: g.mean(0) for k, g in grads.items()})


class ChangedAfterTheCall(nn.Module):
    """A Linear on a sequence, then ``mul_`` on its ``changed`` tensor: its ``"output"`` (a view of its
    matmul, so the base is rewritten) or its ``"input"`` (its weight's g_i are formed by the engine, so
    autograd never needs that input)."""

    def __init__(self, changed: str):
        super().__init__()
        self.proj, self.head, self.changed = nn.Linear(5, 4), nn.Linear(4, 3), changed

    def forward(self, x):
        y = self.proj(x)
        (y if self.changed == "output" else x).mul_(2.0)
        return self.head(torch.relu(y).mean(1))


def test_output_view_modified_in_place_is_refused_by_fast_and_exact_in_auto():
    torch.manual_seed(0)
    model = ChangedAfterTheCall("output").double()
    x, y = torch.randn(6, 3, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(persample.NotExact, match="proj .*modified in place"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    _assert_exact(persample.grad_stats(model, F.cross_entropy, x, y), model, F.cross_entropy, x, y)
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(persample.NotExact, match="modified in place"):
        with tracker.observe(y):
            F.cross_entropy(model(x), y).backward()


def test_an_input_changed_in_place_after_the_call_is_refused_not_used():
    """The captured input is not what the module computed with: never form g_i from it. (Autograd's
    own backward refuses such a model when it reads the saved input.)"""
    torch.manual_seed(0)
    model = ChangedAfterTheCall("input").double()
    x, y = torch.randn(6, 9, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(persample.NotExact, match="input or a parameter of module proj .*modified in place"):
        persample.grad_stats(model, F.cross_entropy, x.clone(), y, engine="fast")
