"""persample.noise against its formulas, computed independently from the float64 oracle gradients."""

import dataclasses
import math

import pytest
import torch
from torch import nn

import persample
from persample import GradStats, Tracker, noise

from zoo import CASE_IDS, CASES, oracle_grads

RTOL = 1e-9
NOISE_CASES = [
    CASES[CASE_IDS.index(n)] for n in ("mlp", "cnn_groupnorm_pool", "raw_parameters", "tied_weights", "two_inputs")
]


def flat(grads):
    """[B, P] matrix of the per-example gradients, in named_parameters order."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def reference_values(G):
    """Every diagnostic straight from its definition, on a [B, P] float64 matrix."""
    B = G.shape[0]
    gbar = G.mean(0)
    mean_sq = gbar.pow(2).sum()
    sq = G.pow(2).sum(1)
    trace = G.var(0, unbiased=True).sum()  # Σ_j Var_unbiased(g_ij)
    grad_sq = (B * mean_sq - sq.mean()) / (B - 1)
    p = G @ gbar
    ortho = G - (p / mean_sq)[:, None] * gbar  # components orthogonal to ḡ
    return dict(
        B=B,
        mean_sq=mean_sq.item(),
        grad_sq=grad_sq.item(),
        trace=trace.item(),
        b_simple=(trace / grad_sq).item(),
        norm=math.sqrt(trace / (B * mean_sq)),
        norm_var=trace.item(),
        inner=math.sqrt(p.var(unbiased=True) / (B * mean_sq**2)),
        inner_var=p.var(unbiased=True).item(),
        ortho=math.sqrt(ortho.pow(2).sum() / (B - 1) / (B * mean_sq)),
        ortho_var=(ortho.pow(2).sum() / (B - 1)).item(),
        diversity=(sq.sum() / G.sum(0).pow(2).sum()).item(),
    )


def close(a, b, rtol=RTOL):
    assert a == pytest.approx(b, rel=rtol, abs=1e-14), (a, b)


@pytest.fixture(params=NOISE_CASES, ids=lambda c: c.name)
def case_stats(request):
    case = request.param
    model, inputs, targets = case.instantiate(batch=6)
    grads, losses = oracle_grads(model, case.loss_fn, inputs, targets)
    stats = persample.grad_stats(model, case.loss_fn, inputs, targets, inner_products=True)
    return grads, stats


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_every_function_matches_its_formula(case_stats, chunk_size):
    grads, stats = case_stats
    if chunk_size is not None:  # streamed in several chunks, inner products in a second pass
        stats = GradStats.merge_all(
            [
                GradStats.from_per_example(
                    {k: g[s : s + chunk_size] for k, g in grads.items()},
                    torch.zeros(len(range(s, min(s + chunk_size, 6)))),
                    reference=stats.reference,
                )
                for s in range(0, 6, chunk_size)
            ]
        )
    ref = reference_values(flat(grads))
    est = noise.gradient_noise_scale(stats)
    close(est.grad_sq, ref["grad_sq"])
    close(est.trace_cov, ref["trace"])
    close(est.b_simple, ref["b_simple"])
    close(est.mean_sq_norm, ref["mean_sq"])
    for test, key, thr in (
        (noise.norm_test, "norm", 0.9),
        (noise.inner_product_test, "inner", 0.9),
        (noise.orthogonality_test, "ortho", 5.84),
    ):
        result = test(stats)
        close(result.statistic, ref[key])
        close(result.variance, ref[f"{key}_var"])
        assert result.threshold == thr and result.n == 6
        assert result.passed == (ref[key] <= thr)
        expected_b = max(1, math.ceil(6 * (ref[key] / thr) ** 2 - 1e-9))
        assert result.suggested_batch_size == expected_b
    close(noise.gradient_diversity(stats), ref["diversity"])


def test_trace_cov_is_the_sum_of_the_unbiased_variances(case_stats):
    _, stats = case_stats
    total_var = sum(v.sum().item() for v in stats.var.values())
    close(noise.gradient_noise_scale(stats).trace_cov, total_var)


def test_gsnr_per_element_and_mean(case_stats):
    grads, stats = case_stats
    values = noise.gsnr(stats)
    assert list(values) == list(grads)
    all_ratios = []
    for name, g in grads.items():
        expected = g.mean(0).pow(2) / g.var(0, unbiased=True)
        torch.testing.assert_close(values[name], expected, rtol=RTOL, atol=0, equal_nan=True)
        all_ratios.append(expected[g.var(0) > 0].flatten())
    close(noise.mean_gsnr(stats), torch.cat(all_ratios).mean().item())


def test_per_layer_groups_by_module_prefix(case_stats):
    grads, stats = case_stats
    groups = noise.group_by_layer(grads)
    for layer, names in groups.items():
        assert all((n.rsplit(".", 1)[0] if "." in n else n) == layer for n in names)
    scales = noise.layer_noise_scale(stats)
    gsnrs = noise.layer_gsnr(stats)
    assert list(scales) == list(groups) == list(gsnrs)
    for layer, names in groups.items():
        sub = {n: grads[n] for n in names}
        ref = reference_values(flat(sub))
        close(scales[layer].grad_sq, ref["grad_sq"])
        close(scales[layer].trace_cov, ref["trace"])
        close(scales[layer].b_simple, ref["b_simple"])
        ratios = torch.cat([(g.mean(0).pow(2) / g.var(0))[g.var(0) > 0].flatten() for g in sub.values()])
        close(gsnrs[layer], ratios.mean().item() if ratios.numel() else math.nan)
    # The layers partition the parameters: numerators and denominators add up.
    whole = noise.gradient_noise_scale(stats)
    close(sum(s.grad_sq for s in scales.values()), whole.grad_sq)
    close(sum(s.trace_cov for s in scales.values()), whole.trace_cov)


def test_group_by_layer_names():
    names = ["encoder.layer.0.attn.weight", "encoder.layer.0.attn.bias", "scale", "head.weight", "w"]
    assert noise.group_by_layer(names) == {
        "encoder.layer.0.attn": names[:2],
        "scale": ["scale"],
        "head": ["head.weight"],
        "w": ["w"],
    }


def test_diagnostics_row_agrees_with_the_functions(case_stats):
    _, stats = case_stats
    row = noise.diagnostics(stats)
    est = noise.gradient_noise_scale(stats)
    assert row["n"] == 6 and row["b_simple"] == est.b_simple and row["grad_sq"] == est.grad_sq
    assert row["gsnr_mean"] == noise.mean_gsnr(stats)
    assert row["norm_test"] == noise.norm_test(stats).statistic
    assert row["inner_test_batch"] == noise.inner_product_test(stats).suggested_batch_size
    assert row["ortho_test_threshold"] == noise.DEFAULT_ORTHO_THRESHOLD
    close(row["grad_norm"], math.sqrt(est.mean_sq_norm))
    close(row["norm_p50"], stats.norms.median().item() if stats.n % 2 else torch.quantile(stats.norms, 0.5).item())
    for layer, s in noise.layer_noise_scale(stats).items():
        assert row[f"layer/{layer}/b_simple"] == s.b_simple
    assert all(isinstance(v, float) for v in row.values())


# ----------------------------------------------------------------- unbiasedness


def _population():
    """A fixed data set of 10 examples and their float64 oracle gradients."""
    case = CASES[CASE_IDS.index("mlp")]
    model, inputs, targets = case.instantiate(batch=10, seed=3)
    grads, losses = oracle_grads(model, case.loss_fn, inputs, targets)
    G = flat(grads)
    mean = G.mean(0)
    return grads, losses, mean.pow(2).sum().item(), (G - mean).pow(2).sum(1).mean().item()


def _stats_of(grads, losses, idx):
    return GradStats.from_per_example({k: g[idx] for k, g in grads.items()}, losses[idx])


@pytest.mark.parametrize("B", [2, 3])
def test_unbiased_exactly_over_every_batch_drawn_with_replacement(B):
    """The expectation over all N^B equally likely ordered batches equals the population values."""
    grads, losses, true_grad_sq, true_trace = _population()
    N = losses.shape[0]
    idx = torch.cartesian_prod(*[torch.arange(N)] * B).reshape(-1, B)
    ests = [noise.gradient_noise_scale(_stats_of(grads, losses, i)) for i in idx]
    close(sum(e.grad_sq for e in ests) / len(ests), true_grad_sq, rtol=1e-9)
    close(sum(e.trace_cov for e in ests) / len(ests), true_trace, rtol=1e-9)


def test_unbiased_monte_carlo_and_plug_in_is_biased():
    """Means over many resampled batches converge to |G|² and tr Σ; ‖ḡ‖² overshoots |G|² by tr Σ/B."""
    grads, losses, true_grad_sq, true_trace = _population()
    gen = torch.Generator().manual_seed(0)
    B, draws = 8, 10000
    rows = [
        noise.gradient_noise_scale(_stats_of(grads, losses, torch.randint(0, 10, (B,), generator=gen)))
        for _ in range(draws)
    ]

    def mean_and_se(values):
        t = torch.tensor(values, dtype=torch.float64)
        return t.mean().item(), t.std().item() / math.sqrt(len(values))

    g_mean, g_se = mean_and_se([r.grad_sq for r in rows])
    t_mean, t_se = mean_and_se([r.trace_cov for r in rows])
    p_mean, p_se = mean_and_se([r.mean_sq_norm for r in rows])
    print(
        f"\n|G|^2: true {true_grad_sq:.5f}, mean of {draws} estimates {g_mean:.5f} ± {g_se:.5f}"
        f"\ntr S : true {true_trace:.5f}, mean of {draws} estimates {t_mean:.5f} ± {t_se:.5f}"
        f"\nplug-in |gbar|^2: {p_mean:.5f} ± {p_se:.5f} (expected bias tr S/B = {true_trace / B:.5f})"
    )
    assert abs(g_mean - true_grad_sq) < 4 * g_se
    assert abs(t_mean - true_trace) < 4 * t_se
    # The test has the power to see a bias of tr Σ / B.
    assert abs(p_mean - true_grad_sq) > 4 * p_se
    assert abs(p_mean - (true_grad_sq + true_trace / B)) < 4 * p_se


# ---------------------------------------------------------------------------- EMA


def _random_stats(seed, B=5, P=7, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    grads = {"layer.weight": torch.randn(B, P, generator=g, dtype=torch.float64) + shift}
    return GradStats.from_per_example(grads, torch.zeros(B, dtype=torch.float64))


def test_ema_against_a_hand_computation():
    beta = 0.8
    seq = [_random_stats(s) for s in range(6)]
    ema = noise.NoiseScaleEMA(beta)
    assert math.isnan(ema.value) and ema.steps == 0
    num = den = 0.0
    for t, stats in enumerate(seq, 1):
        value = ema.update(stats)
        G = stats.mean["layer.weight"]
        B = stats.n
        sq = stats.sq_norms.mean().item()
        grad_sq = (B * G.pow(2).sum().item() - sq) / (B - 1)
        trace = (sq - G.pow(2).sum().item()) * B / (B - 1)
        num = beta * num + (1 - beta) * trace
        den = beta * den + (1 - beta) * grad_sq
        corrected_num, corrected_den = num / (1 - beta**t), den / (1 - beta**t)
        close(ema.trace_cov, corrected_num)
        close(ema.grad_sq, corrected_den)
        close(value, corrected_num / corrected_den)
    ratios = [noise.gradient_noise_scale(s).b_simple for s in seq]
    assert ema.value != pytest.approx(sum(ratios) / len(ratios), rel=1e-3)  # never the mean of ratios


def test_ema_first_update_is_the_raw_estimate_and_beta_zero_tracks_the_last():
    seq = [_random_stats(s) for s in range(3)]
    ema = noise.NoiseScaleEMA(0.99)
    close(ema.update(seq[0]), noise.gradient_noise_scale(seq[0]).b_simple)  # bias correction
    last = noise.NoiseScaleEMA(0.0)
    for s in seq:
        last.update(s)
    close(last.value, noise.gradient_noise_scale(seq[-1]).b_simple)
    ema.reset()
    assert ema.steps == 0 and math.isnan(ema.value)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, "0.9", True])
def test_ema_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        noise.NoiseScaleEMA(beta)


def test_ema_as_a_tracker_hook():
    case = CASES[CASE_IDS.index("mlp")]
    model, _, _ = case.instantiate()
    tracker = Tracker(model, case.loss_fn, every=2)
    ema = noise.NoiseScaleEMA(0.5)
    tracker.register_hook(ema)
    seen = []
    tracker.register_hook(lambda t, s: seen.append(noise.gradient_noise_scale(s)))
    for _ in range(5):
        tracker.step(*case.make_batch(4))
    assert ema.steps == 3 == len(seen)
    manual = noise.NoiseScaleEMA(0.5)
    for est in seen:
        manual.update(est)
    close(ema.value, manual.value)


# --------------------------------------------------------------------- edge cases

ALL_NEEDING_TWO = [
    noise.gradient_noise_scale,
    noise.gsnr,
    noise.mean_gsnr,
    noise.norm_test,
    noise.inner_product_test,
    noise.orthogonality_test,
    noise.layer_noise_scale,
    noise.layer_gsnr,
    noise.diagnostics,
]


@pytest.mark.parametrize("fn", ALL_NEEDING_TWO, ids=lambda f: f.__name__)
def test_one_example_is_an_error(fn):
    torch.manual_seed(0)
    grads = {"w": torch.randn(1, 3, dtype=torch.float64)}
    stats = GradStats.from_per_example(grads, torch.zeros(1), reference={"w": grads["w"][0]})
    with pytest.raises(ValueError, match="needs at least 2 examples"):
        fn(stats)


def test_diversity_of_one_example_is_one():
    torch.manual_seed(0)
    stats = GradStats.from_per_example({"w": torch.randn(1, 3, dtype=torch.float64)}, torch.zeros(1))
    assert noise.gradient_diversity(stats) == pytest.approx(1.0)


def test_all_zero_gradient_gives_the_documented_nans():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    stats = persample.grad_stats(model, lambda out, t: (out * 0).sum(), x, y, inner_products=True)
    est = noise.gradient_noise_scale(stats)
    assert est.grad_sq == 0 and est.trace_cov == 0 and math.isnan(est.b_simple)
    for test in (noise.norm_test, noise.inner_product_test, noise.orthogonality_test):
        result = test(stats)
        assert math.isnan(result.statistic) and math.isnan(result.suggested_batch_size)
        assert result.passed is False
    assert all(torch.isnan(v).all() for v in noise.gsnr(stats).values())
    assert math.isnan(noise.mean_gsnr(stats))
    assert math.isnan(noise.gradient_diversity(stats))
    assert all(math.isnan(s.b_simple) for s in noise.layer_noise_scale(stats).values())
    assert all(math.isnan(v) for v in noise.layer_gsnr(stats).values())
    ema = noise.NoiseScaleEMA()
    assert math.isnan(ema.update(stats))


def test_zero_mean_with_disagreeing_examples_gives_inf():
    v = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    stats = GradStats.from_per_example(
        {"w": torch.cat([v, -v])},
        torch.zeros(2, dtype=torch.float64),
        reference={"w": torch.zeros(3, dtype=torch.float64)},
    )
    result = noise.norm_test(stats)
    assert result.statistic == math.inf and result.suggested_batch_size == math.inf and not result.passed
    assert noise.gradient_diversity(stats) == math.inf
    est = noise.gradient_noise_scale(stats)
    assert est.grad_sq < 0 and est.b_simple < 0  # documented: negative |G|² estimate
    assert math.isnan(noise.inner_product_test(stats).statistic)


def test_dead_elements_are_left_out_of_mean_gsnr():
    g = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0], [2.0, 0.0, 2.0]], dtype=torch.float64)
    stats = GradStats.from_per_example({"w": g}, torch.zeros(3, dtype=torch.float64))
    values = noise.gsnr(stats)["w"]
    assert values[0] == pytest.approx(4.0) and math.isnan(values[1]) and values[2] == math.inf
    assert noise.mean_gsnr(stats) == pytest.approx(4.0)


@pytest.mark.parametrize(
    "field,key", [("mean", "stats.mean['w']"), ("param_sq_norms", "stats.param_sq_norms['w']"), ("m2", "stats.m2['w']")]
)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_statistics_are_named(field, key, bad):
    torch.manual_seed(0)
    stats = GradStats.from_per_example({"w": torch.randn(4, 3, dtype=torch.float64)}, torch.zeros(4))
    values = {k: v.clone() for k, v in getattr(stats, field).items()}
    values["w"].view(-1)[0] = bad
    broken = dataclasses.replace(stats, **{field: values})
    fns = (
        [noise.gsnr, noise.mean_gsnr, noise.layer_gsnr]
        if field == "m2"
        else [
            noise.gradient_noise_scale,
            noise.norm_test,
            noise.gradient_diversity,
            noise.layer_noise_scale,
            noise.diagnostics,
        ]
    )
    for fn in fns:
        with pytest.raises(ValueError, match=r"non-finite values in " + key.replace("[", r"\[")):
            fn(broken)


def test_non_finite_inner_products_are_named():
    torch.manual_seed(0)
    grads = {"w": torch.randn(4, 3, dtype=torch.float64)}
    stats = GradStats.from_per_example(grads, torch.zeros(4), reference={"w": grads["w"].mean(0)})
    broken = dataclasses.replace(stats, inner_products=torch.tensor([1.0, math.nan, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"non-finite values in stats.inner_products \(1 of 4"):
        noise.inner_product_test(broken)


def test_tests_without_inner_products_say_how_to_get_them():
    case = CASES[0]
    model, x, y = case.instantiate()
    stats = persample.grad_stats(model, case.loss_fn, x, y)
    for test in (noise.inner_product_test, noise.orthogonality_test):
        with pytest.raises(ValueError, match=r"pass inner_products=True to persample.grad_stats"):
            test(stats)
    noise.norm_test(stats)  # needs no inner products
    row = noise.diagnostics(stats)
    assert math.isnan(row["inner_test"]) and math.isnan(row["ortho_test_batch"])
    assert math.isfinite(row["norm_test"])


def test_merge_with_a_shared_reference_is_exact_and_different_references_are_refused():
    case = CASES[0]
    model, x, y = case.instantiate(batch=6)
    whole = persample.grad_stats(model, case.loss_fn, x, y, inner_products=True)
    # Two halves computed separately carry different references: merging drops them.
    a = persample.grad_stats(model, case.loss_fn, x[:3], y[:3], inner_products=True)
    b = persample.grad_stats(model, case.loss_fn, x[3:], y[3:], inner_products=True)
    with pytest.raises(ValueError, match="inner_products=True"):
        noise.inner_product_test(a.merge(b))
    # Halves relative to the whole batch's mean merge into exactly the whole batch's test.
    grads, losses = oracle_grads(model, case.loss_fn, x, y)
    ref = whole.reference
    halves = [
        GradStats.from_per_example({k: g[s] for k, g in grads.items()}, losses[s], reference=ref)
        for s in (slice(0, 3), slice(3, 6))
    ]
    merged = halves[0].merge(halves[1])
    for test in (noise.inner_product_test, noise.orthogonality_test):
        close(test(merged).statistic, test(whole).statistic)
    # A record whose reference is not its own mean: the orthogonality test refuses it (the inner-product
    # test is then the test along that reference, see test_shared_reference.py).
    with pytest.raises(ValueError, match="relative to this batch's mean"):
        noise.orthogonality_test(halves[0])


def test_gsnr_needs_variance():
    case = CASES[0]
    model, x, y = case.instantiate()
    stats = persample.grad_stats(model, case.loss_fn, x, y, var=False)
    for fn in (noise.gsnr, noise.mean_gsnr, noise.layer_gsnr):
        with pytest.raises(ValueError, match="var=True"):
            fn(stats)
    assert math.isnan(noise.diagnostics(stats)["gsnr_mean"])
    assert math.isfinite(noise.gradient_noise_scale(stats).b_simple)


@pytest.mark.parametrize("threshold", [0, -1.0, math.inf, math.nan, "0.9"])
def test_bad_thresholds(threshold):
    stats = _random_stats(0)
    with pytest.raises(ValueError, match="threshold must be a positive finite number"):
        noise.norm_test(stats, threshold)


def test_float32_statistics_are_reduced_in_float64():
    """|G|² is a difference of close numbers: float32 inputs, float64 arithmetic."""
    torch.manual_seed(0)
    g64 = torch.randn(64, 1000, dtype=torch.float64) * 0.01 + 1.0  # large mean, small noise
    s64 = GradStats.from_per_example({"w": g64}, torch.zeros(64, dtype=torch.float64))
    s32 = s64.to(dtype=torch.float32)
    ref = reference_values(g64)
    est = noise.gradient_noise_scale(s32)
    assert isinstance(est.grad_sq, float)
    assert est.grad_sq == pytest.approx(ref["grad_sq"], rel=1e-5)
    assert noise.mean_gsnr(s32) == pytest.approx(noise.mean_gsnr(s64), rel=1e-4)
    assert noise.gsnr(s32)["w"].dtype == torch.float32


def test_type_errors():
    with pytest.raises(TypeError, match="GradStats"):
        noise.gradient_noise_scale({"w": torch.zeros(3)})
