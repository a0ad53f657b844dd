"""The fast engine's closed form for nn.LSTM / nn.GRU / nn.RNN equals the float64 oracle, is used
instead of the torch.func fallback where it applies, and is refused (fallback, still exact) elsewhere."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import NotExact
from persample.engines.fast import engine as engine_module
from persample.engines.fast import recurrent

from zoo import assert_dicts_close, oracle_grads

B, T, IN, H, CLASSES = 4, 5, 3, 4, 3


class Recurrent(nn.Module):
    """Inputs ``[B, T, IN]`` → a recurrent layer → a head on ``out`` (mean over time), on the last
    layer's ``h_n`` (and ``c_n``), or on both. ``init_state``: h0 (and c0) computed from each
    example's first step; time-major layers get the input transposed."""

    def __init__(self, rnn: nn.RNNBase, use: str = "out", init_state: bool = False, call=None):
        super().__init__()
        self.rnn, self.use, self.call = rnn, use, call
        directions = 2 if rnn.bidirectional else 1
        self.states = rnn.num_layers * directions
        width = {
            "out": directions * (rnn.proj_size or rnn.hidden_size),
            "hn": 2 * rnn.hidden_size,
            "both": (directions + 2) * rnn.hidden_size,
        }[use]
        self.head = nn.Linear(width, CLASSES)
        self.init = nn.Linear(IN, 2 * rnn.hidden_size) if init_state else None

    def forward(self, x):
        seq = x if self.rnn.batch_first else x.transpose(0, 1)
        if self.call is not None:
            out, state = self.call(self.rnn, seq)
        elif self.init is not None:
            h0, c0 = torch.tanh(self.init(x[:, 0])).unsqueeze(0).repeat(self.states, 1, 1).chunk(2, dim=2)
            hx = (h0.contiguous(), c0.contiguous()) if isinstance(self.rnn, nn.LSTM) else h0.contiguous()
            out, state = self.rnn(seq, hx)
        else:
            out, state = self.rnn(seq)
        h_n, c_n = state if isinstance(state, tuple) else (state, state)
        features = []
        if self.use in ("out", "both"):
            features.append(out.mean(1 if self.rnn.batch_first else 0))
        if self.use in ("hn", "both"):
            features += [h_n[-1], c_n[-1] if isinstance(self.rnn, nn.LSTM) else h_n[0]]
        return self.head(torch.cat(features, 1))


def _loss(logits, y):
    return F.cross_entropy(logits, y)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, IN, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (B,), generator=g)


@pytest.fixture
def fallback_calls(monkeypatch):
    """How many times the torch.func fallback ran a module's vjp."""
    calls = []
    real_vjp = engine_module.vjp

    def spy(*args, **kwargs):
        calls.append(1)
        return real_vjp(*args, **kwargs)

    monkeypatch.setattr(engine_module, "vjp", spy)
    return calls


@pytest.fixture
def consistency(monkeypatch):
    """The verdicts of the check that takes a call's output as the top layer's hidden states."""
    verdicts = []
    real = recurrent._consistent

    def spy(recomputed, known):
        verdicts.append(real(recomputed, known))
        return verdicts[-1]

    monkeypatch.setattr(recurrent, "_consistent", spy)
    return verdicts


def assert_equals_oracle(model, x, y, **kw):
    grads, losses = oracle_grads(model, _loss, x, y)
    stats = persample.grad_stats(model, _loss, x, y, engine="fast", inner_products=True, **kw)
    mean = {k: g.mean(0) for k, g in grads.items()}
    assert_dicts_close(stats.mean, mean, atol=1e-12)
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-12)
    assert_dicts_close(stats.param_sq_norms, {k: g.reshape(B, -1).pow(2).sum(1) for k, g in grads.items()}, atol=1e-12)
    inner = sum((g.reshape(B, -1) @ mean[k].reshape(-1)) for k, g in grads.items())
    torch.testing.assert_close(stats.inner_products, inner, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.losses, losses, rtol=1e-9, atol=1e-12)
    return stats


