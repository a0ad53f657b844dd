"""Batch losses that are not the mean of per-example losses: ℓ = Σ_i w_i L_i.

p.grad must equal the loop's own backward on every step (statistics steps and plain steps), the
statistics must describe the documented per-example gradients (checked against the float64 loop
of autograd), and a per-example loss that does not describe the batch loss must raise.
"""

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import BatchLoss, BatchLossMismatch, Tracker
from persample import ObservationError
from persample._step_plan import check_against_autograd

from zoo import CentersBatch, TiedLM, assert_dicts_close, gpt2_tiny, oracle_grads


def padded_tokens(b=5, t=7, vocab=20, seed=0):
    """Token ids and labels with right padding of different lengths (labels -100 there)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (b, t), generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    lengths[0] = t
    labels = tokens.clone()
    labels[torch.arange(t)[None, :] >= lengths[:, None]] = -100
    return tokens, labels


def token_mean(out, labels):
    """The usual causal-LM loss: mean over every non-ignored token of the batch."""
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _lm(kind):
    torch.manual_seed(0)
    return (TiedLM() if kind == "tied" else gpt2_tiny()).double()


def _run(model, loss_fn, batches, *, tracker_kwargs=None, scale_every=1):
    """Gradients after each step: the plain loop (tracker_kwargs None) or the Tracker."""
    tracker = None if tracker_kwargs is None else Tracker(model, loss_fn, **tracker_kwargs)
    grads = []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        if tracker is None:
            loss_fn(model(x), y).backward()
        else:
            tracker.step(x, y)
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    return grads


def _assert_same_grads(got, expected, rtol=1e-9):
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys()
        for name in a:
            assert (a[name] is None) == (b[name] is None), (step, name)
            if a[name] is not None:
                torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=1e-12, msg=f"step {step} {name}")


@pytest.mark.parametrize("kind", ["tied", "gpt2"])
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("declared", [False, True])
def test_padded_token_mean_gives_the_loops_own_grad_on_every_step(kind, every, declared):
    """Used to be 0.79 (GPT-2) relative off on statistics steps and exact on plain steps."""
    model = _lm(kind)
    batches = [padded_tokens(seed=s) for s in range(4)]
    loss_fn = persample.causal_lm_loss() if declared else token_mean
    plain = _run(copy.deepcopy(model), token_mean, batches)
    tracked = _run(copy.deepcopy(model), loss_fn, batches, tracker_kwargs=dict(every=every))
    _assert_same_grads(tracked, plain)


def test_causal_lm_loss_matches_hugging_face_and_describes_summed_token_losses():
    """g_i = ∇ Σ_t ℓ_it (float64 oracle) and p.grad = (B/N)·ḡ, N the number of counted tokens."""
    model = _lm("gpt2")
    tokens, labels = padded_tokens()
    hf = model(tokens, labels=labels).loss
    loss = persample.causal_lm_loss()
    torch.testing.assert_close(loss(model(tokens), labels), hf.double(), rtol=1e-6, atol=0)  # HF: float32
    stats = Tracker(model, loss).step(tokens, labels)
    grads, losses = oracle_grads(model, loss.per_example, tokens, labels)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.param_sq_norms, {k: g.reshape(5, -1).pow(2).sum(1) for k, g in grads.items()})
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)
    n_tokens = (labels[:, 1:] != -100).sum().item()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, stats.mean[name] * (5 / n_tokens), rtol=1e-9, atol=1e-12)


def test_num_items_in_batch_normalises_over_the_whole_accumulated_batch():
    model = _lm("tied")
    micro = [padded_tokens(b=3, seed=s) for s in range(2)]
    num_items = sum(int((y[:, 1:] != -100).sum()) for _, y in micro)
    reference = copy.deepcopy(model)
    for x, y in micro:
        persample.causal_lm_loss(num_items_in_batch=num_items)(reference(x), y).backward()
    tracker = Tracker(model, persample.causal_lm_loss(num_items_in_batch=num_items))
    with tracker.accumulate() as acc:
        for x, y in micro:
            tracker.step(x, y)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    whole = Tracker(copy.deepcopy(model), persample.causal_lm_loss()).step(
        torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro])
    )
    assert acc.stats.n == 6
    assert_dicts_close(acc.stats.mean, whole.mean)
    assert_dicts_close(acc.stats.var, whole.var, atol=1e-11)


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize(
    "loss_fn",
    [
        partial(F.cross_entropy, reduction="sum"),
        partial(F.cross_entropy, weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)),
        partial(F.cross_entropy, weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64), reduction="sum"),
        lambda out, y: F.cross_entropy(out, y, ignore_index=1, reduction="sum"),
    ],
    ids=["sum", "class_weights", "class_weights_sum", "ignore_index_sum"],
)
def test_classification_batch_losses_give_the_loops_own_grad(loss_fn, every):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    batches = [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(3)]
    plain = _run(copy.deepcopy(model), loss_fn, batches)
    tracked = _run(copy.deepcopy(model), loss_fn, batches, tracker_kwargs=dict(every=every))
    _assert_same_grads(tracked, plain)


def test_sum_reduction_statistics_are_of_each_examples_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    stats = Tracker(model, partial(F.cross_entropy, reduction="sum")).step(x, y)
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].sum(0), rtol=1e-9, atol=1e-12)


def test_a_per_example_loss_that_does_not_describe_the_batch_loss_raises_and_writes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    wrong = BatchLoss(F.cross_entropy, per_example=lambda out, t: F.mse_loss(out, F.one_hot(t, 3).double()))
    tracker = Tracker(model, wrong)
    with pytest.raises(BatchLossMismatch, match="not a weighted sum"):
        tracker.step(x, y)
    assert all(p.grad is None for p in model.parameters()) and tracker.steps == 0 and tracker.last_stats is None


def test_a_per_example_token_mean_of_an_all_padding_example_is_an_error_not_nan():
    model = _lm("tied")
    tokens, labels = padded_tokens()
    labels[2, 1:] = -100
    with pytest.raises(BatchLossMismatch, match="causal_lm_loss"):
        Tracker(model, token_mean).step(tokens, labels)
    stats = Tracker(model, persample.causal_lm_loss()).step(tokens, labels)
    assert stats.param_sq_norms["embed.weight"][2] == 0


def test_a_loss_computed_inside_the_model():
    """`lambda out: out.loss` of a Hugging Face causal LM: the per-example losses are recomputed from the
    logits (persample/engines/fast/model_loss.py), so the weights n_i / N of a padded batch are known and
    checked, and p.grad is the model's own gradient. (Before: padding raised OPAQUE_LOSS_NOT_MEAN.) HF's
    loss casts the logits to float32: the statistics agree with the loop to float32 rounding."""
    model = _lm("gpt2")
    tokens = padded_tokens()[0]
    inputs = {"input_ids": tokens, "labels": tokens}
    loss_fn = lambda out: out.loss  # noqa: E731
    reference = copy.deepcopy(model)
    reference(**inputs).loss.backward()
    stats = Tracker(model, loss_fn).step(inputs)
    assert stats.n == 5
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    padded = {"input_ids": tokens, "labels": padded_tokens()[1]}
    reference(**padded).loss.backward()
    stats = Tracker(model, loss_fn).step(padded)
    # weights n_i / N that differ: p.grad = Σ_i w_i g_i from the engine's pieces, not a second backward; the
    # float32 logits of HF's loss round the two differently (both 6-9e-8 from the float64 oracle)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-6 * b.grad.abs().max()
    grads, losses = oracle_grads(model, loss_fn, padded)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()}, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(stats.losses, losses.to(stats.losses), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backward", ["causal_lm_loss", "hugging_face"])
def test_observe_reads_the_weight_of_a_token_mean_backward(backward):
    """observe used to refuse a padded token-mean backward (ratio 0.9). HF's own loss casts the logits
    to float32, so it is compared at float32 precision."""
    model = _lm("gpt2")
    tokens, labels = padded_tokens()
    tracker = Tracker(model, persample.causal_lm_loss())
    with tracker.observe(labels) as observed:
        if backward == "hugging_face":
            model(tokens, labels=labels).loss.backward()
        else:
            persample.causal_lm_loss()(model(tokens), labels).backward()
    grads, _ = oracle_grads(model, persample.causal_lm_loss().per_example, tokens, labels)
    rtol, atol = (1e-9, 1e-12) if backward == "causal_lm_loss" else (1e-4, 1e-7)
    assert_dicts_close(observed.stats.mean, {k: g.mean(0) for k, g in grads.items()}, rtol=rtol, atol=atol)
    assert_dicts_close(observed.stats.var, {k: g.var(0) for k, g in grads.items()}, rtol=rtol, atol=atol)
    assert_dicts_close(
        observed.stats.param_sq_norms,
        {k: g.reshape(5, -1).pow(2).sum(1) for k, g in grads.items()},
        rtol=rtol,
        atol=atol,
    )


def test_observe_with_unequal_weights_or_a_loss_inside_the_model_raises_clearly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    with pytest.raises(ObservationError, match="weigh differently"):
        with Tracker(model, F.cross_entropy).observe(y):
            F.cross_entropy(model(x), y, weight=weight).backward()

    class WithLoss(nn.Module):  # a loss computed inside a model that is not a Hugging Face head
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, labels):
            logits = self.net(x)
            return {"logits": logits, "loss": F.cross_entropy(logits, labels)}

    with_loss = WithLoss()
    with pytest.raises(persample.NotExact, match="shared by the whole batch.*out.loss"):
        with Tracker(with_loss, lambda out: out["loss"]).observe(batch_size=6):
            with_loss(x, labels=y)["loss"].backward()
    # a Hugging Face causal LM's own loss: recomputed per example (persample/engines/fast/model_loss.py);
    # a token mean weighs a padded batch's examples by n_i / N, which observe cannot undo
    gpt2 = _lm("gpt2")
    tokens, labels = padded_tokens()
    with pytest.raises(ObservationError, match="weighs the examples differently") as info:
        with Tracker(gpt2, lambda out: out.loss).observe(batch_size=5):
            gpt2(tokens, labels=labels).loss.backward()
    assert info.value.code == "OBSERVE_WEIGHTS_DIFFER"


# ------------------------------------------------------------------- check_every with any weights


CLASS_WEIGHTS = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)


@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_check_every_works_with_class_weights(engine, monkeypatch):
    """Used to raise BatchLossMismatch ("needs a batch loss that weighs every example equally"). The check
    compares autograd's gradient with Σ_i w_i g_i, g_i from the independent engines (never the fast one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    loss_fn = partial(F.cross_entropy, weight=CLASS_WEIGHTS)
    engines = []
    real = persample._step_plan.compute_stats
    monkeypatch.setattr(
        persample._step_plan, "compute_stats", lambda *a, **k: engines.append(k["engine"]) or real(*a, **k)
    )
    tracker = Tracker(model, loss_fn, check_every=1, engine=engine)
    stats = tracker.step(x, y)
    assert "independent" in engines
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    w = CLASS_WEIGHTS[y] / CLASS_WEIGHTS[y].sum()
    assert_dicts_close(
        {n: p.grad for n, p in model.named_parameters()}, {k: torch.tensordot(w, g, dims=1) for k, g in grads.items()}
    )
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})


