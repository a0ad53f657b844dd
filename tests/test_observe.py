"""Tracker.observe: statistics from the user's own loss.backward(), never silently wrong."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import ObservationError

from oracle_stats import oracle_stats
from zoo import CASE_IDS, CASES, assert_dicts_close, call_model, oracle_grads


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_observed_backward_gives_the_oracle_statistics(case):
    model, x, y = case.instantiate(batch=5)
    want = oracle_stats(model, case.loss_fn, x, y)  # the float64 loop of autograd
    tracker = persample.Tracker(model, case.loss_fn, inner_products=True)
    with tracker.observe(y) as observed:
        case.loss_fn(call_model(model, x), y).backward()
    stats = observed.stats
    assert_dicts_close(stats.mean, want["mean"])
    assert_dicts_close(stats.var, want["var"], atol=1e-11)
    assert_dicts_close(stats.param_sq_norms, want["param_sq_norms"])
    torch.testing.assert_close(stats.inner_products, want["inner_products"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.losses, want["losses"], rtol=1e-9, atol=1e-12)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(b=6):
    return torch.randn(b, 4, dtype=torch.float64), torch.randint(0, 3, (b,))


def test_sum_reduction_declared_and_used():
    model, (x, y) = _mlp(), _batch()
    want = oracle_stats(model, F.cross_entropy, x, y)
    tracker = persample.Tracker(model, F.cross_entropy)
    with tracker.observe(y, reduction="sum") as observed:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    assert_dicts_close(observed.stats.var, want["var"])
    assert_dicts_close(observed.stats.mean, want["mean"])
    assert_dicts_close(
        {n: p.grad for n, p in model.named_parameters()}, {n: 6 * m for n, m in want["mean"].items()}
    )  # p.grad = (w·B)·mean, w = 1


@pytest.mark.parametrize(
    "declared, used, hint", [("mean", "sum", "reduction='sum'"), ("sum", "mean", "reduction='mean'")]
)
def test_a_wrong_reduction_is_detected_not_silent(declared, used, hint):
    model, (x, y) = _mlp(), _batch()
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(ObservationError, match=hint):
        with tracker.observe(y, reduction=declared):
            F.cross_entropy(model(x), y, reduction=used).backward()


def test_a_loss_with_extra_terms_is_detected():
    model, (x, y) = _mlp(), _batch()
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(ObservationError, match="do not add up to the change in its p.grad"):
        with tracker.observe(y):
            loss = F.cross_entropy(model(x), y) + 0.1 * model[0].weight.pow(2).sum()
            loss.backward()


def test_accumulates_on_existing_grads_and_every_k():
    model, (x, y) = _mlp(), _batch()
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    old = {n: p.grad.clone() for n, p in model.named_parameters()}
    want = oracle_stats(model, F.cross_entropy, x, y)
    tracker = persample.Tracker(model, F.cross_entropy, every=2)
    seen = []
    tracker.register_hook(lambda t, s: seen.append(s))
    with tracker.observe(y) as first:
        F.cross_entropy(model(x), y).backward()
    assert_dicts_close(
        {n: p.grad for n, p in model.named_parameters()}, {n: old[n] + want["mean"][n] for n in old}
    )  # old + mean
    with tracker.observe(y) as second:
        F.cross_entropy(model(x), y).backward()
    assert_dicts_close(
        {n: p.grad for n, p in model.named_parameters()}, {n: old[n] + 2 * want["mean"][n] for n in old}
    )  # a step without statistics too
    assert_dicts_close(first.stats.var, want["var"])
    assert_dicts_close(first.stats.mean, want["mean"])
    assert second.stats is None and tracker.steps == 2 and seen == [first.stats]


def test_misuse_is_explained():
    model, (x, y) = _mlp(), _batch()
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(ObservationError, match="no forward of the model reached a backward"):
        with tracker.observe(y):
            model(x)
    with pytest.raises(ValueError, match="reduction must be one of"):
        with tracker.observe(y, reduction="max"):
            pass
    with pytest.raises(ValueError, match="needs the batch size"):
        with tracker.observe():
            pass
    with pytest.raises(ValueError, match="cannot clip"):
        with persample.Tracker(model, F.cross_entropy, clip_norm=1.0).observe(y):
            pass


def test_hooks_are_removed_when_the_block_raises():
    model, (x, y) = _mlp(), _batch()
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(KeyError):
        with tracker.observe(y):
            model(x)
            raise KeyError("user code failed")
    assert all(not m._forward_hooks for m in model.modules())
    assert tracker.steps == 0


def test_an_extra_term_on_a_large_layer_is_detected():
    """Large weights are checked through random probes rather than whole: still caught."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 3))
    x, y = torch.randn(16, 64), torch.randint(0, 3, (16,))
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(ObservationError, match="'0.weight' do not add up"):
        with tracker.observe(y):
            loss = F.cross_entropy(model(x), y) + 1e-3 * model[0].weight.pow(2).sum()
            loss.backward()