def _build(make, seed=0, **kw):
    torch.manual_seed(seed)
    return Recurrent(make(), **kw).double()


CLOSED = {
    "lstm": lambda: nn.LSTM(IN, H, batch_first=True),
    "lstm-2layer": lambda: nn.LSTM(IN, H, num_layers=2, batch_first=True),
    "lstm-bidirectional": lambda: nn.LSTM(IN, H, bidirectional=True, batch_first=True),
    "lstm-2layer-bidirectional-seq-first": lambda: nn.LSTM(IN, H, num_layers=2, bidirectional=True),
    "lstm-seq-first": lambda: nn.LSTM(IN, H),
    "lstm-no-bias": lambda: nn.LSTM(IN, H, num_layers=2, bias=False, batch_first=True),
    "lstm-dropout-eval-mode": lambda: nn.LSTM(IN, H, num_layers=2, dropout=0.5, batch_first=True).eval(),
    "gru": lambda: nn.GRU(IN, H, batch_first=True),
    "gru-2layer-bidirectional": lambda: nn.GRU(IN, H, num_layers=2, bidirectional=True, batch_first=True),
    "gru-seq-first-no-bias": lambda: nn.GRU(IN, H, bias=False),
    "rnn-tanh": lambda: nn.RNN(IN, H, batch_first=True),
    "rnn-relu-2layer-bidirectional": lambda: nn.RNN(
        IN, H, num_layers=2, nonlinearity="relu", bidirectional=True, batch_first=True
    ),
    "rnn-seq-first-no-bias": lambda: nn.RNN(IN, H, bias=False),
}


@pytest.mark.parametrize("use", ["out", "hn", "both"])
@pytest.mark.parametrize("name", list(CLOSED))
def test_closed_form_equals_the_oracle(name, use, fallback_calls, consistency):
    """Top layer from the call's output (checked against the cell equations)."""
    model = _build(CLOSED[name], use=use)
    x, y = _batch()
    assert_equals_oracle(model, x, y)
    assert not fallback_calls, "the recurrent layer took the torch.func fallback"
    assert consistency and all(consistency), "the call's output was not taken as the top layer's states"


@pytest.mark.parametrize("name", list(CLOSED))
def test_closed_form_with_the_recurrence_recomputed(name, fallback_calls, monkeypatch):
    """Every layer recomputed step by step (as when the call's output does not check out)."""
    monkeypatch.setattr(recurrent, "_consistent", lambda recomputed, known: False)
    model = _build(CLOSED[name], use="both")
    x, y = _batch(8)
    assert_equals_oracle(model, x, y)
    assert not fallback_calls


@pytest.mark.parametrize("cell", [nn.GRU, nn.RNN, nn.LSTM])
def test_output_changed_in_place_after_the_call(cell, fallback_calls, consistency):
    """An output modified in place is not the layer's hidden states: the recurrence is recomputed.

    (float64 LSTM returns a view, and a tensor hook on a view modified in place never fires, so its
    gradient is not captured at all; then the sums disagree with autograd's and the engine refuses,
    as it did with the torch.func fallback. Never a silently wrong number.)"""

    def masked(rnn, seq):
        out, state = rnn(seq)
        out[:, 2:].mul_(0.5)
        return out, state

    model = _build(lambda: cell(IN, H, batch_first=True), use="both", call=masked)
    x, y = _batch(9)
    if cell is nn.LSTM:  # the refusal is the expected outcome, asserted (not a pass by an early return)
        with pytest.raises(NotExact):
            assert_equals_oracle(model, x, y)
        return
    assert_equals_oracle(model, x, y)
    assert not fallback_calls
    assert consistency == [False]


@pytest.mark.parametrize(
    "name",
    [
        "lstm-2layer-bidirectional-seq-first",
        "gru-2layer-bidirectional",
        "rnn-relu-2layer-bidirectional",
        "lstm-no-bias",
    ],
)
def test_initial_states_passed_in(name, fallback_calls):
    model = _build(CLOSED[name], use="both", init_state=True)
    x, y = _batch(1)
    assert_equals_oracle(model, x, y)
    assert not fallback_calls


