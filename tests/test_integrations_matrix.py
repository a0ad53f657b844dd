"""The one-line integrations on real fine-tuning setups (issue 23): diagnostics never stop training,
gradient checkpointing, PEFT LoRA, gradient accumulation, bf16, evaluation between steps.

Each cell: parameters after training identical with and without the integration; statistics equal to the
float64 loop-of-autograd oracle where computed; every logged key present, or its absence explained by the
skip counter ``persample/skipped_steps``."""

import copy
import warnings

import pytest
import torch

import persample
from persample import noise

from test_integrations import B, _hf_train, lm_examples, oracle_noise_scale
from zoo import gpt2_tiny

KEY, SKIPPED = "persample/b_simple", "persample/skipped_steps"


def _same_parameters(a, b, exact=True):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)


def _rewrite_gradient_hook(model):
    """A forward hook whose gradient hook rewrites the batch's gradient (clamps it): the observed backward
    cannot be split per example, so observe refuses (the vmap and loop engines apply it per example)."""
    def hook(module, args, output):
        output.register_hook(lambda g: g.clamp(-1e-2, 1e-2))
    return model.transformer.ln_f.register_forward_hook(hook)


def _logged(trainer):
    return [h for h in trainer.state.log_history if KEY in h or SKIPPED in h]


# ------------------------------------------------------------------------------ diagnostics never stop training


def test_hf_refused_statistics_skip_the_step_and_training_is_unchanged(tmp_path):
    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    _rewrite_gradient_hook(model)
    examples = lm_examples(2 * B)
    _hf_train(plain := copy.deepcopy(model), examples, tmp_path / "plain", tracked=False, steps=2, accumulation=1)
    with pytest.warns(persample.SkippedStatisticsWarning, match="gradient hook") as record:
        trainer, callback = _hf_train(tracked := copy.deepcopy(model), examples, tmp_path / "tracked",
                                      tracked=True, steps=2, accumulation=1)
    assert sum(issubclass(w.category, persample.SkippedStatisticsWarning) for w in record) == 1  # once
    _same_parameters(plain, tracked)
    logged = _logged(trainer)
    assert [h[SKIPPED] for h in logged] == [1, 2] and not any(KEY in h for h in logged)
    assert callback.tracker.skipped == [0, 1] and callback.last_stats is None
    assert all("gradient hook" in reason for _, reason in callback.tracker.refused)


def test_hf_refused_statistics_fall_back_to_the_exact_engines(tmp_path):
    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    examples = lm_examples(B)
    oracle_model = copy.deepcopy(model)
    _rewrite_gradient_hook(oracle_model)
    oracle = oracle_noise_scale(oracle_model, examples)  # the loop applies the hook to each example's gradient
    _rewrite_gradient_hook(model)
    _hf_train(plain := copy.deepcopy(model), examples, tmp_path / "plain", tracked=False, steps=1, accumulation=1)
    with pytest.warns(persample.SkippedStatisticsWarning, match="exact engines"):
        trainer, callback = _hf_train(tracked := copy.deepcopy(model), examples, tmp_path / "tracked",
                                      tracked=True, steps=1, accumulation=1, on_refusal="fallback")
    _same_parameters(plain, tracked)
    logged = _logged(trainer)
    assert len(logged) == 1 and logged[0][SKIPPED] == 0
    torch.testing.assert_close(logged[0][KEY], oracle.b_simple, rtol=1e-6, atol=0)


def test_hf_on_refusal_raise_raises_after_the_backward(tmp_path):
    torch.manual_seed(0)
    model = gpt2_tiny().double().train()
    _rewrite_gradient_hook(model)
    with pytest.raises(persample.NotExact, match="gradient hook"):
        _hf_train(model, lm_examples(B), tmp_path, tracked=True, steps=1, accumulation=1, on_refusal="raise")


def test_tracker_on_refusal_options():
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    def double_gradient(module, args, output):
        output.register_hook(lambda g: g * 2)
    model[1].register_forward_hook(double_gradient)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss = nn.functional.cross_entropy
    with pytest.raises(ValueError, match="on_refusal must be one of"):
        persample.Tracker(model, loss, on_refusal="ignore")
    fallback = persample.Tracker(model, loss, on_refusal="fallback")
    with pytest.raises(ValueError, match="inputs=inputs"):
        with fallback.observe(y):
            pass
    expected = persample.grad_stats(model, loss, x, y)
    for mode in ("skip", "fallback"):
        tracker = persample.Tracker(model, loss, on_refusal=mode)
        model.zero_grad()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with tracker.observe(y, inputs=x) as observed:
                loss(model(x), y).backward()
        assert len(record) == 1 and issubclass(record[0].category, persample.SkippedStatisticsWarning)
        plain = copy.deepcopy(model)
        plain.zero_grad()
        loss(plain(x), y).backward()
        for p, q in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)  # p.grad is the backward's own
        if mode == "skip":
            assert observed.stats is None and observed.skipped and tracker.skipped == [0]
        else:
            assert not observed.skipped and tracker.skipped == [] and tracker.last_stats is observed.stats
            for k in expected.mean:
                torch.testing.assert_close(observed.stats.mean[k], expected.mean[k], rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(observed.stats.var[k], expected.var[k], rtol=1e-9, atol=1e-12)
        assert len(tracker.refused) == 1 and "gradient hook" in tracker.refused[0][1]
    # an error of the user's own code in the block is raised whatever on_refusal says
    tracker = persample.Tracker(model, loss, on_refusal="skip")
    with pytest.raises(persample.NotExact, match="mine"):
        with tracker.observe(y):
            raise persample.NotExact("mine")