def test_a_second_backward_inside_the_block_is_detected():
    """Output gradients add up over backward passes as p.grad does. A declared reduction='mean' then
    fails instead of giving 4x the variance; undeclared, the weight 2/B is read off the backward and the
    statistics are still those of the per-example gradients."""
    model, (x, y) = _mlp(), _batch()
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(ObservationError, match="does not match reduction='mean'"):
        with tracker.observe(y, reduction="mean"):
            loss = F.cross_entropy(model(x), y)
            loss.backward(retain_graph=True)
            loss.backward()
    model.zero_grad()
    want = oracle_stats(model, F.cross_entropy, x, y)
    with tracker.observe(y) as observed:
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)
        loss.backward()
    assert_dicts_close(observed.stats.var, want["var"])
    assert_dicts_close(observed.stats.mean, want["mean"])


class _WithAuxiliary(nn.Module):
    """Keeps its hidden activation (and an auxiliary term computed in forward) for the loop's loss."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux_head = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        self.hidden = torch.tanh(self.a(x))
        self.penalty = self.hidden.pow(2).mean()
        return self.b(self.hidden)


AUXILIARY_TERMS = {
    "activation penalty": lambda m, y: 0.1 * m.hidden.pow(2).mean(),
    "auxiliary head": lambda m, y: 0.3 * F.cross_entropy(m.aux_head(m.hidden), y),
    "term computed in forward": lambda m, y: 0.1 * m.penalty,
}


@pytest.mark.parametrize("term", sorted(AUXILIARY_TERMS))
def test_a_loss_with_a_term_on_a_hidden_activation_is_refused(term):
    """Deep supervision, an auxiliary head, an activation or load-balancing penalty: the term's gradient
    enters the layers below the activation, and p.grad has it too, so neither the output-gradient nor the
    p.grad check saw it, and the statistics described the gradient of the whole sum (mean off by 17–96 %)."""
    torch.manual_seed(0)
    model, (x, y) = _WithAuxiliary().double(), _batch()
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(ObservationError, match="activation of the model other than its output.*test_observe.py"):
        with tracker.observe(y):
            (F.cross_entropy(model(x), y) + AUXILIARY_TERMS[term](model, y)).backward()


def test_reading_a_hidden_activation_without_backwarding_it_is_fine():
    torch.manual_seed(0)
    model, (x, y) = _WithAuxiliary().double(), _batch()
    tracker = persample.Tracker(model, F.cross_entropy)
    with tracker.observe(y) as observed:
        loss = F.cross_entropy(model(x), y)
        activation_norm = model.hidden.norm()  # logged, not backwarded
        loss.backward()
    assert torch.isfinite(activation_norm)
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    assert_dicts_close(observed.stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-11)


def test_reentrant_checkpointing_is_exact_and_leaves_no_mode_behind():
    """With checkpoint(..., use_reentrant=True) observe crashed with torch's 'trying to pop from empty mode
    stack' (a watcher entered inside the checkpoint's recomputation was dropped by torch), on this and on every
    later observe; then it refused (REENTRANT_CHECKPOINT). Now it follows the recomputation: the statistics are
    the oracle's (of the same model run without checkpointing), and torch's mode stack is left as found
    (more in tests/test_observe_reentrant.py)."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.block, self.c = nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.c(checkpoint(self.block, h, use_reentrant=True) if self.checkpointed else self.block(h))

    torch.manual_seed(0)
    model, (x, y) = Checkpointed().double(), _batch()
    tracker = persample.Tracker(model, F.cross_entropy)
    model.checkpointed = False  # the oracle's autograd.grad is refused by re-entrant checkpointing
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    model.checkpointed = True
    for _ in range(2):
        with tracker.observe(y) as observed:
            F.cross_entropy(model(x), y).backward()
        assert _get_current_function_mode_stack() == []
        assert_dicts_close(observed.stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-11)
