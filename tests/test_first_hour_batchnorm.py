"""BatchNorm models that work: persample.fix, the micro-batch noise estimator, and an error whose fixes work."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import assert_dicts_close, oracle_grads

import persample
from persample.noise import NoiseScaleEMA, gradient_noise_scale, two_batch_noise_scale


class Block(nn.Module):
    """ResNet's BasicBlock: conv-BN-ReLU-conv-BN plus a (strided 1x1 conv + BN) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet18(nn.Module):
    """ResNet-18's layout (stem, 4 stages of 2 BasicBlocks, pool, fc) at tiny widths."""

    def __init__(self, widths=(4, 6, 8, 8), classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet(seed=0):
    torch.manual_seed(seed)
    model = TinyResNet18().double().train()
    with torch.no_grad():  # non-trivial affine parameters, so that copying them matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def batch(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


# ---------------------------------------------------------------------------- fix


def test_fix_replaces_every_batchnorm_and_gives_exact_per_example_stats_in_train_mode():
    model = resnet()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    fixes = persample.fix(model)
    assert [f.name for f in fixes] == list(bns)
    assert str(fixes[0]) == "bn1: BatchNorm2d(4) -> GroupNorm(4, 4)"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for name, bn in bns.items():
        gn = model.get_submodule(name)
        assert isinstance(gn, nn.GroupNorm) and gn.num_groups == persample.repair.group_count(bn.num_features)
        assert gn.training and gn.weight.dtype == torch.float64
        assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias) and gn.eps == bn.eps
    x, y = batch()
    expected, losses = oracle_grads(model, F.cross_entropy, x, y)
    stats = persample.grad_stats(model, F.cross_entropy, x, y)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in expected.items()})
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in expected.items()})
    assert_dicts_close(stats.param_sq_norms, {k: g.flatten(1).pow(2).sum(1) for k, g in expected.items()})
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)
    # ... and the Tracker trains it in train mode with default arguments
    tracker = persample.Tracker(model, F.cross_entropy)
    assert tracker.step(x, y) is not None
    assert persample.fix(model) == []


def test_fix_group_choice_dry_run_shared_modules_and_refusals():
    assert [persample.repair.group_count(c) for c in (1, 6, 32, 48, 64, 96, 37)] == [1, 6, 32, 24, 32, 32, 1]
    shared = nn.BatchNorm2d(48)
    model = nn.Sequential(
        nn.Conv2d(3, 48, 1),
        shared,
        nn.Conv2d(48, 48, 1),
        shared,
        nn.Flatten(),
        nn.LazyLinear(2),
        nn.BatchNorm1d(2, affine=False),
    )
    model(torch.randn(2, 3, 2, 2))  # initialise the lazy layer
    listed = persample.fix(model, dry_run=True)
    assert [str(f) for f in listed] == [
        "1: BatchNorm2d(48) -> GroupNorm(24, 48)",
        "6: BatchNorm1d(2) -> GroupNorm(1, 2)",
    ]
    assert isinstance(model[1], nn.BatchNorm2d)  # dry run: nothing changed
    assert persample.fix(model) == listed
    assert model[1] is model[3] and isinstance(model[1], nn.GroupNorm)  # one module, one replacement
    assert model[6].weight is None
    other = nn.Sequential(nn.Conv3d(2, 40, 1), nn.BatchNorm3d(40), nn.Conv3d(40, 64, 1), nn.SyncBatchNorm(64))
    assert [str(f) for f in persample.fix(other)] == [
        "1: BatchNorm3d(40) -> GroupNorm(20, 40)",
        "3: SyncBatchNorm(64) -> GroupNorm(32, 64)",
    ]
    persample.grad_stats(other.train(), lambda out: out.pow(2).mean(), torch.randn(3, 2, 2, 2, 2))
    with pytest.raises(TypeError, match="itself a BatchNorm2d: use nn.GroupNorm"):
        persample.fix(nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="not initialised yet"):
        persample.fix(nn.Sequential(nn.LazyBatchNorm1d()))


# ------------------------------------------------------------------- micro-batch noise


