"""The fast engine's closed form for ``nn.MultiheadAttention`` against the float64 oracle loop.

in_proj and out_proj are Linear maps around scaled dot-product attention, which never mixes
examples: their per-example gradients come from ∂q, ∂k, ∂v at the in-projections' outputs, delivered by
the model's own backward (the capture records the module's projections as it runs: one attention per
call), or, where torch's attention code is not the checked one, from a recomputed attention checked
against the module's output. Self- and cross-attention, batch_first both
ways, boolean and float masks (``key_padding_mask``, 2-D and 3-D ``attn_mask``), attention weights
that reach the loss; settings the rule does not cover take the exact fallback.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample import NotExact, _torch_compat
from persample.engines.fast import mha_capture, rules
from persample.engines.fast.rules import find_rule
from torch.utils._python_dispatch import TorchDispatchMode

from zoo import assert_dicts_close, oracle_grads

E, H, T, S, B = 8, 2, 5, 3, 4


class Attention(nn.Module):
    """Linear → MultiheadAttention (self, or cross over a second input) → Linear on the mean position."""

    def __init__(self, kind="self", batch_first=True, need_weights=False, weights_in_loss=False, mask=None, **mha):
        super().__init__()
        self.kind, self.batch_first, self.mask = kind, batch_first, mask
        self.need_weights, self.weights_in_loss = need_weights, weights_in_loss
        self.embed = nn.Linear(4, E)
        self.memory = nn.Linear(4, E)
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **mha)
        self.head = nn.Linear(E, 2)

    def forward(self, x, memory=None, padding=None, per_head=None):
        q = self.embed(x)
        if self.kind == "self":
            k = v = q
        elif self.kind == "cross":
            k = v = self.memory(memory)
        else:  # key and value from different tensors
            k, v = self.memory(memory), torch.tanh(self.memory(memory))
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            if self.kind == "self":
                k = v = q
            elif self.kind == "cross":
                v = k
        mask = self.mask
        if per_head is not None:  # [B, H, T, S] → the [B·H, T, S] attn_mask
            mask = per_head.reshape(-1, *per_head.shape[2:])
        out, weights = self.mha(
            q, k, v, key_padding_mask=padding, attn_mask=mask, need_weights=self.need_weights, average_attn_weights=True
        )
        if not self.batch_first:
            out = out.transpose(0, 1)
        y = self.head(out.mean(1))
        if self.weights_in_loss:
            y = y + weights.square().sum((1, 2)).unsqueeze(1)
        return y


def _inputs(kind, padding=None, per_head=None, float_masks=False):
    g = torch.Generator().manual_seed(1)
    source = T if kind == "self" else S
    inputs = {"x": torch.randn(B, T, 4, generator=g, dtype=torch.float64)}
    if kind != "self":
        inputs["memory"] = torch.randn(B, S, 4, generator=g, dtype=torch.float64)
    if padding:
        keep = torch.ones(B, source, dtype=torch.bool)
        keep[1, -1] = keep[3, -2:] = False  # example 1 ignores its last key, example 3 its last two
        inputs["padding"] = (
            ~keep if not float_masks else torch.zeros(B, source, dtype=torch.float64).masked_fill(~keep, -1e9)
        )
    if per_head:
        m = torch.rand(B, H, T, source, generator=g) < 0.3
        m[..., 0] = False  # every query attends to at least one key
        inputs["per_head"] = m if not float_masks else torch.randn(B, H, T, source, generator=g, dtype=torch.float64)
    return inputs, torch.randn(B, 2, generator=g, dtype=torch.float64)


def _check(model, inputs, targets, *, rule=True):
    torch.manual_seed(0)
    model = model.double()
    assert (find_rule(model.mha) is not None) == rule
    want, _ = oracle_grads(model, F.mse_loss, inputs, targets)
    got = persample.per_sample_grads(model, F.mse_loss, inputs, targets, engine="fast")
    assert_dicts_close(got, want)
    stats = persample.grad_stats(model, F.mse_loss, inputs, targets, engine="fast")
    for name, rows in want.items():
        torch.testing.assert_close(stats.mean[name], rows.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.var[name], rows.var(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats.param_sq_norms[name], rows.flatten(1).square().sum(1), rtol=1e-9, atol=1e-12)


def _causal(source):
    return torch.triu(torch.ones(T, source, dtype=torch.bool), diagonal=1)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", ["self", "cross", "kv_apart"])
def test_rule_is_exact(kind, batch_first):
    torch.manual_seed(0)
    inputs, targets = _inputs(kind)
    _check(Attention(kind, batch_first), inputs, targets)


@pytest.mark.parametrize("float_masks", [False, True], ids=["bool", "float"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("masks", ["padding", "causal", "padding+causal", "per_head"])
def test_rule_is_exact_with_masks(masks, batch_first, float_masks):
    torch.manual_seed(0)
    inputs, targets = _inputs("self", padding="padding" in masks, per_head=masks == "per_head", float_masks=float_masks)
    mask = _causal(T) if "causal" in masks else None
    if mask is not None and float_masks:
        mask = torch.zeros(T, T, dtype=torch.float64).masked_fill(mask, float("-inf"))
    _check(Attention("self", batch_first, mask=mask), inputs, targets)


def test_rule_is_exact_for_cross_attention_with_padded_memory():
    torch.manual_seed(0)
    inputs, targets = _inputs("cross", padding=True)
    mask = torch.rand(T, S) < 0.3
    mask[:, 0] = False  # every query keeps its first key (example 3 pads the last two)
    _check(Attention("cross", mask=mask), inputs, targets)


@pytest.mark.parametrize("average", [True, False])
def test_attention_weights_that_reach_the_loss(average):
    torch.manual_seed(0)
    inputs, targets = _inputs("self", padding=True)
    model = Attention("self", need_weights=True, weights_in_loss=True)
    if not average:
        model.forward = _per_head_weights(model)
    _check(model, inputs, targets)


def _per_head_weights(model):
    def forward(x, padding=None):
        q = model.embed(x)
        out, weights = model.mha(q, q, q, key_padding_mask=padding, average_attn_weights=False)
        return model.head(out.mean(1)) + weights[:, 1].square().sum((1, 2)).unsqueeze(1)

    return forward


def test_without_biases_and_with_frozen_in_projection():
    torch.manual_seed(0)
    inputs, targets = _inputs("self", padding=True)
    model = Attention("self", bias=False)
    _check(model, inputs, targets)
    model.mha.in_proj_weight.requires_grad_(False)
    _check(model, inputs, targets)


@pytest.mark.parametrize("options", [{"add_bias_kv": True}, {"add_zero_attn": True}], ids=["bias_kv", "zero_attn"])
def test_settings_outside_the_rule_take_the_exact_fallback(options):
    torch.manual_seed(0)
    inputs, targets = _inputs("self")
    _check(Attention("self", **options), inputs, targets, rule=False)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize(
    "options", [{"kdim": 6, "vdim": 5}, {"kdim": 6, "vdim": 6}, {"kdim": 6, "vdim": 5, "bias": False}]
)
def test_kdim_and_vdim_separate_projection_weights(options, batch_first):
    """kdim or vdim ≠ embed_dim: q_proj_weight, k_proj_weight, v_proj_weight, each on its own input."""
    torch.manual_seed(0)
    inputs, targets = _inputs("cross", padding=True)
    model = Attention("cross", **options)
    model.memory = nn.Linear(4, 6)
    model.forward = _kdim_forward(model, options["vdim"], batch_first)
    model.mha.batch_first = batch_first
    _check(model, inputs, targets)


def _kdim_forward(model, vdim, batch_first):
    value = nn.Linear(4, vdim).double()
    model.value = value

    def forward(x, memory, padding):
        q, k = model.embed(x), model.memory(memory)
        v = k if vdim == 6 else model.value(memory)  # kdim = vdim: key is value
        if not batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), (k.transpose(0, 1) if vdim == 6 else v.transpose(0, 1))
        out, _ = model.mha(q, k, v, key_padding_mask=padding, need_weights=False)
        return model.head((out if batch_first else out.transpose(0, 1)).mean(1))

    return forward


def test_transformer_encoder_layer_uses_the_rule():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True).double()
    model = nn.Sequential(nn.Linear(4, E), layer).double()
    assert find_rule(layer.self_attn).name == "multihead_attention"
    x = torch.randn(B, T, 4, dtype=torch.float64)
    y = torch.randn(B, T, E, dtype=torch.float64)
    want, _ = oracle_grads(model, F.mse_loss, x, y)
    assert_dicts_close(persample.per_sample_grads(model, F.mse_loss, x, y, engine="fast"), want)


def test_ambiguous_sequence_first_batch_is_refused():
    """batch_first=False with T == B: dim 0 of the [T, B, E] input could be the batch."""
    torch.manual_seed(0)
    model = Attention("self", batch_first=False).double()
    x, y = torch.randn(T, T, 4, dtype=torch.float64), torch.randn(T, 2, dtype=torch.float64)
    with pytest.raises(NotExact) as err:
        persample.per_sample_grads(model, F.mse_loss, x, y, engine="fast")
    assert err.value.code == "BATCH_DIM_AMBIGUOUS"


@pytest.mark.parametrize("need_weights", [False, True])
def test_a_query_with_every_key_masked(need_weights):
    """scaled_dot_product_attention gives such a query 0 (need_weights=False), the explicit path NaN:
    the rule recomputes either (NaN rows then make the oracle's rows NaN too)."""
    torch.manual_seed(0)
    inputs, targets = _inputs("cross", padding=True)
    inputs["padding"][3] = True  # example 3 attends to nothing
    model = Attention("cross", need_weights=need_weights).double()
    want, _ = oracle_grads(model, F.mse_loss, inputs, targets)
    got = persample.per_sample_grads(model, F.mse_loss, inputs, targets, engine="fast")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, equal_nan=True)


