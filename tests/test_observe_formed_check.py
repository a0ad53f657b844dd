"""observe's check of Σ_i g_i against p.grad, where the statistics form the g_i anyway.

For convolutions, and Linear maps on T positions with T·(p + d) > p·d, the statistics form every g_i in
chunks (for M2, or for the norms), and the old check's second product of the whole batch (a
convolution's weight gradient, a projected sum over the activations) cost more than reading them once
more. observe takes the check's difference D = (1/B) Σ_i g_i − ḡ from that same pass
(``observe._formed_sums``). These tests hold it to the old check: the same D (to rounding), the same
refusals, the oracle's statistics, and no second weight-gradient convolution.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import persample
from persample.engines.fast import engine as engine_mod
from persample.engines.fast import observe as observe_mod
from persample.engines.fast.pieces import ConvPiece

from oracle_stats import oracle_stats
from zoo import TiedLM, assert_dicts_close

B = 5


class _Conv(nn.Module):
    """Two convolutions (the second's weight, 18 432 numbers, is checked through the probe) and a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 64, 3)
        self.head = nn.Linear(64 * 2 * 2, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).flatten(1))


class _Sequence(nn.Module):
    """Linear maps on 70 positions, where T·(p + d) > p·d: the check sums their formed g_i. The last
    one's weight (16 900 numbers) is checked through the probe."""

    def __init__(self):
        super().__init__()
        self.small = nn.Linear(3, 3)
        self.large = nn.Linear(3, 130)
        self.wide = nn.Linear(130, 130)
        self.head = nn.Linear(130, 3)

    def forward(self, x):
        h = self.wide(torch.tanh(self.large(torch.tanh(self.small(x)))))
        return self.head(torch.tanh(h).mean(1))


class _Ghost(nn.Module):
    """A Linear map on 8 positions where the ghost norm is cheaper (T·(p + d) ≤ p·d) and whose weight
    (4 096 numbers) is compared whole: with the variance its g_i are formed for M2, and the check sums
    them instead of forming Σ_i g_i again over all B·T positions."""

    def __init__(self):
        super().__init__()
        self.small = nn.Linear(3, 64)
        self.wide = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.wide(torch.tanh(self.small(x)))).mean(1))


def _model(kind):
    torch.manual_seed(0)
    if kind == "ghost":
        return _Ghost().double(), torch.randn(B, 8, 3, dtype=torch.float64), torch.randint(0, 3, (B,))
    if kind == "conv":
        return _Conv().double(), torch.randn(B, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
    if kind == "sequence":
        return _Sequence().double(), torch.randn(B, 70, 3, dtype=torch.float64), torch.randint(0, 3, (B,))
    return TiedLM().double(), torch.randint(0, 20, (B, 5)), torch.randint(0, 20, (B, 5))


def _loss(kind):
    if kind == "tied":
        return lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())
    return F.cross_entropy


# (model, parameter given an extra term, var): each parameter's piece is formed by the statistics
# and its check sums them (biases are per-example rows, summed directly as before)
FORMED = [
    ("conv", "a.weight", True),  # compared whole
    ("conv", "b.weight", True),  # through the probe
    ("conv", "b.weight", False),  # the norms form the g_i
    ("sequence", "small.weight", True),
    ("sequence", "small.weight", False),
    ("sequence", "wide.weight", True),  # through the probe
    ("ghost", "wide.weight", True),  # formed for M2 alone, compared whole
]


@pytest.fixture
def formed(monkeypatch):
    """The names whose difference came from the formation pass, per observed step."""
    seen: list[set] = []
    original = observe_mod._formed_sums

    def spy(pieces, means, var):
        differences, second = original(pieces, means, var)
        seen.append(set(differences))
        return differences, second

    monkeypatch.setattr(observe_mod, "_formed_sums", spy)
    return seen