@pytest.mark.parametrize("kind", ["tied", "gpt2"])
def test_check_every_works_with_a_token_mean_over_a_padded_batch(kind):
    model = _lm(kind)
    x, y = padded_tokens()
    expected = copy.deepcopy(model)
    token_mean(expected(x), y).backward()
    for loss_fn in (token_mean, persample.causal_lm_loss()):
        model.zero_grad(set_to_none=True)
        Tracker(model, loss_fn, check_every=1).step(x, y)
        for (name, a), b in zip(model.named_parameters(), expected.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_check_every_with_unequal_weights_is_a_real_check():
    """A model that couples examples fails the check under class weights too, and nothing is written; so
    does the check itself when given weights other than the loss's."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    loss_fn = partial(F.cross_entropy, weight=CLASS_WEIGHTS)
    coupled = CentersBatch().double()  # couples the examples of a batch
    tracker = Tracker(coupled, loss_fn, check_every=1)
    with pytest.raises(persample.MeanMismatchError, match=r"lin\.weight"):
        tracker.step(x, y)
    assert coupled.lin.weight.grad is None and tracker.steps == 0
    honest = nn.Sequential(nn.Linear(4, 3)).double()
    tracker = Tracker(honest, loss_fn)
    batch = persample._batch.as_batch(x, y)
    w = CLASS_WEIGHTS[y] / CLASS_WEIGHTS[y].sum()
    check_against_autograd(tracker._step_config, batch, w)  # the loss's own weights pass
    with pytest.raises(persample.MeanMismatchError):
        check_against_autograd(tracker._step_config, batch, w.roll(1))
    with pytest.raises(persample.MeanMismatchError):
        check_against_autograd(tracker._step_config, batch, torch.full_like(w, 1 / 6))
