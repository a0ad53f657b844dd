"""A Tracker step with a standard loss reads the batch loss's weights over the per-example losses off the
loss's form (w_i = D_i / Σ_j D_j, ``losses.example_weights``) instead of evaluating the loss again and
differentiating it at the output (``batch_loss._weights_of_form``).

The weights must be those the derivation finds, ``p.grad`` what ``loss.backward()`` gives, and every
outcome of the check (a diverged step, an example whose targets are all ignored) the same as before.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample._batch import as_batch
from persample.batch_loss import BatchLoss, NonFiniteExampleLoss, weights_at_output
from persample.engines.fast.engine import fast_pieces

CLASSES = 5


def _class_weights():
    return torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)


def _classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()


def _tokens():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 11)).double()


class _LogSoftmaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _classifier()

    def forward(self, x):
        return self.body(x).log_softmax(-1)


def _padded(tokens: torch.Tensor) -> torch.Tensor:
    """Labels with the padding of each row ignored: row i keeps its first 2 + i tokens (row 0 keeps 2)."""
    labels = tokens.clone()
    for i in range(labels.shape[0]):
        labels[i, 2 + i :] = -100
    return labels


def _classification(loss_fn, targets=None):
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (6,)) if targets is None else targets
    return _classifier(), loss_fn, x, y


def _cases():
    """name → (model, loss_fn, inputs, targets): each loss a traced standard loss with a closed form."""
    torch.manual_seed(1)
    ignored = torch.tensor([[0, -100, 3], [1, 1, -100], [4, 2, 2], [-100, -100, 0], [3, 0, 1], [2, -100, 4]])
    tokens = torch.randint(0, 11, (5, 7))
    labels = _padded(tokens)
    weights = _class_weights()
    weights11 = torch.linspace(0.5, 2, 11).double()
    positive = torch.full((3,), 2.0).double()  # (made outside the loss: an op inside it is not the standard loss)

    def shifted(out, t):
        return F.cross_entropy(out[:, :-1].flatten(0, 1), t[:, 1:].flatten())

    regression = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x3, y3 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    return {
        "cross_entropy": _classification(F.cross_entropy),
        "module_loss": _classification(nn.CrossEntropyLoss()),
        "ignore_index": (_tokens(), lambda o, t: F.cross_entropy(o.transpose(1, 2), t), ignored % 11, ignored),
        "class_weights": _classification(lambda o, t: F.cross_entropy(o, t, weight=weights)),
        "label_smoothing": _classification(lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1)),
        "all_options": (
            _tokens(),
            lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), weight=weights11, label_smoothing=0.2),
            ignored % 11,
            ignored,
        ),
        "nll": (_LogSoftmaxHead().double(), F.nll_loss, torch.randn(6, 4, dtype=torch.float64), ignored[:, 0] % 5),
        "next_token": (_tokens(), shifted, tokens, tokens),
        "padded_next_token": (_tokens(), shifted, tokens, labels),
        "token_class_weights": (
            _tokens(),
            lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten(), weight=weights11),
            tokens,
            labels,
        ),
        "mse": (regression, F.mse_loss, x3, y3),
        "l1": (copy.deepcopy(regression), nn.L1Loss(), x3, y3),
        "bce": (
            copy.deepcopy(regression),
            lambda o, t: F.binary_cross_entropy_with_logits(o, t, pos_weight=positive),
            x3,
            (y3 > 0).double(),
        ),
    }


NAMES = list(_cases())


@pytest.mark.parametrize("name", NAMES)
def test_the_weights_of_the_form_are_the_derived_weights(name):
    model, loss_fn, x, y = _cases()[name]
    kept: list = []
    fast_pieces(model, loss_fn, as_batch(x, y), keep_output=kept, closed_form_at_output=True)
    output, standard, at_output = kept
    assert standard and at_output is not None and at_output.form is not None
    by_form, leaves = weights_at_output(loss_fn, loss_fn, output, y, x.shape[0], at_output=at_output)
    derived, derived_leaves = weights_at_output(loss_fn, loss_fn, output, y, x.shape[0])
    torch.testing.assert_close(by_form, derived, rtol=1e-12, atol=1e-15)
    assert leaves == derived_leaves == [0]


def _two_steps(model, loss_fn, inputs, targets, counted: list) -> int:
    """Two ``Tracker.step`` calls (the first runs the plan's checks), ``counted`` emptied between them; how
    many handed statistics to the hooks."""
    tracker = persample.Tracker(model, loss_fn, engine="fast")
    seen = []
    tracker.register_hook(lambda _, stats: seen.append(stats))
    tracker.step(inputs, targets)
    model.zero_grad()
    counted.clear()
    tracker.step(inputs, targets)
    return len(seen)


@pytest.mark.parametrize("name", ["next_token", "padded_next_token", "mse"])
def test_where_the_form_suffices_no_gradient_at_the_output_is_kept(name):
    """With ``form_suffices`` (the Tracker's batch loss is the loss itself), the backward is not asked for the
    gradient at the output: a [B, T, V] tensor that stayed alive to the end of the step (it did, before)."""
    model, loss_fn, x, y = _cases()[name]
    kept: list = []
    fast_pieces(model, loss_fn, as_batch(x, y), keep_output=kept, closed_form_at_output=True, form_suffices=True)
    at_output = kept[2]
    assert at_output.form is not None and at_output.mean_grads == {}
    kept.clear()
    fast_pieces(model, loss_fn, as_batch(x, y), keep_output=kept, closed_form_at_output=True)
    assert set(kept[2].mean_grads) == {0}  # (a BatchLoss with another batch loss derives its weights from it)


@pytest.mark.parametrize("name", NAMES)
def test_a_tracker_step_evaluates_the_standard_loss_once_and_p_grad_is_the_backwards(name):
    model, loss_fn, x, y = _cases()[name]
    reference = copy.deepcopy(model)
    calls = []

    def counted(out, t):
        calls.append(1)
        return loss_fn(out, t)

    assert _two_steps(model, counted, x, y, calls) == 2
    assert len(calls) == 1  # the engine's trace of the loss; the check no longer evaluates it again (it did: 2)
    loss_fn(reference(x), y).backward()
    for (k, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=k)


def test_a_batch_loss_other_than_the_per_example_loss_is_still_derived():
    """BatchLoss(batch=a sum, per_example=a mean): the form is the per-example loss's, not the batch's."""
    model, _, x, y = _classification(F.cross_entropy)
    reference = copy.deepcopy(model)

    def total(out, t):
        return F.cross_entropy(out, t, reduction="sum")

    tracker = persample.Tracker(model, BatchLoss(total, per_example=F.cross_entropy), engine="fast")
    tracker.step(x, y)
    total(reference(x), y).backward()
    for (k, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=k)


def test_an_example_whose_targets_are_all_ignored_is_refused_as_before():
    model, tokens = _tokens(), torch.randint(0, 11, (4, 6))
    labels = tokens.clone()
    labels[2, 1:] = -100  # example 2's only counted target (position 0) is cut by the shift

    def shifted(out, t):
        return F.cross_entropy(out[:, :-1].flatten(0, 1), t[:, 1:].flatten())

    with pytest.raises(NonFiniteExampleLoss, match=r"examples \[2\] .*EXAMPLE_LOSS_NOT_FINITE"):
        persample.Tracker(model, shifted, engine="fast").step(tokens, labels)


@pytest.mark.parametrize("why", ["every_target_ignored", "output_not_finite"])
def test_a_step_whose_batch_loss_is_not_finite_is_skipped_with_the_backwards_p_grad(why):
    model, _, x, y = _classification(F.cross_entropy)
    reference = copy.deepcopy(model)
    if why == "every_target_ignored":
        y = torch.full_like(y, -100)
    else:
        x = x.clone()
        x[3, 0] = float("inf")
    tracker = persample.Tracker(model, F.cross_entropy, engine="fast")
    seen = []
    tracker.register_hook(lambda _, stats: seen.append(stats))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tracker.step(x, y)
    assert seen == [] and tracker.skipped == [0]
    F.cross_entropy(reference(x), y).backward()
    for (k, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, equal_nan=True, msg=k)


# ------------------------------------------------------------------ weights that differ between examples


class _Scaled(nn.Module):
    """A parameter used outside any rule (``x * s``): a fallback unit, whose piece is per example."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return torch.tanh(x) * self.scale


def _padded_hf(family: str, own: bool, head: str = "ForCausalLM"):
    from real_models import PAD_ID, hf_model, own_loss_in_float64, padded, padding_mask, tokens

    model = hf_model(family, head)
    mask = padding_mask("right")
    ids, labels = padded(tokens(), tokens(), mask, PAD_ID[family])
    if not own:
        return model, _shifted_ce, {"input_ids": ids, "attention_mask": mask}, labels
    own_loss_in_float64(model, family)
    return model, lambda out: out.loss, {"input_ids": ids, "attention_mask": mask, "labels": labels}, None


def _shifted_ce(out, labels):
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _unequal_cases():
    """name → (model, loss_fn, inputs, targets), float64, with weights w_i that differ between examples."""
    torch.manual_seed(2)
    tokens = torch.randint(0, 11, (5, 7))
    weights = _class_weights()
    lstm = nn.Sequential(nn.Embedding(11, 6), nn.LSTM(6, 6, batch_first=True))

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = lstm, nn.Linear(6, 11)

        def forward(self, x):
            return self.head(self.body(x)[0])

    conv = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16, CLASSES))
    return {
        "padded_tokens": lambda: (_tokens(), _shifted_ce, tokens, _padded(tokens)),
        "class_weights": lambda: _classification(lambda o, t: F.cross_entropy(o, t, weight=weights)),
        "fallback_unit": lambda: (
            nn.Sequential(nn.Embedding(11, 6), _Scaled(6), nn.Linear(6, 11)).double(),
            _shifted_ce,
            tokens,
            _padded(tokens),
        ),
        "recurrent": lambda: (Recurrent().double(), _shifted_ce, tokens, _padded(tokens)),
        "conv_class_weights": lambda: (
            conv.double(),
            lambda o, t: F.cross_entropy(o, t, weight=weights),
            torch.randn(6, 3, 6, dtype=torch.float64),
            torch.randint(0, CLASSES, (6,)),
        ),
        "gpt2_padded": lambda: _padded_hf("gpt2", own=False),
        "gpt2_own_loss_padded": lambda: _padded_hf("gpt2", own=True),
        "llama_own_loss_padded": lambda: _padded_hf("llama", own=True),
        "bert_masked_lm_own_loss_padded": lambda: _padded_hf("bert", own=True, head="ForMaskedLM"),
        "mixtral_own_loss_padded": lambda: _padded_hf("mixtral", own=True),
        "t5_own_loss_padded": lambda: _padded_hf("t5", own=True, head="ForConditionalGeneration"),
    }


