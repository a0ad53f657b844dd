"""The preconditioned (Adam-aware) noise scale B^P = tr(PΣ) / GᵀPG: against a float64 oracle from
materialised per-example gradients and Adam's state read independently, and against a hand computation."""

import importlib.util
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import persample
from persample import GradStats, Tracker, noise
from persample.loggers import Diagnostics

from zoo import oracle_grads


def _model_and_adam(steps=2, amsgrad=False, cls=torch.optim.Adam, named=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    params = model.named_parameters() if named else model.parameters()
    opt = cls(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, amsgrad=amsgrad)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    return model, opt, x, y


def _oracle(model, opt, x, y, names=None, amsgrad=False):
    """B^P from a loop of autograd in float64 and Adam's state, read here on its own. P_j = 1/(sqrt(v̂_j) + ε)
    where Adam has a second moment (v̂_j > 0); P_j = 0 where it has none (v̂_j = 0, or no state at all)."""
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    trace = signal = 0.0
    for name, p in model.named_parameters():
        if names is not None and name not in names:
            continue
        st = opt.state.get(p, {})
        if not st:
            continue  # no gradient so far: P = 0 on the whole parameter, nothing to add
        v = (st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"]) / (1 - 0.99 ** float(st["step"]))
        P = torch.zeros_like(v)
        P[v > 0] = 1 / (v[v > 0].sqrt() + 1e-6)
        g = grads[name]
        var = g.var(dim=0, unbiased=True)
        trace += float((P * var).sum())
        signal += float((P * (g.mean(0) ** 2 - var / g.shape[0])).sum())
    return trace, signal, trace / signal


@pytest.mark.parametrize(
    "cls,amsgrad", [(torch.optim.Adam, False), (torch.optim.AdamW, False), (torch.optim.Adam, True)]
)
def test_preconditioned_noise_scale_is_the_oracles(cls, amsgrad):
    model, opt, x, y = _model_and_adam(cls=cls, amsgrad=amsgrad)
    stats = persample.grad_stats(model, F.cross_entropy, x, y)
    est = noise.preconditioned_noise_scale(stats, opt, model=model)
    trace, signal, b = _oracle(model, opt, x, y, amsgrad=amsgrad)
    assert est.estimator == "preconditioned" and est.n == 6
    assert est.trace_cov == pytest.approx(trace, rel=1e-9)
    assert est.grad_sq == pytest.approx(signal, rel=1e-9)
    assert est.b_simple == pytest.approx(b, rel=1e-9)
    layers = noise.layer_preconditioned_noise_scale(stats, opt, model=model)
    assert list(layers) == ["0", "2"]
    for layer, names in (("0", {"0.weight", "0.bias"}), ("2", {"2.weight", "2.bias"})):
        t, _, lb = _oracle(model, opt, x, y, names=names, amsgrad=amsgrad)
        assert layers[layer].trace_cov == pytest.approx(t, rel=1e-9)
        assert layers[layer].b_simple == pytest.approx(lb, rel=1e-9)
    assert sum(v.trace_cov for v in layers.values()) == pytest.approx(est.trace_cov, rel=1e-12)


def test_by_hand_and_p_equal_one_is_b_simple():
    # B = 3 examples of a 2-vector: g = (1, 0), (3, 2), (2, 1); ḡ = (2, 1); Var = (1, 1).
    g = {"w": torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]], dtype=torch.float64)}
    stats = GradStats.from_per_example(g, torch.zeros(3, dtype=torch.float64))
    est = noise.preconditioned_noise_scale(stats, preconditioner={"w": torch.tensor([1.0, 4.0])})
    # tr(PΣ) = 1·1 + 4·1 = 5;  GᵀPG = 1·(4 − 1/3) + 4·(1 − 1/3) = 19/3;  B^P = 15/19
    assert est.trace_cov == pytest.approx(5.0, rel=1e-15)
    assert est.grad_sq == pytest.approx(19 / 3, rel=1e-15)
    assert est.b_simple == pytest.approx(15 / 19, rel=1e-15)
    plain = noise.gradient_noise_scale(stats)
    ones = noise.preconditioned_noise_scale(stats, preconditioner={"w": 1.0})
    assert (ones.trace_cov, ones.grad_sq, ones.b_simple) == pytest.approx(
        (plain.trace_cov, plain.grad_sq, plain.b_simple), rel=1e-12
    )


