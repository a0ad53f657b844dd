"""The preconditioned (Adam-aware) noise scale B^P = tr(PΣ) / GᵀPG: against a float64 oracle from
materialised per-example gradients and Adam's state read independently, and against a hand computation."""

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
    """B^P from a loop of autograd in float64 and Adam's state, read here on its own."""
    grads, _ = oracle_grads(model, F.cross_entropy, x, y)
    trace = signal = 0.0
    for name, p in model.named_parameters():
        if names is not None and name not in names:
            continue
        st = opt.state[p]
        v = (st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"]) / (1 - 0.99 ** float(st["step"]))
        P = 1 / (v.sqrt() + 1e-6)
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