UNEQUAL = list(_unequal_cases())


def _batch_loss(model, loss_fn, inputs, targets):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return loss_fn(out) if targets is None else loss_fn(out, targets)


@pytest.mark.parametrize("name", UNEQUAL)
def test_weights_that_differ_give_the_backwards_p_grad_from_one_forward(name):
    """p.grad = Σ_i w_i g_i from the engine's own pieces: no second forward and backward (there was one, a
    whole plain step, on every padded batch of a token-mean loss)."""
    if name.startswith(("gpt2", "llama", "bert", "mixtral", "t5")):
        pytest.importorskip("transformers")
    from real_models import float64_default

    with float64_default():
        model, loss_fn, inputs, targets = _unequal_cases()[name]()
    model = model.double()
    reference = copy.deepcopy(model)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    assert _two_steps(model, loss_fn, inputs, targets, forwards) == 2
    assert len(forwards) == 1  # (2 on the old code: the plain step after the statistics)
    _batch_loss(reference, loss_fn, inputs, targets).backward()
    # Llama's and Mixtral's RMSNorm and T5's layer norm compute in float32 even in a float64 model: there
    # loss.backward() itself is 6e-8 from the float64 loop oracle, and Σ_i w_i g_i, which scales the examples'
    # gradients after that arithmetic instead of before, is as far (1e-7): the model's rounding, not the method's.
    # Relative to the largest element of any gradient: a BERT key bias's gradient is 0 up to rounding
    tolerance = 1e-6 if name.startswith(("llama", "mixtral", "t5")) else 1e-11
    scale = max(q.grad.abs().max() for q in reference.parameters() if q.grad is not None)
    for (k, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad - q.grad).abs().max() <= tolerance * scale, k


