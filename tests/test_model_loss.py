"""A Hugging Face model's own loss (``labels=`` in the inputs, ``loss_fn = lambda out: out.loss``) on the
fast engine: the per-example losses are recomputed from the logits (persample/engines/fast/model_loss.py).

Oracle: a float64 Python loop of autograd, the model's own ``out.loss`` on one example at a time
(tests/real_models.py). Heads: causal LM (padded: unequal token counts, weights n_i / N), masked LM,
token classification, sequence classification (regression, single and multi label), question
answering, ``num_items_in_batch``; and the refusals (``MODEL_LOSS_NOT_RECOMPUTED``) where ``out.loss``
is not the Hugging Face loss of the head.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import persample
from persample import NotExact

from real_models import B, causal_lm_loss, float64_default, hf_model, oracle, own_loss, padding_mask, tokens

pytest.importorskip("transformers")

RTOL, ATOL = 1e-9, 1e-12


def _build(family: str, head: str, inputs_fn, **config):
    with float64_default():
        torch.manual_seed(0)
        model = hf_model(family, head, **config)
        inputs = inputs_fn()
    return model, inputs


def _padded_causal():
    mask = padding_mask("right")
    ids = tokens().masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _masked_lm():
    ids, labels = tokens(), tokens()
    labels[0, 1:] = -100  # one counted token in example 0, four in 1, all six in 2
    labels[1, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _token_classes():
    mask = padding_mask("right")
    labels = torch.randint(0, 3, mask.shape).masked_fill(mask == 0, -100)
    return {"input_ids": tokens().masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def _sequence(labels):
    def make():
        mask = padding_mask("right")
        return {"input_ids": tokens().masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels()}

    return make


def _qa():
    mask = padding_mask("right")
    return {
        "input_ids": tokens().masked_fill(mask == 0, 0),
        "attention_mask": mask,
        "start_positions": torch.tensor([0, 2, 1]),
        "end_positions": torch.tensor([3, 3, 2]),
    }


CASES = {
    "causal-padded": ("gpt2", "ForCausalLM", _padded_causal, {}),
    "masked-lm": ("bert", "ForMaskedLM", _masked_lm, {}),
    "token-classification": ("bert", "ForTokenClassification", _token_classes, {}),
    "regression": ("bert", "ForSequenceClassification", _sequence(lambda: torch.randn(B)), {"num_labels": 1}),
    "single-label": ("bert", "ForSequenceClassification", _sequence(lambda: torch.randint(0, 3, (B,))), {}),
    "multi-label": (
        "bert",
        "ForSequenceClassification",
        _sequence(lambda: torch.randint(0, 2, (B, 3)).double()),
        {"problem_type": "multi_label_classification"},
    ),
    "question-answering": ("bert", "ForQuestionAnswering", _qa, {"num_labels": 2}),
}


def _case(name: str):
    family, head, inputs_fn, config = CASES[name]
    model, inputs = _build(family, head, inputs_fn, **config)
    if family == "gpt2":
        model.loss_function = causal_lm_loss  # HF's own, without the float32 cast of the logits
    return model, inputs


def _assert_matches(stats, want, rtol=RTOL, atol=ATOL):
    for name, g in want.mean.items():
        torch.testing.assert_close(stats.mean[name], g, rtol=rtol, atol=atol, msg=name)
        torch.testing.assert_close(stats.var[name], want.var[name], rtol=rtol, atol=atol, msg=name)
    torch.testing.assert_close(stats.sq_norms, want.sq_norms, rtol=rtol, atol=atol)
    torch.testing.assert_close(stats.losses.to(want.losses), want.losses, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(CASES))
def test_fast_engine_is_exact_on_the_models_own_loss(name):
    model, inputs = _case(name)
    want = oracle(model, own_loss, inputs)
    _assert_matches(persample.grad_stats(model, own_loss, inputs, engine="fast"), want)


def test_token_mean_weights_and_tracker_step():
    """The causal LM's batch loss is the mean over all N counted tokens: ℓ = Σ_i (n_i / N) L_i with L_i the
    mean over example i's n_i tokens. Tracker.step writes autograd's ∇ℓ into p.grad and returns the
    statistics of the unscaled g_i = ∇L_i; auto takes the fast engine."""
    model, inputs = _case("causal-padded")
    want = oracle(model, own_loss, inputs)
    batch_grads = torch.autograd.grad(model(**inputs).loss, list(model.parameters()))
    counts = (inputs["labels"][:, 1:] != -100).sum(1).double()
    weighted = {n: (counts / counts.sum()) @ g.reshape(B, -1) for n, g in want.rows.items()}
    for (name, p), g in zip(model.named_parameters(), batch_grads):  # the oracle's Σ w_i g_i is the batch gradient
        torch.testing.assert_close(weighted[name].reshape(p.shape), g, rtol=RTOL, atol=ATOL)

    report = persample.explain(model, own_loss, inputs)
    assert report.entry_points["grad_stats"] == "fast", str(report)
    tracker = persample.Tracker(model, own_loss, check_every=1)
    stats = tracker.step(inputs)
    _assert_matches(stats, want)
    for (name, p), g in zip(model.named_parameters(), batch_grads):
        torch.testing.assert_close(p.grad, g, rtol=RTOL, atol=ATOL, msg=name)


def _causal_lm_loss_over(logits, labels, vocab_size, num_items_in_batch=None, **kwargs):
    """HF's ForCausalLMLoss in float64: a token sum over num_items_in_batch when given, else a token mean."""
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, vocab_size), shifted, ignore_index=-100, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def test_num_items_in_batch():
    """With num_items_in_batch = K (the Trainer's count over a whole accumulated batch), example i's own
    loss is its summed token loss / K, and the batch loss is their plain sum."""
    model, inputs = _case("causal-padded")
    model.loss_function = _causal_lm_loss_over
    inputs = {**inputs, "num_items_in_batch": 20}
    want = oracle(model, own_loss, {k: v for k, v in inputs.items() if k != "num_items_in_batch"})
    stats = persample.grad_stats(model, own_loss, inputs, engine="fast")
    shifted = F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    counts = (shifted != -100).sum(1).double()
    # L_i(K) = n_i / K · L_i(token mean): the oracle's rows scaled by n_i / K
    torch.testing.assert_close(stats.losses, want.losses * counts / 20, rtol=RTOL, atol=ATOL)
    scaled = {n: g * (counts / 20).reshape(-1, *[1] * (g.dim() - 1)) for n, g in want.rows.items()}
    for name, g in scaled.items():
        torch.testing.assert_close(stats.mean[name], g.mean(0), rtol=RTOL, atol=ATOL, msg=name)