# ------------------------------------------------- the recorded projections: no second attention (issue 22)


class _AttentionOps(TorchDispatchMode):
    """Counts the forward attention kernels that run (SDPA's, or the explicit path's softmax)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "backward" not in name and (name.startswith("_scaled_dot_product") or name == "_softmax"):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "kind, batch_first, need_weights",
    [("self", True, False), ("cross", False, False), ("kv_apart", True, True), ("self", False, True)],
)
def test_the_fast_engine_runs_the_attention_once(kind, batch_first, need_weights):
    """The in-projections' output gradients come from the model's own backward: one attention per call
    (the model's), as in a plain step; before, the rule ran a second one to reach ∂q, ∂k, ∂v."""
    torch.manual_seed(0)
    inputs, targets = _inputs(kind, padding=True)
    model = Attention(kind, batch_first, need_weights=need_weights).double()
    with _AttentionOps() as plain:
        F.mse_loss(model(**inputs), targets).backward()
    persample.grad_stats(model, F.mse_loss, inputs, targets, engine="fast")  # the plan's first-call checks
    with _AttentionOps() as fast:
        persample.grad_stats(model, F.mse_loss, inputs, targets, engine="fast")
    assert plain.count == fast.count == 1


def test_observe_leaves_the_forward_and_p_grad_bit_for_bit():
    """The capture runs the module's attention as torch's own code (its linear calls recorded): the
    output and the user's p.grad are the plain step's, bit for bit, and the statistics the oracle's."""
    torch.manual_seed(0)
    inputs, targets = _inputs("cross", padding=True)
    model = Attention("cross", batch_first=False, mask=torch.rand(T, S) < 0.3).double()
    model.mask[:, 0] = False
    out = model(**inputs)
    F.mse_loss(out, targets).backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    tracker = persample.Tracker(model, F.mse_loss)
    with tracker.observe(targets) as observed:
        observed_out = model(**inputs)
        F.mse_loss(observed_out, targets).backward()
    assert torch.equal(observed_out, out)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, want_grads[name]), name
    want, _ = oracle_grads(model, F.mse_loss, inputs, targets)
    for name, rows in want.items():
        torch.testing.assert_close(observed.stats.mean[name], rows.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(observed.stats.var[name], rows.var(0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_the_causal_hint(batch_first):
    """is_causal=True with its mask: F.multi_head_attention_forward drops the mask and tells SDPA instead."""
    torch.manual_seed(0)
    inputs, targets = _inputs("self")
    model = Attention("self", batch_first, mask=_causal(T))
    forward = model.forward

    def causal_forward(x):
        q = model.embed(x)
        if not batch_first:
            q = q.transpose(0, 1)
        out, _ = model.mha(q, q, q, attn_mask=model.mask, is_causal=True, need_weights=False)
        return model.head((out if batch_first else out.transpose(0, 1)).mean(1))

    model.forward = causal_forward
    _check(model, inputs, targets)
    model.forward = forward


@pytest.mark.parametrize("kind", ["cross", "kv_apart"])
def test_cross_attention_without_biases_and_frozen_out_projection(kind):
    torch.manual_seed(0)
    inputs, targets = _inputs(kind, padding=True)
    model = Attention(kind, batch_first=False, bias=False)
    _check(model, inputs, targets)
    model.mha.out_proj.weight.requires_grad_(False)
    _check(model, inputs, targets)


def test_weights_returned_but_not_in_the_loss_and_dropout_in_eval():
    torch.manual_seed(0)
    inputs, targets = _inputs("cross", padding=True)
    model = Attention("cross", batch_first=False, need_weights=True, dropout=0.5)
    model.eval()
    _check(model, inputs, targets)


def test_transformer_decoder_layer_cross_attention_sequence_first():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=16, dropout=0.0).double()  # batch_first=False

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.memory, self.layer = nn.Linear(4, E), nn.Linear(4, E), layer

        def forward(self, x, memory):
            tgt, mem = self.embed(x).transpose(0, 1), self.memory(memory).transpose(0, 1)
            mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
            return self.layer(tgt, mem, tgt_mask=mask, tgt_is_causal=True).transpose(0, 1).mean(1)

    model = Decoder().double()
    inputs, _ = _inputs("cross")
    targets = torch.randn(B, E, dtype=torch.float64)
    assert find_rule(layer.self_attn) is not None and find_rule(layer.multihead_attn) is not None
    want, _ = oracle_grads(model, F.mse_loss, inputs, targets)
    assert_dicts_close(persample.per_sample_grads(model, F.mse_loss, inputs, targets, engine="fast"), want)
    stats = persample.grad_stats(model, F.mse_loss, inputs, targets, engine="fast")
    for name, rows in want.items():
        torch.testing.assert_close(stats.var[name], rows.var(0), rtol=1e-9, atol=1e-12)


def test_an_unchecked_torch_recomputes_the_attention_and_checks_it(monkeypatch):
    """Where torch's attention code is not the one checked (mha_functions() is None), nothing is recorded:
    the rule recomputes the attention from the call's inputs and compares it with the module's output."""
    checked = []

    def check(*args):
        checked.append(1)
        return real_check(*args)

    real_check = rules._check_recomputed
    monkeypatch.setattr(mha_capture, "_recorded_forward", lambda: None)
    monkeypatch.setattr(rules, "_check_recomputed", check)
    torch.manual_seed(0)
    inputs, targets = _inputs("cross", padding=True)
    _check(Attention("cross", batch_first=False), inputs, targets)
    assert checked
    checked.clear()
    model = Attention("cross", kdim=6, vdim=5)
    model.memory = nn.Linear(4, 6)
    model.forward = _kdim_forward(model, 5, True)
    _check(model, inputs, targets)
    assert checked


def test_the_installed_torchs_attention_code_is_the_checked_one():
    """A torch whose F.multi_head_attention_forward differs takes the recomputing path (exact, slower):
    read its code, check that the projection weights enter only ``linear`` calls, run this file, and add
    its fingerprint to persample._torch_compat._KNOWN_MHA_CODE. Asserted on the torch the fingerprints were
    checked on (CI's pin); another torch is told, as a skip, that its code has not been checked."""
    if not torch.__version__.startswith("2.13."):
        pytest.skip(f"torch {torch.__version__}: its attention code was not checked; the recomputing path runs")
    assert _torch_compat.mha_functions() is not None, torch.__version__


def test_an_error_inside_the_attention_leaves_no_mode_behind():
    torch.manual_seed(0)
    model = Attention("cross").double()
    x, memory = torch.randn(B, T, 4, dtype=torch.float64), torch.randn(B, S, 4, dtype=torch.float64)
    padding = torch.zeros(B, S + 1, dtype=torch.bool)  # the wrong number of keys: the attention raises
    stack = len(_torch_compat.torch_function_mode_stack())
    with pytest.raises(Exception):
        persample.grad_stats(model, F.mse_loss, {"x": x, "memory": memory, "padding": padding}, torch.randn(B, 2))
    assert len(_torch_compat.torch_function_mode_stack()) == stack


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_under_activation_checkpointing(reentrant, monkeypatch):
    """Non-re-entrant checkpointing keeps the forward's graph (only saved tensors are recomputed): the
    recorded projections' edges still get their gradients. Re-entrant checkpointing runs the block without
    gradients, then again in the backward, where nothing is recorded: observe recomputes the attention."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True).double()

    class Checkpointed(nn.Module):
        def __init__(self, reentrant):
            super().__init__()
            self.embed, self.layer, self.reentrant = nn.Linear(4, E), layer, reentrant

        def forward(self, x):
            return checkpoint(self.layer, self.embed(x), use_reentrant=self.reentrant).mean(1)

    model = Checkpointed(reentrant).double()
    reference = Checkpointed(False).double()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(B, T, 4, dtype=torch.float64), torch.randn(B, E, dtype=torch.float64)
    want, _ = oracle_grads(reference, F.mse_loss, x, y)
    recorded = []
    real = rules._recorded_pieces
    monkeypatch.setattr(rules, "_recorded_pieces", lambda *a: recorded.append(real(*a)) or recorded[-1])
    with persample.Tracker(model, F.mse_loss).observe(y) as observed:
        F.mse_loss(model(x), y).backward()
    for name, rows in want.items():
        torch.testing.assert_close(observed.stats.mean[name], rows.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(observed.stats.var[name], rows.var(0), rtol=1e-9, atol=1e-12)
    assert [r is not None for r in recorded] == [not reentrant]
    if not reentrant:
        got = persample.per_sample_grads(model, F.mse_loss, x, y, engine="fast")
        assert_dicts_close(got, want)


def test_only_the_modules_own_covered_call_is_recorded():
    """covered_call: the module's own parameters, no bias_k/bias_v, zero attention, separate projection
    weights, static keys or dropout in training; anything else runs as it is (and is recomputed)."""
    mha = nn.MultiheadAttention(E, H, dropout=0.1)
    q = torch.randn(T, B, E)
    own = (q, q, q, E, H, mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.1, mha.out_proj.weight)
    kwargs = {"training": False, "need_weights": False}
    assert mha_capture.covered_call(mha, (*own, mha.out_proj.bias), kwargs)
    assert not mha_capture.covered_call(mha, (*own, mha.out_proj.bias), {**kwargs, "training": True})
    assert not mha_capture.covered_call(mha, (*own, mha.out_proj.bias), {**kwargs, "static_k": q})
    assert not mha_capture.covered_call(mha, (*own, nn.Linear(E, E).bias), kwargs)
    other = (*own[:9], True, *own[10:], mha.out_proj.bias)  # add_zero_attn
    assert not mha_capture.covered_call(mha, other, kwargs)
    assert not mha_capture.covered_call(mha, (*own, mha.out_proj.bias), {**kwargs, "unknown": 1})