# ------------------------------------------------------------------ observe, where the caller backwards the loss


def _observed(model, loss_fn, x, y, scale=None):
    """observing() around ``scale · loss_fn(model(x), y)``.backward(); ``loss_scale`` set where ``scale`` is
    given (the caller backwards the loss itself, as Tracker.step under FSDP2 does)."""
    from persample.engines.fast.observe import observing

    with observing(model, loss_fn, y, batch_size=x.shape[0]) as observation:
        loss = loss_fn(model(x), y) * (1.0 if scale is None else scale)
        observation.loss_scale = scale
        loss.backward()
    return observation


@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("name", ["cross_entropy", "label_smoothing", "next_token", "mse", "bce"])
def test_observe_reads_the_weight_of_a_loss_it_knows_off_the_form(name, scale, monkeypatch):
    import persample.engines.fast.observe as observe_module

    derivations = []
    original = observe_module.derive_weights
    monkeypatch.setattr(observe_module, "derive_weights", lambda *a, **k: derivations.append(1) or original(*a, **k))
    model, loss_fn, x, y = _cases()[name]
    by_form = _observed(copy.deepcopy(model), loss_fn, x, y, scale)
    assert derivations == []
    derived = _observed(copy.deepcopy(model), loss_fn, x, y)
    assert derivations == [1]
    assert by_form.weight == pytest.approx(derived.weight * scale, rel=1e-12)
    for field in ("mean", "m2", "param_sq_norms"):
        for k, v in getattr(derived.stats, field).items():
            torch.testing.assert_close(getattr(by_form.stats, field)[k], v, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(by_form.stats.losses, derived.stats.losses, rtol=1e-12, atol=0)


def test_observe_of_a_known_loss_whose_weights_differ_is_refused_as_before():
    from persample.errors import ObservationError

    model, loss_fn, x, y = _cases()["padded_next_token"]
    for scale in (1.0, None):
        with pytest.raises(ObservationError, match="OBSERVE_WEIGHTS_DIFFER"):
            _observed(copy.deepcopy(model), loss_fn, x, y, scale)


def test_observe_of_a_loss_without_a_form_still_derives_its_weight(monkeypatch):
    import persample.engines.fast.observe as observe_module

    derivations = []
    original = observe_module.derive_weights
    monkeypatch.setattr(observe_module, "derive_weights", lambda *a, **k: derivations.append(1) or original(*a, **k))
    model, _, x, y = _cases()["cross_entropy"]

    def through_log_softmax(out, t):  # (another op: not a standard loss's call)
        return F.nll_loss(out.log_softmax(-1), t)

    observation = _observed(model, through_log_softmax, x, y, 1.0)
    assert derivations == [1] and observation.weight == pytest.approx(1 / x.shape[0], rel=1e-12)
