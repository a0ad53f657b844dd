"""Every model family against the float64 Python-loop oracle, at ~1e-9 relative error."""

import copy

import pytest
import torch

import persample
from persample import GradStats

from zoo import CASE_IDS, CASES, assert_dicts_close, oracle_grads


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_per_sample_grads_match_oracle(case):
    model, inputs, targets = case.instantiate()
    expected, _ = oracle_grads(model, case.loss_fn, inputs, targets)
    actual = persample.per_sample_grads(model, case.loss_fn, inputs, targets)
    assert_dicts_close(actual, expected)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grad_stats_match_oracle(case):
    model, inputs, targets = case.instantiate(batch=6)
    grads, losses = oracle_grads(model, case.loss_fn, inputs, targets)
    stats = persample.grad_stats(model, case.loss_fn, inputs, targets, chunk_size=4, inner_products=True)
    flat = torch.cat([g.reshape(len(g), -1) for g in grads.values()], 1)
    mean = flat.mean(0)
    assert stats.n == 6
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})
    assert_dicts_close(stats.var, {k: g.var(0, unbiased=True) for k, g in grads.items()})
    assert_dicts_close(stats.param_sq_norms, {k: g.reshape(len(g), -1).pow(2).sum(1) for k, g in grads.items()})
    torch.testing.assert_close(stats.sq_norms, flat.pow(2).sum(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.norms, flat.norm(dim=1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.inner_products, flat @ mean, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_check_mean_passes_on_every_family(case):
    model, inputs, targets = case.instantiate()
    report = persample.check_mean(model, case.loss_fn, inputs, targets)
    assert report.ok and report.max_rel_err < 1e-9


def test_tied_weight_appears_once_and_sums_both_uses():
    case = CASES[CASE_IDS.index("tied_weights")]
    model, inputs, targets = case.instantiate()
    grads = persample.per_sample_grads(model, case.loss_fn, inputs, targets)
    assert "embed.weight" in grads and "head.weight" not in grads
    # Untie a copy: the tied gradient must be the sum of the embedding's and the projection's.
    untied = copy.deepcopy(model)
    untied.head.weight = torch.nn.Parameter(model.embed.weight.detach().clone())
    parts, _ = oracle_grads(untied, case.loss_fn, inputs, targets)
    assert torch.count_nonzero(parts["head.weight"]) > 0 and torch.count_nonzero(parts["embed.weight"]) > 0
    torch.testing.assert_close(
        grads["embed.weight"], parts["embed.weight"] + parts["head.weight"], rtol=1e-9, atol=1e-12
    )


def test_frozen_parameters_are_left_out():
    case = CASES[CASE_IDS.index("partly_frozen")]
    model, inputs, targets = case.instantiate()
    grads = persample.per_sample_grads(model, case.loss_fn, inputs, targets)
    assert sorted(grads) == ["2.weight", "4.bias", "4.weight"]


def test_dict_inputs_are_keyword_arguments():
    case = CASES[CASE_IDS.index("two_inputs")]
    model, (a, b), targets = case.instantiate()
    by_name = persample.per_sample_grads(model, case.loss_fn, {"a": a, "b": b}, targets)
    positional = persample.per_sample_grads(model, case.loss_fn, (a, b), targets)
    assert_dicts_close(by_name, positional, rtol=0, atol=0)


def test_model_output_dict_and_no_targets():
    model = torch.nn.Linear(4, 2).double()

    class DictOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, x):
            return {"y": self.lin(x)}

    x = torch.randn(5, 4, dtype=torch.float64)
    loss_fn = lambda out: out["y"].pow(2).sum()  # noqa: E731
    grads = persample.per_sample_grads(DictOut(), loss_fn, x)
    expected, _ = oracle_grads(DictOut(), loss_fn, x)
    assert_dicts_close(grads, expected)


def test_gradstats_is_float64_when_model_is():
    case = CASES[0]
    model, inputs, targets = case.instantiate()
    stats = persample.grad_stats(model, case.loss_fn, inputs, targets)
    assert isinstance(stats, GradStats)
    assert all(v.dtype == torch.float64 for v in stats.mean.values())
