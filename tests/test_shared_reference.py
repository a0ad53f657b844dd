"""Inner products against a fixed reference r, p_i = ⟨g_i, r⟩: every engine, observe, merges across
micro-batches (Tracker.accumulate(reference=...)), and the tests that read them (issue 13).
Oracle: a float64 loop of autograd per example."""

import math
import warnings

import pytest
import torch

import persample
from persample import GradStats, Tracker, noise
from persample.loggers import Diagnostics

from zoo import CASE_IDS, CASES, oracle_grads

MLP = CASES[CASE_IDS.index("mlp")]
GPT2 = CASES[CASE_IDS.index("hf_gpt2")]


def _flat(grads):
    b = next(iter(grads.values())).shape[0]
    return torch.cat([g.reshape(b, -1) for g in grads.values()], 1)


def _random_reference(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


def _expected_inner(grads, reference):
    return _flat(grads) @ torch.cat([reference[k].reshape(-1) for k in grads])


@pytest.mark.parametrize("engine", ["fast", "vmap", "loop"])
@pytest.mark.parametrize("case", [MLP, GPT2], ids=["mlp", "hf_gpt2"])
def test_every_engine_gives_inner_products_against_a_fixed_reference(engine, case):
    model, x, y = case.instantiate(batch=5)
    reference = _random_reference(model)
    grads, _ = oracle_grads(model, case.loss_fn, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = persample.grad_stats(
            model, case.loss_fn, x, y, engine=engine, reference=reference, chunk_size=2
        )  # the streamed engines: one pass over 3 chunks
    torch.testing.assert_close(stats.inner_products, _expected_inner(grads, reference), rtol=1e-9, atol=1e-12)
    assert all(torch.equal(stats.reference[k], reference[k]) for k in reference)


def test_observe_gives_inner_products_against_a_fixed_reference():
    model, x, y = MLP.instantiate(batch=5)
    reference = _random_reference(model)
    grads, _ = oracle_grads(model, MLP.loss_fn, x, y)
    tracker = Tracker(model, MLP.loss_fn)
    with tracker.accumulate(reference=reference) as acc:
        with tracker.observe(y) as observed:
            MLP.loss_fn(model(x), y).backward()
    torch.testing.assert_close(observed.stats.inner_products, _expected_inner(grads, reference), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(acc.stats.inner_products, _expected_inner(grads, reference), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", [MLP, GPT2], ids=["mlp", "hf_gpt2"])
@pytest.mark.parametrize("mode", ["dict", "first", "last", "observe"])
def test_accumulated_micro_batches_keep_the_whole_batchs_inner_products(case, mode):
    """Micro-batches against one shared r merge into the statistics of the whole batch, p_i included;
    before, the merged record had no inner products."""
    model, x, y = case.instantiate(batch=6)
    grads, _ = oracle_grads(model, case.loss_fn, x, y)
    tracker = Tracker(model, case.loss_fn)
    if mode in ("last", "observe"):
        tracker.step(x[:2], y[:2])  # a published step: its mean is the reference
        reference = {k: v.clone() for k, v in tracker.last_stats.mean.items()}
    elif mode == "dict":
        reference = _random_reference(model)
    rows = []
    tracker.register_hook(lambda t, s: rows.append(s))
    model.zero_grad()
    with tracker.accumulate(reference="last" if mode == "observe" else (reference if mode == "dict" else mode)) as acc:
        for part in (slice(0, 2), slice(2, 3), slice(3, 6)):
            if mode == "observe":
                with tracker.observe(y[part]):
                    (case.loss_fn(model(x[part]), y[part]) * (x[part].shape[0] / 6)).backward()
            else:
                tracker.step(x[part], y[part], scale=x[part].shape[0] / 6)
    if mode == "first":
        reference = {k: g[:2].mean(0) for k, g in grads.items()}
    stats = acc.stats
    assert rows == [stats] and stats.n == 6
    torch.testing.assert_close(stats.inner_products, _expected_inner(grads, reference), rtol=1e-9, atol=1e-12)
    for k, g in grads.items():
        torch.testing.assert_close(stats.mean[k], g.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.reference[k], reference[k], rtol=1e-9, atol=1e-15)
    for n, p in model.named_parameters():  # p.grad is still the loop's own backward
        torch.testing.assert_close(p.grad, grads[n].mean(0), rtol=1e-9, atol=1e-12)


def test_last_before_any_published_statistics_gives_no_inner_products():
    model, x, y = MLP.instantiate(batch=4)
    tracker = Tracker(model, MLP.loss_fn)
    with tracker.accumulate(reference="last") as acc:
        tracker.step(x[:2], y[:2])
        tracker.step(x[2:], y[2:])
    assert acc.stats.n == 4 and acc.stats.inner_products is None and acc.reference is None
    first = next(model.parameters())
    first.requires_grad_(False)  # the trainable parameters changed: the last mean is no direction for them
    with tracker.accumulate(reference="last") as acc:
        tracker.step(x[:2], y[:2])
        tracker.step(x[2:], y[2:])
    assert acc.stats.n == 4 and acc.stats.inner_products is None
    first.requires_grad_(True)


@pytest.mark.parametrize(
    "reference, error, message",
    [
        ("previous", ValueError, "must be None, 'last', 'first' or a dict"),
        ({"0.weight": torch.zeros(1)}, ValueError, "missing"),
        ("shape", ValueError, r"reference\['0.weight'\] must be a tensor of the parameter's shape"),
        ("nan", ValueError, "non-finite"),
    ],
)
def test_bad_references_are_named(reference, error, message):
    model, x, y = MLP.instantiate(batch=4)
    if reference in ("shape", "nan"):
        bad = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        bad["0.weight"] = torch.zeros(3) if reference == "shape" else torch.full_like(bad["0.weight"], math.nan)
        reference = bad
    with pytest.raises(error, match=message):
        with Tracker(model, MLP.loss_fn).accumulate(reference=reference):
            pass
    if isinstance(reference, dict):
        with pytest.raises(error, match=message):
            persample.grad_stats(model, MLP.loss_fn, x, y, reference=reference)


# ------------------------------------------------------------------------------- the tests


def _stats_against(reference_of, n=8, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, p, generator=g, dtype=torch.float64) + 0.7
    reference = reference_of(grads)
    return (
        grads,
        reference,
        GradStats.from_per_example({"w": grads}, torch.zeros(n, dtype=torch.float64), reference={"w": reference}),
    )


def test_inner_product_test_against_any_reference():
    """θ = sqrt(Var(p_i) / (B ⟨ḡ, r⟩²)) with p_i = ⟨g_i, r⟩: the test of the directional derivative along
    r; for r = c·ḡ it is Bollapragada et al.'s test, for every c > 0."""
    grads, r, stats = _stats_against(lambda g: torch.linspace(-1, 2, g.shape[1], dtype=torch.float64))
    p, mean = grads @ r, grads.mean(0)
    theta = math.sqrt(float(p.var(unbiased=True)) / (8 * float(mean @ r) ** 2))
    result = noise.inner_product_test(stats, 0.5)
    assert result.statistic == pytest.approx(theta, rel=1e-12)
    assert result.suggested_batch_size == math.ceil(float(p.var()) / (0.25 * float(mean @ r) ** 2))
    _, _, along_mean = _stats_against(lambda g: g.mean(0))
    _, _, along_scaled_mean = _stats_against(lambda g: 3.0 * g.mean(0))
    assert noise.inner_product_test(along_scaled_mean).statistic == pytest.approx(
        noise.inner_product_test(along_mean).statistic, rel=1e-12
    )


def test_orthogonality_test_and_diagnostics_against_another_reference():
    """The orthogonality test has no unique form for a reference that is not the batch mean: refused, and
    NaN in the diagnostics row, whose other columns (inner_test along r included) are computed."""
    _, _, stats = _stats_against(lambda g: torch.linspace(-1, 2, g.shape[1], dtype=torch.float64))
    with pytest.raises(ValueError, match="orthogonality_test needs inner products relative to this batch's mean"):
        noise.orthogonality_test(stats)
    row = noise.diagnostics(stats)
    assert math.isnan(row["ortho_test"]) and math.isnan(row["ortho_test_batch"])
    assert row["inner_test"] == noise.inner_product_test(stats).statistic
    assert math.isfinite(row["norm_test"]) and math.isfinite(row["b_simple"])


def test_the_diagnostics_hook_logs_accumulated_steps_with_a_shared_reference():
    """Before, a record whose inner products are not relative to its own mean made the hook raise."""
    model, x, y = MLP.instantiate(batch=6)
    tracker = Tracker(model, MLP.loss_fn, inner_products=True)
    diagnostics = Diagnostics()
    tracker.register_hook(diagnostics)
    with pytest.warns(UserWarning, match="orthogonality"):
        with tracker.accumulate(reference="first"):
            tracker.step(x[:3], y[:3], scale=0.5)
            tracker.step(x[3:], y[3:], scale=0.5)
    row = diagnostics.rows[-1]
    assert math.isfinite(row["inner_test"]) and math.isnan(row["ortho_test"])
    tracker.step(x, y)  # a plain statistics step: every test, against its own mean
    assert math.isfinite(diagnostics.rows[-1]["ortho_test"])