def test_named_parameter_optimizer_needs_no_model():
    model, opt, x, y = _model_and_adam(named=True)
    stats = persample.grad_stats(model, F.cross_entropy, x, y)
    assert noise.preconditioned_noise_scale(stats, opt).b_simple == pytest.approx(
        _oracle(model, opt, x, y)[2], rel=1e-9
    )


def test_preconditioned_refusals():
    model, opt, x, y = _model_and_adam()
    stats = persample.grad_stats(model, F.cross_entropy, x, y)
    no_var = persample.grad_stats(model, F.cross_entropy, x, y, var=False)
    with pytest.raises(ValueError, match="var=True"):
        noise.preconditioned_noise_scale(no_var, opt, model=model)
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="has not taken a step"):
        noise.preconditioned_noise_scale(stats, fresh, model=model)
    with pytest.raises(ValueError, match="preconditioner="):
        noise.preconditioned_noise_scale(stats, torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with pytest.raises(ValueError, match="model="):
        noise.preconditioned_noise_scale(stats, opt)
    with pytest.raises(ValueError, match="exactly one"):
        noise.preconditioned_noise_scale(stats)
    with pytest.raises(ValueError, match="no entry for '2.bias'"):
        noise.preconditioned_noise_scale(stats, preconditioner={"0.weight": 1.0, "0.bias": 1.0, "2.weight": 1.0})


def test_diagnostics_hook_logs_the_preconditioned_noise_scale():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = Tracker(model, F.mse_loss)
    diag = Diagnostics(optimizer=opt, ema_beta=0.5)
    tracker.register_hook(diag)
    expected, ema = [], noise.NoiseScaleEMA(0.5)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            x = torch.randn(8, 4, generator=g)
            opt.zero_grad()
            stats = tracker.step(x, x.sum(1, keepdim=True))
            expected.append(noise.preconditioned_noise_scale(stats, opt, model=model) if step else None)
            opt.step()
    assert math.isnan(diag.rows[0]["b_precond"]) and math.isnan(diag.rows[0]["b_precond_ema"])  # no state yet
    for row, est in zip(diag.rows[1:], expected[1:]):
        assert row["b_precond"] == pytest.approx(est.b_simple, rel=1e-12)
        assert row["b_precond_ema"] == pytest.approx(ema.update(est), rel=1e-12)
        assert math.isfinite(row["layer/0/b_precond"])
    assert "ema_precond" in diag.state_dict()


def test_a_preconditioner_that_does_not_fit_never_stops_training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    opt = torch.optim.Adam(model[0].parameters(), lr=1e-2)  # holds only the first layer
    other = torch.optim.SGD(model[2].parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="Adam or AdamW"):
        Diagnostics(optimizer=other)
    tracker = Tracker(model, F.mse_loss)
    diag = Diagnostics(optimizer=opt)
    tracker.register_hook(diag)
    x = torch.randn(8, 4)
    with pytest.warns(UserWarning, match="no parameter named '2.weight'"):
        for _ in range(3):
            opt.zero_grad()
            other.zero_grad()
            tracker.step(x, x.sum(1, keepdim=True))
            opt.step()
            other.step()
    assert len(diag.rows) == 3 and all(math.isnan(r["b_precond"]) for r in diag.rows)
    assert all(math.isfinite(r["b_simple"]) for r in diag.rows)


def _adam_with_uninformed_coordinates(cls=torch.optim.Adam, amsgrad=False, drop_bias=True):
    """Adam after two steps in which input feature 0 was always 0 (so the column 0.weight[:, 0] had gradient
    0: v̂ = 0 there) and (``drop_bias``) 2.bias's gradient was dropped (Adam holds no state for it); then a
    batch in which both have gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    opt = cls(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, amsgrad=amsgrad)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        x[:, 0] = 0
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if drop_bias:
            model[2].bias.grad = None
        opt.step()
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    return model, opt, x, y


@pytest.mark.parametrize("drop_bias", [False, True])
@pytest.mark.parametrize(
    "cls,amsgrad", [(torch.optim.Adam, False), (torch.optim.AdamW, False), (torch.optim.Adam, True)]
)
def test_coordinates_adam_has_no_scale_for_are_left_out(cls, amsgrad, drop_bias):
    # Read before the step, 1/(sqrt(v̂) + ε) would weigh a coordinate whose v̂ is 0 by 1/ε = 1e6 here, and
    # its first nonzero gradient would swamp both sums; a parameter without state made it raise.
    model, opt, x, y = _adam_with_uninformed_coordinates(cls, amsgrad, drop_bias)
    key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    assert (opt.state[model[0].weight][key][:, 0] == 0).all() and (model[2].bias not in opt.state) == drop_bias
    stats = persample.grad_stats(model, F.cross_entropy, x, y)
    assert (stats.m2["0.weight"][:, 0] > 0).all() and (stats.m2["2.bias"] > 0).all()  # they do have gradients now
    est = noise.preconditioned_noise_scale(stats, opt, model=model)
    trace, signal, b = _oracle(model, opt, x, y, amsgrad=amsgrad)
    assert est.trace_cov == pytest.approx(trace, rel=1e-9)
    assert est.grad_sq == pytest.approx(signal, rel=1e-9)
    assert est.b_simple == pytest.approx(b, rel=1e-9)
    assert est.excluded == 7 + 3 * drop_bias
    P = noise.adam_preconditioner(opt, model=model)
    assert (P["0.weight"][:, 0] == 0).all() and (P["0.weight"][:, 1:] > 0).all()
    assert bool((P["2.bias"] == 0).all()) == drop_bias
    layers = noise.layer_preconditioned_noise_scale(stats, opt, model=model)
    assert (layers["0"].excluded, layers["2"].excluded) == (7, 3 * drop_bias)
    t2 = _oracle(model, opt, x, y, {"2.weight", "2.bias"}, amsgrad)[0]
    assert layers["2"].trace_cov == pytest.approx(t2, rel=1e-9)
    row = noise.diagnostics(stats, optimizer=opt, model=model, tests=("norm",))
    assert row["precond_excluded"] == est.excluded and row["b_precond"] == pytest.approx(b, rel=1e-9)


def test_by_hand_a_zero_weight_leaves_its_coordinate_out():
    g = {"w": torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]], dtype=torch.float64)}
    stats = GradStats.from_per_example(g, torch.zeros(3, dtype=torch.float64))
    est = noise.preconditioned_noise_scale(stats, preconditioner={"w": torch.tensor([2.0, 0.0])})
    # only the first coordinate: tr(PΣ) = 2·1;  GᵀPG = 2·(4 − 1/3);  B^P = 2 / (22/3) = 3/11
    assert (est.trace_cov, est.grad_sq, est.excluded) == (pytest.approx(2.0), pytest.approx(22 / 3), 1)
    assert est.b_simple == pytest.approx(3 / 11, rel=1e-15)
    assert noise.preconditioned_noise_scale(stats, preconditioner={"w": 1.0}).excluded == 0


def test_diagnostics_hook_counts_the_coordinates_left_out():
    # A ReLU-free picture of a dead input: feature 0 is 0 on the first two steps, then it is not.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = Tracker(model, F.mse_loss)
    diag = Diagnostics(optimizer=opt, ema_beta=0.5)
    tracker.register_hook(diag)
    g = torch.Generator().manual_seed(0)
    expected = []
    for step in range(4):
        x = torch.randn(8, 4, generator=g)
        if step < 2:
            x[:, 0] = 0
        opt.zero_grad()
        stats = tracker.step(x, x.sum(1, keepdim=True))
        expected.append(noise.preconditioned_noise_scale(stats, opt, model=model) if step else None)
        opt.step()
    assert [r["precond_excluded"] for r in diag.rows[1:]] == [6, 6, 0]  # 0.weight[:, 0] until it has a gradient
    for row, est in zip(diag.rows[1:], expected[1:]):
        assert row["b_precond"] == pytest.approx(est.b_simple, rel=1e-12) and row["b_precond"] > 0
        assert row["precond_excluded"] == est.excluded


def test_integration_snapshot_covers_a_parameter_without_state():
    from persample.integrations._common import snapshot_preconditioner

    model, opt, x, y = _adam_with_uninformed_coordinates()
    diag = Diagnostics(optimizer=None)
    snapshot_preconditioner(diag, opt, model)
    assert isinstance(diag.preconditioner, dict) and (diag.preconditioner["2.bias"] == 0).all()
    stats = persample.grad_stats(model, F.cross_entropy, x, y)
    row = diag.row(stats, 3)
    assert row["b_precond"] == pytest.approx(_oracle(model, opt, x, y)[2], rel=1e-9) and row["precond_excluded"] == 10


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn (the demo extra)")
def test_adam_demo_b_precond_ema_is_positive_and_follows_the_steps():
    # The first epoch of `persample demo --optimizer adam` (its model, data, seed, Tracker and Diagnostics):
    # fc1's inputs from conv channels that ReLU has kept at 0 have v̂ = 0; when one first fired, 1/ε made
    # GᵀPG −3.5e4 on one step (≈ 60 on the others) and left the B^P EMA negative for the whole epoch.
    from persample import demo

    torch.manual_seed(0)
    x, y, _, _ = demo.load_digits(seed=0)
    model = demo.build_model("cnn")
    opt = torch.optim.Adam(model.parameters(), lr=demo.DEFAULT_LR["adam"])
    tracker = Tracker(model, F.cross_entropy)
    diag = Diagnostics(optimizer=opt, per_layer=False, tests=("norm",))
    tracker.register_hook(diag)
    demo.train_epoch(tracker, opt, x, y, 64, torch.Generator().manual_seed(0))
    rows = [r for r in diag.rows if math.isfinite(r["b_precond"])]
    assert len(rows) == len(diag.rows) - 1 == 22  # all but the first step (no second moments yet)
    per_step = sorted(r["b_precond"] for r in rows)
    low, high = per_step[len(per_step) // 10], per_step[-len(per_step) // 10]
    assert all(low <= r["b_precond_ema"] <= high for r in rows)
    signal = sorted(abs(r["grad_sq_precond"]) for r in rows)
    assert signal[-1] < 20 * signal[len(signal) // 2]  # no step swamps the EMA
    assert all(r["precond_excluded"] > 0 for r in rows)  # the dead inputs are left out, and counted


def test_hook_logs_the_b_precond_ema_interval_and_the_demo_prints_it():
    from persample.demo import EpochSummary, describe_b_precond, format_table, summarize_epoch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tracker = Tracker(model, F.mse_loss)
    diag = Diagnostics(optimizer=opt, ema_beta=0.5, per_layer=False, tests=("norm",))
    tracker.register_hook(diag)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        x = torch.randn(8, 4, generator=g)
        opt.zero_grad()
        tracker.step(x, x.sum(1, keepdim=True) + torch.randn(8, 1, generator=g))
        opt.step()
    assert all(math.isnan(r["b_precond_ema_lo"]) for r in diag.rows[:4])  # fewer than 4 updates: no interval
    ema = noise.NoiseScaleEMA(0.5)
    for r in diag.rows[1:]:
        ema.update(noise.NoiseScale(8, r["grad_sq_precond"], r["trace_cov_precond"], r["b_precond"], 0.0, 0.0))
    last = diag.rows[-1]
    assert (last["b_precond_ema_lo"], last["b_precond_ema_hi"]) == pytest.approx(ema.interval(0.9), rel=1e-12)
    assert last["b_precond_ema_lo"] < last["b_precond_ema"] < last["b_precond_ema_hi"]
    summary = summarize_epoch(1, diag.rows, diag.ema.value, (0.5, 0.9), 0.8, 1.0)
    assert summary.b_precond_ema == last["b_precond_ema"]
    header, line = format_table(precond=True), format_table(summary, precond=True)
    assert "B_simple(EMA)     B^P(EMA)  mean GSNR" in header and len(line) == len(header)
    assert f"{last['b_precond_ema']:.4g}" in line.split()
    sgd = EpochSummary(1, 0.5, 0.9, 0.8, 12.0, 0.1, 40.0, 1.0)
    assert "B^P" not in format_table() and len(format_table(sgd)) == len(format_table())
    text = describe_b_precond(last["b_precond_ema"], last["b_precond_ema_lo"], last["b_precond_ema_hi"], last)
    assert text.startswith(f"Adam-aware B^P ≈ {last['b_precond_ema']:.3g} examples [90% interval ")
    assert describe_b_precond(-3.0).startswith("Adam-aware B^P is below noise")