def test_float32_loss_of_a_float64_model_is_exact_to_float32():
    """HF's ForCausalLMLoss casts the logits with .float(): a float64 model's own loss is float32. The
    recomputed losses are computed in that dtype too, so they agree with the loop's to float32 rounding."""
    model, inputs = _build("gpt2", "ForCausalLM", _padded_causal)
    assert model(**inputs).loss.dtype == torch.float32
    want = oracle(model, own_loss, inputs)
    stats = persample.grad_stats(model, own_loss, inputs, engine="fast")
    _assert_matches(stats, want, rtol=1e-5, atol=1e-7)


def _weighted_loss(logits, labels, vocab_size, **kwargs):
    """A causal LM loss with a weight per class: not a loss persample recomputes."""
    weight = torch.linspace(0.5, 1.5, vocab_size, dtype=logits.dtype)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1), weight=weight, ignore_index=-100)


def _summed_loss(logits, labels, vocab_size, **kwargs):
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1), reduction="sum")


def _loss_with_extra_term(logits, labels, vocab_size, **kwargs):
    return causal_lm_loss(logits, labels, vocab_size) + 1e-3 * logits.pow(2).mean()


@pytest.mark.parametrize("loss_function", [_weighted_loss, _summed_loss, _loss_with_extra_term])
def test_a_loss_that_is_not_the_heads_is_refused(loss_function):
    """The batch-loss check still runs: a model whose out.loss is not Σ_i (n_i / N) L_i of the recomputed
    losses is refused by the fast engine with a code. auto then runs each example alone, and its in-model
    loss check refuses a loss whose batch gradient is not a multiple of the mean per-example gradient
    (weights it cannot read: BATCH_LOSS_COUPLED); the fix it names, batch_loss_check=False, gives each
    example's own gradient (the oracle's)."""
    model, inputs = _case("causal-padded")
    model.loss_function = loss_function
    with pytest.raises(NotExact) as info:
        persample.grad_stats(model, own_loss, inputs, engine="fast")
    assert info.value.code == "MODEL_LOSS_NOT_RECOMPUTED"
    want = oracle(model, own_loss, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            stats = persample.grad_stats(model, own_loss, inputs)
        except persample.BatchLossMismatch as err:
            assert err.code == "BATCH_LOSS_COUPLED" and "batch_loss_check=False" in str(err)
            assert loss_function is not _summed_loss  # a sum of the examples' losses is not coupled
            stats = persample.grad_stats(model, own_loss, inputs, batch_loss_check=False)
        _assert_matches(stats, want)


def test_an_auxiliary_term_from_the_model_is_refused():
    """A term of out.loss that does not come from the logits (an auxiliary loss of a hidden state) is
    found in out.loss's graph."""
    model, inputs = _case("causal-padded")
    original = model.forward

    def forward(**kwargs):
        out = original(**kwargs, output_hidden_states=True)
        out.loss = out.loss + 1e-3 * out.hidden_states[-1].pow(2).mean()
        out.hidden_states = None
        return out

    model.forward = forward
    with pytest.raises(NotExact) as info:
        persample.grad_stats(model, own_loss, inputs, engine="fast")
    assert info.value.code == "MODEL_LOSS_NOT_RECOMPUTED"


def test_an_example_with_every_label_ignored_is_refused():
    model, inputs = _case("masked-lm")
    inputs["labels"][2] = -100
    with pytest.raises(NotExact) as info:
        persample.grad_stats(model, own_loss, inputs, engine="fast")
    assert info.value.code == "MODEL_LOSS_NOT_RECOMPUTED"
    assert "example 2" in str(info.value)


# ----------------------------------------------------------------------------- Tracker.observe


def _observe(model, inputs, scale=1.0):
    tracker = persample.Tracker(model, own_loss)
    with tracker.observe(batch_size=B) as observed:
        (scale * model(**inputs).loss).backward()
    return observed.stats


@pytest.mark.parametrize("name", ["single-label", "regression", "masked-lm-unpadded", "question-answering"])
def test_observe_around_the_models_own_backward(name):
    """Tracker.observe around `model(**batch, labels=...).loss.backward()` (scaled, as under gradient
    accumulation): the statistics of the model's own per-example losses, from the user's one backward.
    Question answering: its qa_outputs.bias has a gradient that is 0 in exact arithmetic (a shift of the
    logits under a softmax over positions), ~1e-17 in float64; observe's p.grad sum check compared it at
    a tolerance relative to itself alone and refused it (OBSERVE_SUM_MISMATCH), a false refusal."""
    if name == "masked-lm-unpadded":
        model, inputs = _case("masked-lm")
        inputs["labels"] = tokens()  # every token counted: equal weights 1 / (B T)
    else:
        model, inputs = _case(name)
    want = oracle(model, own_loss, inputs)
    _assert_matches(_observe(model, inputs, scale=0.5), want)


@pytest.mark.parametrize("relative", [1e-3, 1e-7])
def test_observe_still_refuses_a_small_real_difference_in_a_zero_gradient(relative):
    """The sum check's floor for gradients that are zero in exact arithmetic is rounding of the model's
    gradients, not more: a term of the backwarded loss that gives the QA head's bias (exactly 0 without it)
    a gradient of 1e-7 of the model's largest is still refused."""
    model, inputs = _case("question-answering")
    model(**inputs).loss.backward()
    largest = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    tracker = persample.Tracker(model, own_loss)
    with pytest.raises(persample.ObservationError) as info:
        with tracker.observe(batch_size=B):
            (model(**inputs).loss + relative * largest * model.qa_outputs.bias.sum()).backward()
    assert info.value.code == "OBSERVE_SUM_MISMATCH"
    assert "qa_outputs.bias" in str(info.value)


def test_observe_refuses_unequal_token_weights_and_other_terms():
    model, inputs = _case("causal-padded")
    with pytest.raises(persample.ObservationError) as info:
        _observe(model, inputs)
    assert info.value.code == "OBSERVE_WEIGHTS_DIFFER"
    model.zero_grad(set_to_none=True)
    model.loss_function = _loss_with_extra_term
    inputs["labels"] = inputs["input_ids"]
    with pytest.raises(NotExact) as info:
        _observe(model, inputs)
    assert info.value.code == "MODEL_LOSS_NOT_RECOMPUTED"


@pytest.mark.parametrize("divides", [True, False])
def test_num_items_equal_to_the_token_count_is_told_apart_by_the_graph(divides):
    """The Trainer passes num_items_in_batch = K = N, the batch's token count: then Σ_t ℓ_it / K (a loss that
    divides by K) and the token mean (a loss that ignores it, as BART's inline loss does) are the same batch
    loss, but not the same loss of an example alone. The oracle calls the model on each example with K."""
    model, inputs = _case("causal-padded")
    if divides:
        model.loss_function = _causal_lm_loss_over
    count = int((F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:] != -100).sum())
    inputs = {**inputs, "num_items_in_batch": count}
    rows = []
    for i in range(B):
        example = {k: v if k == "num_items_in_batch" else v[i : i + 1] for k, v in inputs.items()}
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(**example).loss, model.parameters())]))
    want = torch.stack(rows)
    stats = persample.grad_stats(model, own_loss, inputs, engine="fast")
    torch.testing.assert_close(stats.sq_norms, want.pow(2).sum(1), rtol=RTOL, atol=ATOL)


def test_the_saved_reduction_is_read_failing_closed():
    from persample import _torch_compat

    logits = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0])
    assert _torch_compat.nll_loss_reduction(F.cross_entropy(logits, target, reduction="sum").grad_fn) == 2
    with pytest.raises(NotExact) as info:
        _torch_compat.nll_loss_reduction(object())  # a torch that keeps it under another name
    assert info.value.code == "TORCH_INTERNALS_UNKNOWN"


def test_observe_finds_an_auxiliary_term_in_the_models_own_loss():
    """A term of out.loss computed from a hidden state, in the user's own backward: the graph of out.loss
    (its nodes outlive the backward) reaches the model other than through the logits."""
    model, inputs = _case("single-label")
    original = model.forward

    def forward(**kwargs):
        out = original(**kwargs, output_hidden_states=True)
        out.loss = out.loss + 1e-3 * out.hidden_states[-1].pow(2).mean()
        out.hidden_states = None
        return out

    model.forward = forward
    with pytest.raises(NotExact) as info:
        _observe(model, inputs)
    assert info.value.code == "MODEL_LOSS_NOT_RECOMPUTED"
