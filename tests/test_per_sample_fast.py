"""per_sample_grads from the fast engine: the float64 oracle's rows, or the engine's refusal.

``engine="auto"`` tries fast, then vmap, then the loop (as grad_stats does); the fast engine forms
each parameter's g_i from its pieces, in chunks written into the result.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import NotExact
from persample.engines.fast import pieces as pieces_module

from test_fast_engine import NOT_EXACT
from test_silent_coupled_losses import _case as coupled_case
from zoo import CASE_IDS, CASES, assert_dicts_close, oracle_grads


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fast_per_sample_grads_are_the_oracles_rows_on_the_zoo(case):
    model, x, y = case.instantiate(batch=5)
    want, _ = oracle_grads(model, case.loss_fn, x, y)
    got = persample.per_sample_grads(model, case.loss_fn, x, y, engine="fast")
    assert list(got) == list(want)  # named_parameters() order
    assert_dicts_close(got, want)


@pytest.mark.parametrize("name", ["mlp", "cnn_groupnorm_pool", "tied_weights", "module_reused", "lstm", "hf_gpt2"])
def test_chunked_formation_gives_the_same_rows(name, monkeypatch):
    """Pieces formed a few examples at a time, into the result (``out=``) or copied there."""
    case = CASES[CASE_IDS.index(name)]
    model, x, y = case.instantiate(batch=5)
    want, _ = oracle_grads(model, case.loss_fn, x, y)
    monkeypatch.setattr(pieces_module, "CHUNK_ELEMENTS", 64)
    assert_dicts_close(persample.per_sample_grads(model, case.loss_fn, x, y, engine="fast"), want)


def _only_fast(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("per_sample_grads left the fast engine")

    monkeypatch.setattr(persample.api, "per_example_grads", refuse)
    monkeypatch.setattr(persample.api, "loop_grads", refuse)


@pytest.mark.parametrize("case_id", ["hf-gpt2-mask-padded", "hf-gpt2-mask-padded-left", "hf-llama-mask-padded"])
def test_auto_takes_the_fast_engine_on_padded_hugging_face_models(case_id, monkeypatch):
    """vmap refuses HF's mask code, so auto used to run B forward + backward passes here."""
    pytest.importorskip("transformers")
    from test_real_models import BY_ID, dict_mismatch, expected

    case = BY_ID[case_id]
    want = expected(case_id)
    model, inputs, targets = case.instantiate()
    _only_fast(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", persample.SlowPathWarning)
        got = persample.per_sample_grads(model, case.loss_fn, inputs, targets)
    assert list(got) == list(want.oracle.rows)
    assert dict_mismatch("per_sample_grads", got, want.oracle.rows, want) is None  # the matrix's tolerances


@pytest.mark.parametrize("name, build, batch, loss_fn, message", NOT_EXACT, ids=[c[0] for c in NOT_EXACT])
def test_the_fast_engines_refusals_keep_their_meaning(name, build, batch, loss_fn, message):
    torch.manual_seed(0)
    model = build().double()
    x, y = batch()
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y
    with pytest.raises(NotExact, match=message) as err:
        persample.per_sample_grads(model, loss_fn, x, y, engine="fast")
    assert err.value.code is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persample.SlowPathWarning)
        auto = persample.per_sample_grads(model, loss_fn, x, y)
    assert_dicts_close(auto, oracle_grads(model, loss_fn, x, y)[0])


@pytest.mark.parametrize("name", ["nt_xent", "centred_mse"])
def test_a_coupled_loss_is_refused_from_the_fast_engines_forward(name):
    model, loss_fn, x, y = coupled_case(name)
    with pytest.raises(persample.BatchLossMismatch, match=r"\[BATCH_LOSS_COUPLED\]"):
        persample.per_sample_grads(model, loss_fn, x, y, engine="fast")
    assert_dicts_close(
        persample.per_sample_grads(model, loss_fn, x, y, engine="fast", batch_loss_check=False),
        oracle_grads(model, loss_fn, x, y)[0],
    )


def test_rows_come_in_each_parameters_dtype_and_are_new_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    got = persample.per_sample_grads(model, F.mse_loss, x, y, engine="fast")
    assert {g.dtype for g in got.values()} == {torch.float32}
    pointers = [g.data_ptr() for g in got.values()]
    assert len(set(pointers)) == len(pointers)
    vmap = persample.per_sample_grads(model, F.mse_loss, x, y, engine="vmap")
    assert_dicts_close(got, vmap, rtol=1e-5, atol=1e-6)


def test_explain_names_the_fast_engine_for_per_sample_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    report = persample.explain(model, F.mse_loss, torch.randn(6, 3), torch.randn(6, 2))
    assert report.entry_points["per_sample_grads"] == "fast"


def test_parameters_the_batch_does_not_reach_get_zero_rows():
    """A branch the forward does not use: ZeroPiece forms its rows as one zero tensor."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = TwoHeads().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    got = persample.per_sample_grads(model, F.mse_loss, x, y, engine="fast")
    assert_dicts_close(got, oracle_grads(model, F.mse_loss, x, y)[0])
    assert not got["unused.weight"].any() and got["unused.weight"].shape == (5, 2, 3)
