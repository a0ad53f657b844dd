"""persample.explain: the engine it names is the engine ``auto`` then takes, on every case of the real-model
matrix; its refusals carry the codes the engines raise; it finds every refusal of a model, not the first."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import api
from persample.errors import PersampleError

from real_models import all_cases

CASES = all_cases()


def _engine_auto_takes(monkeypatch, call):
    """Run ``call`` and return the engine whose run returned (instrumenting api._first_exact), or the
    code of the refusal that reached the caller."""
    used = []
    original = api._first_exact

    def recording(chain, run, reset=lambda: None):
        def run_and_record(name):
            result = run(name)
            used.append(name)
            return result

        return original(chain, run_and_record, reset)

    monkeypatch.setattr(api, "_first_exact", recording)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except PersampleError as err:
        return None, err.code
    return used[-1], None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_explain_names_the_engine_auto_takes(monkeypatch, case):
    model, inputs, targets = case.instantiate()
    randomness = "different" if case.id.endswith("-train") else "error"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = persample.explain(model, case.loss_fn, inputs, targets, randomness=randomness)
    used, code = _engine_auto_takes(
        monkeypatch, lambda: persample.grad_stats(model, case.loss_fn, inputs, targets, randomness=randomness)
    )
    assert report.entry_points["grad_stats"] == used, str(report)
    if used is None:
        assert code in {r.code for r in report.refusals} | {
            v.refusal.code for v in report.engines.values() if v.refusal
        }
    fast = report.engines["fast"]
    if not fast.exact:
        with pytest.raises(PersampleError) as info, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            persample.grad_stats(model, case.loss_fn, inputs, targets, randomness=randomness, engine="fast")
        assert info.value.code == fast.refusal.code


def test_explain_lists_every_refusal_with_codes_and_modules():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.2), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)
    )
    model[3].weight.register_hook(lambda g: g)
    report = persample.explain(model, F.cross_entropy, torch.randn(6, 3), torch.randint(0, 2, (6,)))
    assert [(r.code, r.module) for r in report.refusals] == [
        ("BATCHNORM_TRAIN", "1 (BatchNorm1d)"),
        ("RANDOM_UNDER_ERROR", "2 (Dropout)"),
        ("BATCHNORM_TRAIN", "4 (BatchNorm1d)"),
        ("PARAMETER_GRADIENT_HOOK", "3.weight"),
    ]
    assert all(r.fix for r in report.refusals)
    assert report.entry_points == {"grad_stats": None, "per_sample_grads": None, "Tracker.observe": None}
    assert [m.treatment for m in report.modules][:1] == ["rule: linear"]
    assert "BATCHNORM_TRAIN" in str(report) and report.to_dict()["refusals"][0]["code"] == "BATCHNORM_TRAIN"


def test_explain_names_why_a_module_takes_the_fallback():
    class StdLinear(nn.Linear):  # a subclass with its own forward: not the Linear rule's function
        def forward(self, x):
            w = self.weight - self.weight.mean(1, keepdim=True)
            return F.linear(x, w, self.bias)

    torch.manual_seed(0)
    model = nn.Sequential(StdLinear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    report = persample.explain(model, F.mse_loss, x, y)
    assert report.modules[0].treatment.startswith("fallback") and "its own forward" in report.modules[0].treatment
    assert report.entry_points["grad_stats"] == "fast" and report.engines["vmap"].exact


def test_explain_leaves_the_model_as_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    persample.explain(model, F.mse_loss, torch.randn(5, 3), torch.randn(5, 2))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tracker_explain_uses_the_trackers_loss_and_randomness():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.3), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    report = persample.Tracker(model, F.mse_loss).explain(x, y)  # the Tracker's default: randomness="different"
    assert report.refusals == () and report.entry_points["grad_stats"] == "fast"
    refused = persample.Tracker(model, F.mse_loss, randomness="error").explain(x, y)
    assert [r.code for r in refused.refusals] == ["RANDOM_UNDER_ERROR"] and refused.entry_points["grad_stats"] is None