@pytest.mark.parametrize("kind, name, var", FORMED)
def test_a_term_on_a_formed_parameter_is_still_refused(kind, name, var, formed):
    """A term of the backwarded loss on a parameter whose D comes from the formation pass (1e-4 of the
    model's largest gradient, per element) is refused as the projected check refused it."""
    model, x, y = _model(kind)
    loss_fn = _loss(kind)
    loss_fn(model(x), y).backward()
    largest = max(float(p.grad.abs().max()) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    param = dict(model.named_parameters())[name]
    tracker = persample.Tracker(model, loss_fn, var=var)
    with pytest.raises(persample.ObservationError) as info:
        with tracker.observe(y):
            (loss_fn(model(x), y) + 1e-4 * largest * param.sum()).backward()
    assert info.value.code == "OBSERVE_SUM_MISMATCH"
    assert repr(name) in str(info.value)
    assert name in formed[-1]


@pytest.mark.parametrize("kind", ["conv", "sequence", "tied", "ghost"])
@pytest.mark.parametrize("var", [True, False])
def test_formed_pass_gives_the_oracle_and_the_same_difference(kind, var, formed, monkeypatch):
    """The statistics are the float64 oracle's, and each D from the formation pass equals (to rounding)
    the difference the old check computed from the piece's sum ((1/B)·projected_sum(V) − M·V, or
    (1/B)·Σ_i g_i − M whole): the compared quantity is the same."""
    compared = []
    original = engine_mod.differing_flags

    def comparing(pieces, means, *, differences=None, **kw):
        for name, difference in (differences or {}).items():
            constants: dict = {}
            fused, expected, gain = engine_mod._projected_difference(difference, means[name], constants)
            got, expected_old, gain_old = engine_mod._sum_and_expected(pieces[name], means[name], {})
            torch.testing.assert_close(expected, expected_old, rtol=0, atol=0)
            assert gain == gain_old
            scale = float(expected.abs().max()) + 1e-300
            assert float((fused - (got - expected_old)).abs().max()) <= 1e-12 * scale
            compared.append(name)
        return original(pieces, means, differences=differences, **kw)

    monkeypatch.setattr(observe_mod, "differing_flags", comparing)
    model, x, y = _model(kind)
    loss_fn = _loss(kind)
    want = oracle_stats(model, loss_fn, x, y)
    tracker = persample.Tracker(model, loss_fn, var=var)
    with tracker.observe(y) as observed:
        loss_fn(model(x), y).backward()
    stats = observed.stats
    assert_dicts_close(stats.mean, want["mean"])
    assert_dicts_close(stats.param_sq_norms, want["param_sq_norms"])
    if var:
        assert_dicts_close(stats.var, want["var"], atol=1e-11)
    else:
        assert stats.m2 is None
    assert compared and set(compared) == formed[-1]


@pytest.mark.parametrize("var, formed_there", [(True, True), (False, False)])
def test_a_small_ghost_cheaper_weight_is_summed_from_its_formation_only_with_the_variance(var, formed_there, formed):
    """With the variance, M2 forms the g_i of a Linear map on T > 1 positions even where its ghost norm is
    cheaper, and a weight small enough to be compared whole is checked from those g_i (its closed form
    would be Σ_i g_i over all B·T positions again); without it the g_i are never formed and the closed
    form stays."""
    model, x, y = _model("ghost")
    tracker = persample.Tracker(model, F.cross_entropy, var=var)
    with tracker.observe(y):
        F.cross_entropy(model(x), y).backward()
    assert ("wide.weight" in formed[-1]) is formed_there
    assert "head.weight" not in formed[-1]  # one position: never formed


def _sequence_first(t):
    """``t`` ([B, T, n]) laid out positions first, as attention's gradients are: a non-contiguous view."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("act_first, grad_first", [(False, False), (True, False), (False, True), (True, True)])
def test_projected_sum_reads_sequence_first_factors_in_place(transposed, act_first, grad_first):
    """``OuterPiece.projected_sum`` sums the (example, position) rows in the order each factor is laid out
    in (no copy of a sequence-first gradient): the same as Σ_i g_i times the probe, for every layout."""
    from persample.engines.fast.pieces import OuterPiece, as_matrix

    torch.manual_seed(0)
    act = torch.randn(4, 6, 5, dtype=torch.float64)
    grad = torch.randn(4, 6, 7, dtype=torch.float64)
    act, grad = (_sequence_first(act) if act_first else act), (_sequence_first(grad) if grad_first else grad)
    shape = torch.Size((5, 7) if transposed else (7, 5))
    piece = OuterPiece(act, grad, shape, transposed=transposed, scale=3.0)
    probe = torch.randn(shape[1], 2, dtype=torch.float64)
    want = as_matrix(piece.weighted_sum(torch.ones(4, dtype=torch.float64))) @ probe
    torch.testing.assert_close(piece.projected_sum(probe), want, rtol=1e-12, atol=1e-12)


class _CountConvolutionBackward(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "convolution_backward":
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("var", [True, False])
def test_no_second_weight_gradient_convolution(var):
    """observe's convolutions of the backward are the user's backward's and the formation of the g_i
    (one grouped convolution per chunk of examples), nothing more: the check of Σ_i g_i no longer
    runs each layer's weight-gradient convolution again (it did: two more here)."""
    model, x, y = _model("conv")
    with _CountConvolutionBackward() as plain:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    tracker = persample.Tracker(model, F.cross_entropy, var=var)
    with tracker.observe(y) as observed:  # a first step: the spot check's forwards and backwards
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    with _CountConvolutionBackward() as counted:
        with tracker.observe(y) as observed:
            F.cross_entropy(model(x), y).backward()
    assert observed.stats is not None
    chunks = -(-B // ConvPiece.max_chunk_examples)
    assert counted.count == plain.count + 2 * chunks  # two convolutions, their g_i formed once


def test_probes_are_drawn_once_per_shape_and_are_plain_tensors():
    """The check's Gaussian probes are kept across calls (drawn from a seed fixed by their shape), and a
    probe first drawn under ``torch.inference_mode`` is a plain tensor that later calls can use anywhere."""
    engine_mod._PROBES.clear()
    matrix = torch.zeros(20, 30)
    with torch.inference_mode():
        first = engine_mod._probe(matrix, {})
    assert not first.is_inference()
    assert engine_mod._probe(matrix, {}) is first
    engine_mod._PROBES.clear()
    again = engine_mod._probe(matrix, {})
    assert again is not first and torch.equal(again, first)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_rows_projected_sum_is_the_projected_sum_of_the_rows(padding_idx):
    """``RowsPiece.projected_sum`` projects each (example, row) segment and scatters k columns: the same as
    Σ_i g_i of the embedding rows times the probe (repeated tokens, a padding row, empty slots)."""
    from persample.engines.fast.pieces import RowsPiece, as_matrix

    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 1, 4], [0, 0, 3, 2], [4, 4, 4, 4]])
    grad = torch.randn(3, 4, 6, dtype=torch.float64)
    piece = RowsPiece(ids, grad, torch.Size((5, 6)), padding_idx=padding_idx, scale=0.5)
    for columns in (1, 4):
        probe = torch.randn(6, columns, dtype=torch.float64)
        want = as_matrix(piece.weighted_sum(torch.ones(3, dtype=torch.float64))) @ probe
        torch.testing.assert_close(piece.projected_sum(probe), want, rtol=1e-12, atol=1e-12)
