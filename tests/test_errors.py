"""Bad input gets a clear error (checked by message), and the model is left untouched."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import MeanMismatchError, UnsupportedModelError

from zoo import CASE_IDS, CASES, CentersBatch

ENTRY_POINTS = [persample.per_sample_grads, persample.grad_stats, persample.check_mean]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_batch_size_mismatch_names_both_sizes(fn):
    with pytest.raises(ValueError, match=r"inputs have 4 examples but targets have 3"):
        fn(_mlp(), F.cross_entropy, torch.randn(4, 4), torch.randint(0, 3, (3,)))


def test_inputs_that_disagree_among_themselves():
    model = CASES[CASE_IDS.index("two_inputs")].build()
    with pytest.raises(ValueError, match=r"disagree on the batch size.*\[3, 4\]"):
        persample.per_sample_grads(model, F.mse_loss, (torch.randn(4, 5), torch.randn(3, 3)), torch.randn(4, 2))


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_empty_batch(fn):
    with pytest.raises(ValueError, match="empty batch"):
        fn(_mlp(), F.cross_entropy, torch.randn(0, 4), torch.randint(0, 3, (0,)))


def test_non_tensor_inputs():
    with pytest.raises(TypeError, match="inputs must be"):
        persample.per_sample_grads(_mlp(), F.cross_entropy, [[1.0, 2.0]], None)
    with pytest.raises(TypeError, match="found float"):
        persample.per_sample_grads(_mlp(), F.cross_entropy, {"x": [1.0]}, None)


def test_zero_dim_input():
    with pytest.raises(ValueError, match="batched on dim 0"):
        persample.per_sample_grads(_mlp(), F.cross_entropy, torch.tensor(1.0))


def test_non_scalar_loss_explains_the_per_example_contract():
    loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    with pytest.raises(ValueError, match=r"scalar for ONE example.*shape \(1,\).*reduction='none'"):
        persample.per_sample_grads(_mlp(), loss_fn, torch.randn(4, 4), torch.randint(0, 3, (4,)))


def test_no_trainable_parameters():
    model = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        persample.grad_stats(model, F.cross_entropy, torch.randn(4, 4), torch.randint(0, 3, (4,)))


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        persample.per_sample_grads(lambda x: x, F.cross_entropy, torch.randn(4, 4))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_chunk_size(bad):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        persample.grad_stats(_mlp(), F.cross_entropy, torch.randn(4, 4), torch.randint(0, 3, (4,)), chunk_size=bad)


def test_bad_randomness_and_engine():
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="randomness must be one of"):
        persample.per_sample_grads(_mlp(), F.cross_entropy, x, y, randomness="sometimes")
    with pytest.raises(ValueError, match="engine must be one of"):
        persample.grad_stats(_mlp(), F.cross_entropy, x, y, engine="warp")


def test_train_mode_batchnorm_names_module_and_fixes():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 2, 8))
    with pytest.raises(
        UnsupportedModelError,
        match=r"module 1 \(BatchNorm1d\).*persample.fix\(model\).*GroupNorm.*"
        r"estimator='micro-batch'.*eval\(\)",
    ):
        persample.per_sample_grads(model, F.cross_entropy, torch.randn(3, 2, 8), torch.randint(0, 3, (3,)))


def test_dropout_module_points_to_randomness():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    with pytest.raises(UnsupportedModelError, match=r"module 1 \(Dropout\).*randomness='different'"):
        persample.per_sample_grads(model, F.cross_entropy, x, y)
    grads = persample.per_sample_grads(model, F.cross_entropy, x, y, randomness="different")
    assert grads["0.weight"].shape == (4, 8, 4)


def test_functional_dropout_points_to_randomness():
    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(F.dropout(x, 0.5, training=True))

    model, x, y = FunctionalDropout(), torch.randn(4, 4), torch.randint(0, 3, (4,))
    expected = r"module <root> \(FunctionalDropout\) draws random numbers.*randomness='different'"
    with pytest.raises(persample.UnsupportedModelError, match=expected):
        persample.per_sample_grads(model, F.cross_entropy, x, y)
    for engine in ("auto", "fast", "vmap", "loop"):  # the same contract in every engine
        with pytest.raises(persample.UnsupportedModelError, match=expected):
            persample.grad_stats(model, F.cross_entropy, x, y, engine=engine)


# ------------------------------------------------------------------ model left as found


class _Counting(nn.Module):
    """A model with a buffer, eval-mode BatchNorm and a loss that can be made to fail."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 3)
        self.register_buffer("offset", torch.ones(4))

    def forward(self, x):
        return self.out(self.bn(self.lin(x) + self.offset))


def _snapshot(model):
    return (
        {n: b.clone() for n, b in model.named_buffers()},
        [m.training for m in model.modules()],
        [None if p.grad is None else (p.grad, p.grad.clone()) for p in model.parameters()],
        torch.get_rng_state(),
    )


def _assert_unchanged(model, snap):
    buffers, flags, grads, rng = snap
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert [m.training for m in model.modules()] == flags
    for p, saved in zip(model.parameters(), grads):
        if saved is None:
            assert p.grad is None
        else:
            assert p.grad is saved[0] and torch.equal(p.grad, saved[1])
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("fails", [False, True], ids=["ok", "raises"])
def test_model_left_as_found(fn, fails):
    model = _Counting().eval()
    model.lin.weight.grad = torch.full_like(model.lin.weight, 7.0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def loss_fn(out, target):
        if fails:
            raise KeyError("boom inside loss_fn")
        torch.rand(1)  # consumes RNG only outside vmap's per-example calls
        return F.cross_entropy(out, target)

    snap = _snapshot(model)
    if fails:
        with pytest.raises(KeyError, match="boom"):
            fn(model, loss_fn, x, y)
    else:
        fn(model, F.cross_entropy, x, y)
    _assert_unchanged(model, snap)


def test_check_mean_catches_a_model_that_couples_examples():
    torch.manual_seed(0)
    with pytest.raises(MeanMismatchError, match=r"lin\.weight: max abs err .*rel err") as info:
        persample.check_mean(
            CentersBatch().double(), F.cross_entropy, torch.randn(6, 4).double(), torch.randint(0, 3, (6,))
        )
    assert isinstance(info.value, AssertionError)
    assert not info.value.report.ok and "lin.weight" in info.value.report.mismatches


def test_check_mean_report_and_tolerances():
    model = _mlp()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    report = persample.check_mean(model, F.cross_entropy, x, y)
    assert report.ok and report.rtol == 1e-4 and "OK" in str(report)
    report64 = persample.check_mean(model.double(), F.cross_entropy, x.double(), y)
    assert report64.rtol == 1e-7 and report64.max_rel_err < 1e-12
    with pytest.raises(MeanMismatchError):  # an impossible tolerance must fail on float32 noise
        persample.check_mean(
            _mlp(),
            F.cross_entropy,
            x,
            y,
            rtol=0.0,
            atol=0.0,
            stats=persample.grad_stats(_mlp(), F.cross_entropy, x, y, engine="vmap", chunk_size=3),
        )