def _plain_accumulated(model, micro_batches, scale):
    model.zero_grad(set_to_none=True)
    for x, y in micro_batches:
        (F.cross_entropy(model(x), y) * scale).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_micro_batch_noise_of_a_train_mode_batchnorm_resnet_matches_its_formula():
    model = resnet()
    x, y = batch(12)
    micro_batches = [(x[i : i + 3], y[i : i + 3]) for i in range(0, 12, 3)]
    reference = copy.deepcopy(model)
    # the formula, from each micro-batch's gradient materialised by autograd (float64)
    grads = []
    for xm, ym in micro_batches:
        g = torch.autograd.grad(F.cross_entropy(reference(xm), ym), list(reference.parameters()))
        grads.append(torch.cat([t.reshape(-1) for t in g]))
    small = sum(float(g.pow(2).sum()) for g in grads) / 4
    big = float(torch.stack(grads).mean(0).pow(2).sum())
    grad_sq = (12 * big - 3 * small) / (12 - 3)
    trace_cov = (small - big) / (1 / 3 - 1 / 12)
    expected_grad = _plain_accumulated(copy.deepcopy(model), micro_batches, 1 / 4)

    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(persample.UnsupportedModelError):
        tracker.step(x, y)  # per-example gradients are undefined
    model.zero_grad(set_to_none=True)
    with tracker.accumulate(estimator="micro-batch") as acc:
        for xm, ym in micro_batches:
            assert tracker.step(xm, ym, scale=1 / 4) is None
    noise = acc.noise
    assert noise.estimator == "micro-batch" and noise.n == 12 and noise.b_small == 3
    assert math.isclose(noise.grad_sq, grad_sq, rel_tol=1e-9)
    assert math.isclose(noise.trace_cov, trace_cov, rel_tol=1e-9)
    assert math.isclose(noise.b_simple, trace_cov / grad_sq, rel_tol=1e-9)
    assert tracker.last_noise is noise and tracker.steps == 1
    assert_dicts_close({n: p.grad for n, p in model.named_parameters()}, expected_grad)
    # the running statistics moved as four training forwards move them
    for (n, b), (_, b_ref) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=0, msg=n)
    ema = NoiseScaleEMA()
    assert math.isclose(ema.update(noise), noise.b_simple)