def test_frozen_weights_have_no_statistics(fallback_calls):
    model = _build(CLOSED["lstm-2layer-bidirectional-seq-first"], use="both")
    model.rnn.weight_hh_l0.requires_grad_(False)
    model.rnn.bias_ih_l1_reverse.requires_grad_(False)
    x, y = _batch(2)
    stats = assert_equals_oracle(model, x, y)
    assert "rnn.weight_hh_l0" not in stats.mean and "rnn.bias_ih_l1_reverse" not in stats.mean
    assert "rnn.weight_ih_l0" in stats.mean
    assert not fallback_calls


def test_layer_called_twice(fallback_calls):
    """Two calls of one LSTM: the pieces of each call add up per example."""

    def twice(rnn, seq):
        out, _ = rnn(seq)
        return rnn(torch.tanh(out[..., :IN]))

    model = _build(CLOSED["lstm"], use="both", call=twice)
    x, y = _batch(3)
    assert_equals_oracle(model, x, y)
    assert not fallback_calls


def test_benchmark_shaped_lstm_in_float32(fallback_calls, consistency):
    """Embedding → LSTM → Linear on the last state (the lstm benchmark, smaller), in float32."""

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(50, 8)
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.head = nn.Linear(16, CLASSES)

        def forward(self, tokens):
            out, _ = self.lstm(self.embedding(tokens))
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = Classifier()
    tokens, y = torch.randint(0, 50, (6, 7)), torch.randint(0, CLASSES, (6,))
    grads, _ = oracle_grads(model.double(), _loss, tokens, y)
    stats = persample.grad_stats(model.float(), _loss, tokens, y, engine="fast")
    assert not fallback_calls
    assert consistency == [True]  # oneDNN's forward and the cell equations agree to rounding
    for k, g in grads.items():
        torch.testing.assert_close(stats.mean[k].double(), g.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats.var[k].double(), g.var(0), rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(
            stats.param_sq_norms[k].double(), g.reshape(6, -1).pow(2).sum(1), rtol=1e-4, atol=1e-7
        )


# ----------------------------------------------------------------------------- refused cases


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(IN, H, batch_first=True)
        self.head = nn.Linear(H, CLASSES)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return self.head(h_n[-1])


def _hooked():
    model = _build(CLOSED["lstm"], use="both")
    model.rnn.register_forward_hook(lambda module, args, output: (output[0] * 2, output[1]))
    return model


REFUSED = {
    "proj-size": lambda: _build(lambda: nn.LSTM(IN, H, num_layers=2, proj_size=2, batch_first=True), use="out"),
    "forward-hook": _hooked,
    "subclass": lambda: _build(lambda: type("MyLSTM", (nn.LSTM,), {})(IN, H, batch_first=True), use="both"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_cases_take_the_exact_fallback(name, fallback_calls):
    torch.manual_seed(0)
    model = REFUSED[name]()
    x, y = _batch(4)
    assert_equals_oracle(model, x, y)
    assert fallback_calls, "the closed form was used where it does not apply"


def test_packed_sequence_is_refused_not_guessed():
    """The closed form refuses a PackedSequence and so does the torch.func fallback; ``auto`` moves on."""
    torch.manual_seed(0)
    model = Packed().double()
    x, y = _batch(4)
    with pytest.raises(NotExact):
        persample.grad_stats(model, _loss, x, y, engine="fast")
    grads, _ = oracle_grads(model, _loss, x, y)
    stats = persample.grad_stats(model, _loss, x, y, engine="auto")
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-12)


def test_parametrised_weight_takes_the_fallback(fallback_calls):
    model = _build(CLOSED["gru"], use="both")
    nn.utils.parametrize.register_parametrization(model.rnn, "weight_hh_l0", _Scaled())
    x, y = _batch(5)
    grads, _ = oracle_grads(model, _loss, x, y)
    stats = persample.grad_stats(model, _loss, x, y, engine="fast")  # exact, through the fallback (not a refusal)
    assert fallback_calls
    assert_dicts_close(stats.var, {k: g.var(0) for k, g in grads.items()}, atol=1e-12)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})


class _Scaled(nn.Module):
    def forward(self, w):
        return 0.5 * w


def test_training_mode_dropout_between_layers_is_not_silently_wrong(fallback_calls):
    model = _build(lambda: nn.LSTM(IN, H, num_layers=2, dropout=0.5, batch_first=True), use="out").train()
    x, y = _batch(6)
    with pytest.raises(NotExact):
        persample.grad_stats(model, _loss, x, y, engine="fast", randomness="different")


def test_autocast_is_refused():
    """Under autocast the forward ran in lower precision than a recompute would: no closed form."""
    from persample.engines.fast.units import Call, Unit
    from persample.engines.fast.recurrent import recurrent_pieces

    torch.manual_seed(0)
    rnn = nn.LSTM(IN, H, batch_first=True).double()
    x, _ = _batch(7)
    output = rnn(x)
    unit = Unit("rnn", rnn, None, dict(rnn.named_parameters()))

    def call(enabled):
        return Call(
            (x,),
            {},
            output,
            {0: torch.ones(B, T, H, dtype=torch.float64)},
            autocast=(("cpu", enabled, torch.bfloat16),),
        )

    assert recurrent_pieces(unit, call(True), B, 1.0) is None
    assert set(recurrent_pieces(unit, call(False), B, 1.0)) == set(unit.params)
    assert recurrent_pieces(unit, call(False), B + 1, 1.0) is None  # not batched over the engine's batch


# ------------------------------------------------- the backward through the layer, from the closed form


@pytest.fixture
def cuts_held(monkeypatch):
    """Per fast-engine backward: (cuts planned, cuts that held)."""
    counts = []
    real = engine_module.cut_backward

    def spy(mean_loss, inputs, cuts, closed_form):
        grads, held = real(mean_loss, inputs, cuts, closed_form)
        counts.append((len(cuts), len(held)))
        return grads, held

    monkeypatch.setattr(engine_module, "cut_backward", spy)
    return counts


class Below(nn.Module):
    """A Linear below the recurrent layer (so its input needs a gradient), optionally also read by the
    head directly (``skip``: a path to the loss that bypasses the layer)."""

    def __init__(self, rnn: nn.RNNBase, skip: bool = False, outside_use: bool = False, stacked=None):
        super().__init__()
        self.pre, self.rnn, self.skip, self.outside_use, self.stacked = (
            nn.Linear(IN, IN),
            rnn,
            skip,
            outside_use,
            stacked,
        )
        directions = 2 if rnn.bidirectional else 1
        self.head = nn.Linear(directions * rnn.hidden_size + (IN if skip else 0), CLASSES)

    def forward(self, x):
        seq = torch.tanh(self.pre(x))
        if self.stacked is not None:
            seq = self.stacked(seq)[0][..., :IN]
        out, _ = self.rnn(seq if self.rnn.batch_first else seq.transpose(0, 1))
        features = [out.mean(1 if self.rnn.batch_first else 0)] + ([seq.mean(1)] if self.skip else [])
        logits = self.head(torch.cat(features, 1))
        if self.outside_use:  # a weight of the layer read outside it
            logits = logits * (1 + self.rnn.weight_hh_l0.sum())
        return logits


@pytest.mark.parametrize("name", list(CLOSED))
def test_the_backward_through_the_layer_comes_from_the_closed_form(name, fallback_calls, cuts_held):
    """Autograd is not asked to go through the layer: its input gradient is the closed form's δ_x W_ih,
    pulled back through the Linear below, and its weights' means are the closed form's sums."""
    torch.manual_seed(0)
    model = Below(CLOSED[name]()).double()
    x, y = _batch(10)
    assert_equals_oracle(model, x, y)
    grads, _ = oracle_grads(model, _loss, x, y)
    without_var = persample.grad_stats(model, _loss, x, y, engine="fast", var=False)  # means from one matmul
    assert_dicts_close(without_var.mean, {k: g.mean(0) for k, g in grads.items()}, atol=1e-12)
    assert_dicts_close(
        without_var.param_sq_norms, {k: g.reshape(B, -1).pow(2).sum(1) for k, g in grads.items()}, atol=1e-12
    )
    assert not fallback_calls
    assert cuts_held == [(1, 1), (1, 1)]