def test_micro_batch_noise_with_unequal_micro_batches_and_a_sum_loss():
    """b = the harmonic mean of the sizes, G_m = ∇ℓ_m / Σw_i (a sum loss: divided by b_m)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).double().train()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 2, (9,))
    sizes = [(0, 4), (4, 9)]
    ref = copy.deepcopy(model)
    grads = [
        torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(loss_fn(ref(x[a:b]), y[a:b]) / (b - a), list(ref.parameters()))]
        )
        for a, b in sizes
    ]
    big = float(((4 * grads[0] + 5 * grads[1]) / 9).pow(2).sum())
    small = (float(grads[0].pow(2).sum()) + float(grads[1].pow(2).sum())) / 2
    b_small = 2 / (1 / 4 + 1 / 5)
    expected = two_batch_noise_scale(b_small, small, 9, big)
    tracker = persample.Tracker(model, loss_fn)
    with tracker.accumulate(estimator="micro-batch") as acc:
        for a, b in sizes:
            tracker.step(x[a:b], y[a:b])
    assert math.isclose(acc.noise.grad_sq, expected.grad_sq, rel_tol=1e-9)
    assert math.isclose(acc.noise.trace_cov, expected.trace_cov, rel_tol=1e-9)


def test_micro_batch_estimator_agrees_with_the_per_example_one_and_the_truth():
    """Linear regression with Gaussian inputs, where |G|² and tr Σ are known in closed form.

    g = (xᵀδ − ε) x with δ = w − w*, x ~ N(0, I_d), ε ~ N(0, s²): G = δ, and
    tr Σ = E‖g‖² − ‖δ‖² = (d + 2)‖δ‖² + d s² − ‖δ‖². Both estimators are unbiased, so their
    means over many batches agree with the truth (and each other) within a few standard errors.
    """
    d, s, steps, k, b = 3, 0.5, 200, 4, 4
    torch.manual_seed(0)
    model = nn.Linear(d, 1, bias=False).double()
    w_star = torch.zeros(1, d, dtype=torch.float64)
    delta = model.weight.detach() - w_star
    true_grad_sq = float(delta.pow(2).sum())
    true_trace = (d + 1) * true_grad_sq + d * s * s

    def loss_fn(out, y):
        return 0.5 * (out.squeeze(-1) - y).pow(2).mean()

    tracker = persample.Tracker(model, loss_fn)
    micro, per_example = [], []
    for _ in range(steps):
        x = torch.randn(k * b, d, dtype=torch.float64)
        y = x @ w_star[0] + s * torch.randn(k * b, dtype=torch.float64)
        with tracker.accumulate(estimator="micro-batch") as acc:
            for m in range(k):
                tracker.step(x[m * b : (m + 1) * b], y[m * b : (m + 1) * b], scale=1 / k)
        micro.append((acc.noise.grad_sq, acc.noise.trace_cov))
        per_example.append(gradient_noise_scale(persample.grad_stats(model, loss_fn, x, y)))
        model.zero_grad(set_to_none=True)  # no optimiser step: δ stays, so the truth stays
    micro_t = torch.tensor(micro, dtype=torch.float64)
    per_t = torch.tensor([(e.grad_sq, e.trace_cov) for e in per_example], dtype=torch.float64)
    truth = torch.tensor([true_grad_sq, true_trace], dtype=torch.float64)
    for est in (micro_t, per_t):
        sem = est.std(0) / math.sqrt(steps)
        assert bool(((est.mean(0) - truth).abs() < 4 * sem).all()), (est.mean(0), truth, sem)
    diff = micro_t - per_t  # paired: same batches
    assert bool(((diff.mean(0)).abs() < 4 * diff.std(0) / math.sqrt(steps)).all())


def test_micro_batch_estimator_refusals_and_warnings():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(ValueError, match="'per-example' or 'micro-batch'"):
        with tracker.accumulate(estimator="micro"):
            pass
    with pytest.raises(ValueError, match="cannot be combined with accumulate\\(reference"):
        with tracker.accumulate("last", estimator="micro-batch"):
            pass
    with pytest.raises(ValueError, match="clip_norm"):
        with persample.Tracker(model, F.cross_entropy, clip_norm=1.0).accumulate(estimator="micro-batch"):
            pass
    with pytest.raises(ValueError, match="check_every"):
        with persample.Tracker(model, F.cross_entropy, check_every=1).accumulate(estimator="micro-batch"):
            pass
    with pytest.warns(RuntimeWarning, match="needs at least 2 micro-batches"):
        with tracker.accumulate(estimator="micro-batch") as acc:
            tracker.step(x, y)
    assert acc.noise is None and tracker.last_noise is None

    class OwnLoss(nn.Module):  # the loss computed inside the model, as Hugging Face models do with labels=
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, labels):
            return {"loss": F.cross_entropy(self.net(x), labels)}

    opaque = persample.Tracker(OwnLoss(), lambda out: out["loss"])
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="computed inside the model"):
        with opaque.accumulate(estimator="micro-batch"):
            opaque.step({"x": x[:4], "labels": y[:4]})
    assert all(p.grad is None for p in model.parameters())  # the step was undone
    with pytest.warns(RuntimeWarning, match="not finite"):
        with tracker.accumulate(estimator="micro-batch") as acc:
            tracker.step(x[:4], y[:4])
            tracker.step(torch.full((4, 3), math.nan), y[4:])
    assert acc.noise is None and tracker.skipped == [tracker.steps - 1]
    # every step of a micro-batch block is a statistics step only when the tracker says so
    sparse = persample.Tracker(model, F.cross_entropy, every=2)
    for _ in range(2):
        with sparse.accumulate(estimator="micro-batch") as acc:
            sparse.step(x[:4], y[:4])
            sparse.step(x[4:], y[4:])
    assert acc.noise is None and sparse.last_noise is not None and sparse.steps == 2


# ------------------------------------------------------------------- the error's fixes


def test_batchnorm_error_names_only_fixes_that_work():
    model = resnet()
    x, y = batch()
    with pytest.raises(persample.UnsupportedModelError) as info:
        persample.grad_stats(model, F.cross_entropy, x, y)
    message = str(info.value)
    assert "replace_all_batch_norm_modules_" not in message
    assert "persample.fix(model)" in message and "estimator='micro-batch'" in message
    assert "model.eval()" in message
    # fix 1: persample.fix(model), in train mode
    fixed = copy.deepcopy(model)
    persample.fix(fixed)
    persample.grad_stats(fixed.train(), F.cross_entropy, x, y)
    # fix 2: the micro-batch estimator, BatchNorm kept, in train mode
    tracker = persample.Tracker(model, F.cross_entropy)
    with tracker.accumulate(estimator="micro-batch") as acc:
        for i in range(0, 6, 3):
            tracker.step(x[i : i + 3], y[i : i + 3], scale=1 / 2)
    assert math.isfinite(acc.noise.b_simple)
    # fix 3: eval mode (running statistics: a different function, for evaluation or fine-tuning)
    persample.grad_stats(copy.deepcopy(model).eval(), F.cross_entropy, x, y)