def test_no_split_where_another_path_reaches_below_the_layer(cuts_held):
    torch.manual_seed(0)
    model = Below(nn.LSTM(IN, H, batch_first=True), skip=True).double()
    x, y = _batch(11)
    assert_equals_oracle(model, x, y)
    assert cuts_held == [(0, 0)]


def test_a_weight_read_outside_the_layer_is_never_summed_from_the_closed_form_alone(cuts_held):
    """Its mean has a part the closed form does not see: no split, and the sum check refuses."""
    torch.manual_seed(0)
    model = Below(nn.LSTM(IN, H, batch_first=True), outside_use=True).double()
    x, y = _batch(12)
    with pytest.raises(NotExact, match="weight_hh_l0"):
        persample.grad_stats(model, _loss, x, y, engine="fast")
    assert cuts_held == [(0, 0)]
    grads, _ = oracle_grads(model, _loss, x, y)
    stats = persample.grad_stats(model, _loss, x, y, engine="auto")
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()}, atol=1e-12)


def test_stacked_layers_split_at_one_of_them(fallback_calls, cuts_held):
    torch.manual_seed(0)
    model = Below(nn.GRU(IN, H, batch_first=True), stacked=nn.LSTM(IN, H, batch_first=True)).double()
    x, y = _batch(13)
    assert_equals_oracle(model, x, y)
    assert not fallback_calls
    assert cuts_held == [(1, 1)]


def test_a_call_the_closed_form_turns_down_after_the_split_gets_the_whole_backward(monkeypatch, cuts_held):
    """If the closed form refuses a call once its output gradients are in, autograd is asked for
    everything left from the loss, and the layer is an ordinary fallback unit (checked by its sums)."""
    monkeypatch.setattr(engine_module, "recurrent_closed_form", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    model = Below(nn.LSTM(IN, H, num_layers=2, bidirectional=True, batch_first=True)).double()
    x, y = _batch(14)
    assert_equals_oracle(model, x, y)
    assert cuts_held == [(1, 0)]


@pytest.mark.parametrize("changed", ["sequence", "weight"])
def test_what_the_layer_read_changed_in_place_after_the_call_is_refused_not_used(changed):
    """Autograd's backward through the layer would have refused it (a saved tensor whose version
    moved); with the backward split at the layer, autograd never reads those tensors, so the engine
    checks the versions of the captured inputs and of the layer's parameters itself."""

    class ChangesWhatItRead(Below):
        def forward(self, x):
            seq = self.pre(x) + 1.0
            out, _ = self.rnn(seq)
            with torch.no_grad():
                (seq if changed == "sequence" else self.rnn.weight_hh_l0).mul_(0.5)
            return self.head(out.mean(1))

    torch.manual_seed(0)
    model = ChangesWhatItRead(nn.LSTM(IN, H, batch_first=True)).double()
    x, y = _batch(15)
    with pytest.raises(NotExact, match="an input or a parameter of module rnn .*modified in place"):
        persample.grad_stats(model, _loss, x, y, engine="fast")


def test_split_inside_an_activation_checkpoint(fallback_calls, cuts_held):
    """Non-reentrant checkpointing of the Linear and the layer: the second phase's pull-back through the
    Linear recomputes the block (the capture records only the first forward)."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(Below):
        def block(self, x):
            return self.rnn(torch.tanh(self.pre(x)))[0]

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=False).mean(1))

    torch.manual_seed(0)
    model = Checkpointed(nn.LSTM(IN, H, batch_first=True)).double()
    x, y = _batch(17)
    assert_equals_oracle(model, x, y)
    assert not fallback_calls
    assert cuts_held == [(1, 1)]
