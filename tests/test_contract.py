"""The exactness contract (persample/contract.py): every refusal has a declared code, every code has a model
that triggers it here, the README's table is the registry's, and private torch internals fail closed."""

import ast
import pathlib
import pickle
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import persample
from persample import BatchLoss, Tracker
from persample.contract import (
    PRECONDITIONS,
    TABLE_MARKERS,
    TABLE_PAGE,
    Finding,
    enforce,
    refusal,
    refusal_table,
    with_refusal_table,
)
from persample.errors import NotExact, PersampleError
from test_moe_routing import problem as moe_problem
from test_moe_routing import token_ce as moe_token_ce
from zoo import assert_dicts_close, oracle_grads

ROOT = pathlib.Path(__file__).resolve().parents[1]
RAISED = ("NotExact", "UnsupportedModelError", "ObservationError", "BatchLossMismatch")


def _data(b=5, d=3, k=2):
    torch.manual_seed(0)
    return torch.randn(b, d, dtype=torch.float64), torch.randn(b, k, dtype=torch.float64)


def _mlp(*middle):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), *middle, nn.Tanh(), nn.Linear(4, 2)).double()


def _fast(model, x, y, loss_fn=F.mse_loss, **kw):
    persample.grad_stats(model, loss_fn, x, y, engine="fast", **kw)


def _observe(model, x, y, backward, loss_fn=F.mse_loss, **kw):
    with Tracker(model, loss_fn).observe(y, **kw):
        backward(model, x, y)


# --------------------------------------------------------------------------------------- models


class Forward(nn.Module):
    """A model whose forward is a function of (self, x): each trigger states its misuse in one lambda."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            setattr(self, name, m)

    def forward(self, x):
        return self.fn(self, x)


def _with_forward(fn, **modules):
    torch.manual_seed(0)
    return Forward(fn, **modules).double()


def _lin(i=3, o=2):
    return nn.Linear(i, o)


def _rewrites_gradient(self, x):
    h = self.a(x)
    h.register_hook(lambda g: -g)
    return self.b(torch.tanh(h))


def _modified_after_call(self, x):
    x = x.clone()
    h = self.a(x)
    x.mul_(2)
    return self.b(torch.tanh(h)) + x[:, :2]


def _reentrant(self, x):
    # the fast engine follows a re-entrant checkpoint's recomputation, but not a layer in it called on an input
    # shared by the batch (batch dim 1): the forward's no_grad pass had no watcher check the expansion's uses
    def block(h):
        return torch.tanh(h + self.c(torch.ones(1, 4, dtype=h.dtype)))

    return self.b(checkpoint(block, self.a(x), use_reentrant=True))


def _rolls_inside_fallback(self, x):
    return self.head(self.mix(x))


class RollMix(nn.Module):
    """A rule-less module that mixes examples: its per-example gradients cannot add up."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):  # (rolling an activation: rows of a raw input mixed on the way are BATCH_MIXED)
        return (x @ self.w).roll(1, 0)


class NotBatchFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):  # [B, T, 3] -> [T, B, 2]
        return (x @ self.w).transpose(0, 1)


class DropsInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        return F.dropout(x @ self.w, 0.3, training=True)


def _time_major(t):
    model = _with_forward(
        lambda s, x: s.out(torch.tanh(s.inp(x.transpose(0, 1))).mean(0)), inp=_lin(3, 4), out=_lin(4, 2)
    )
    torch.manual_seed(0)
    return model, torch.randn(5, t, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)


def _broadcast_misuse():
    model = _with_forward(
        lambda s, x: s.out(x.mean(1) + s.pos(torch.arange(6).unsqueeze(0)).sum(0).sum(0)),
        pos=nn.Embedding(6, 4),
        out=_lin(4, 2),
    )
    torch.manual_seed(0)
    return model, torch.randn(5, 6, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)


def _escaped_tie():
    model = _with_forward(
        lambda s, t: torch.tanh(s.mix(s.embed(t))) @ s.embed.weight.T, embed=nn.Embedding(10, 4), mix=_lin(4, 4)
    )
    torch.manual_seed(0)
    tokens, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 10, (5, 3))
    return model, tokens, y, lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten())


def _spectral():
    torch.manual_seed(0)
    return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)).double()


class _Gain(nn.Module):
    """A module without a closed-form rule (the fast engine's fallback) with a raw parameter."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, h):
        return h * self.gain


def _hooked_parameter():
    # the fast engine applies a parameter's hook to each example's gradient only where a built-in rule forms
    # them; a fallback module's are checked against autograd's mean, which the hook would change
    model = _mlp(_Gain())
    model[1].gain.register_hook(lambda g: 2 * g)
    return model


def _hooked_module():
    model = _mlp()
    model[0].register_full_backward_hook(lambda m, gi, go: None)
    return model


def _classify():
    torch.manual_seed(0)
    return _mlp(), torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))


def _check_mean_on_coupled():
    model = _with_forward(lambda s, x: s.a(x - x.mean(0)), a=_lin())
    x, y = _data()
    persample.check_mean(model, F.mse_loss, x, y, engine="vmap")


def _moe_with_capacity():
    """An MoE whose experts drop the tokens past a capacity counted over the whole flattened batch."""
    model, ids, y = moe_problem(capacity=4)
    return model, ids, y


# ------------------------------------------------------------------------------ triggers, by code


def _regularised_in_the_loss(x, y):
    """loss_fn reads the model's weights (a regulariser): torch.func would see them as constants."""
    model = _mlp()
    loss_fn = lambda out, t: F.mse_loss(out, t) + 0.1 * model[0].weight.pow(2).sum()  # noqa: E731
    persample.grad_stats(model, loss_fn, x, y, engine="vmap")


def _triggers():
    x, y = _data()
    return {
        "BATCHNORM_TRAIN": lambda: _fast(_mlp(nn.BatchNorm1d(4)), x, y),
        "BATCHNORM_NO_RUNNING_STATS": lambda: _fast(_mlp(nn.BatchNorm1d(4, track_running_stats=False)).eval(), x, y),
        "RANDOM_UNDER_ERROR": lambda: _fast(_mlp(nn.Dropout(0.5)), x, y),
        "SHARDED_MODEL": lambda: _fast(_fsdp1_flagged(), x, y),
        "RANDOM_INNER_PRODUCTS": lambda: _directional_with_dropout(),
        "PARAMETER_GRADIENT_HOOK": lambda: _fast(_hooked_parameter(), x, y),
        "MODULE_BACKWARD_HOOK": lambda: _fast(_hooked_module(), x, y),
        "GRADIENT_REWRITTEN": lambda: _fast(_with_forward(_rewrites_gradient, a=_lin(3, 4), b=_lin(4, 2)), x, y),
        "PARAMETER_NOT_SUBSTITUTED": lambda: _regularised_in_the_loss(x, y),
        "VMAP_CANNOT_RUN": lambda: persample.grad_stats(
            _with_forward(lambda s, x: s.a(x) * (1.0 if x.sum().item() > 0 else 2.0), a=_lin()),
            F.mse_loss,
            x,
            y,
            engine="vmap",
        ),
        "RANDOM_SAME_BATCHED": lambda: _fast(_mlp(nn.Dropout(0.5)), x, y, randomness="same"),
        "REENTRANT_CHECKPOINT": lambda: _fast(
            _with_forward(_reentrant, a=_lin(3, 4), b=_lin(4, 2), c=_lin(4, 4)), x, y
        ),
        "EXPANSION_ESCAPES": lambda: _fast(*_broadcast_misuse()),
        "BATCH_DIM_AMBIGUOUS": lambda: _fast(*_time_major(5)),
        "DIM_ZERO_MOVED": lambda: _fast(*_normalised_table()),
        "MODIFIED_IN_PLACE": lambda: _fast(_with_forward(_modified_after_call, a=_lin(3, 4), b=_lin(4, 2)), x, y),
        "BUFFERS_CHANGED": lambda: _fast(_spectral(), x, y),
        "PARAMETER_USED_OUTSIDE": lambda: _fast(*_escaped_tie()),
        "RULE_NOT_APPLICABLE": lambda: _fast(_with_forward(lambda s, x: s.a(input=x), a=_lin()), x, y),
        "FALLBACK_NOT_BATCHED": lambda: _fast(
            _with_forward(lambda s, x: s.head(s.core(x).mean(0)), core=NotBatchFirst(), head=_lin(2, 2)),
            torch.randn(5, 7, 3, dtype=torch.float64),
            y,
        ),
        "FALLBACK_NOT_ISOLATED": lambda: _fast(
            _with_forward(lambda s, x: s.head(s.core(x)), core=DropsInside(), head=_lin()), x, y, randomness="different"
        ),
        "FALLBACK_SUM_MISMATCH": lambda: _fast(
            _with_forward(lambda s, x: s.head(s.mix(x)), mix=RollMix(), head=_lin()), x, y
        ),
        "TOKEN_ROWS_DIFFER": lambda: _fast(*_moe_with_capacity(), loss_fn=moe_token_ce),
        "OUTPUT_NOT_BATCHED": lambda: _fast(
            _with_forward(lambda s, x: s.a(x).sum(), a=_lin()), x, y, loss_fn=lambda out, t: out
        ),
        "LOSS_NOT_PER_EXAMPLE": lambda: _fast(
            _with_forward(lambda s, x: (s.a(x), s.a(x).pow(2).mean()), a=_lin()),
            x,
            y,
            loss_fn=lambda out, t: out[1] + 0 * out[0].sum(),
        ),
        "LOSS_NOT_VMAPPABLE": lambda: _fast(
            _mlp(), x, y, loss_fn=lambda out, t: F.mse_loss(out, t) * (1 if out.sum().item() else 2)
        ),
        "OBSERVE_NO_BACKWARD": lambda: _observe(_mlp(), x, y, lambda m, x, y: None),
        "OBSERVE_AUXILIARY_TERM": lambda: _observe(
            _with_forward(_stores_hidden, a=_lin(3, 4), b=_lin(4, 2)),
            x,
            y,
            lambda m, x, y: (F.mse_loss(m(x), y) + m.hidden.pow(2).mean()).backward(),
        ),
        "OBSERVE_LOSS_NOT_FROM_OUTPUT": lambda: _observe(
            _mlp(), x, y, lambda m, x, y: m(x).sum().backward(), loss_fn=lambda out, t: t.sum()
        ),
        "OBSERVE_NOT_WEIGHTED_SUM": lambda: _observe(
            _mlp(), x, y, lambda m, x, y: (m(x) - y).abs().pow(3).mean().backward()
        ),
        "OBSERVE_NO_OUTPUT_GRADIENT": lambda: _observe(_mlp(), x, y, lambda m, x, y: (-F.mse_loss(m(x), y)).backward()),
        "OBSERVE_WEIGHTS_DIFFER": lambda: _observe(
            _classify()[0],
            _classify()[1],
            _classify()[2],
            lambda m, x, y: F.cross_entropy(m(x), y, weight=torch.tensor([0.2, 3.0], dtype=torch.float64)).backward(),
            loss_fn=F.cross_entropy,
        ),
        "OBSERVE_REDUCTION_MISMATCH": lambda: _observe(
            _mlp(), x, y, lambda m, x, y: F.mse_loss(m(x), y, reduction="sum").backward(), reduction="mean"
        ),
        "OBSERVE_SUM_MISMATCH": lambda: _observe(
            _mlp(), x, y, lambda m, x, y: (F.mse_loss(m(x), y) + m[0].weight.pow(2).sum()).backward()
        ),
        "BATCH_LOSS_MISMATCH": lambda: Tracker(
            _classify()[0],
            BatchLoss(F.cross_entropy, per_example=lambda out, t: F.mse_loss(out, F.one_hot(t, 2).double())),
        ).step(*_classify()[1:]),
        "BATCH_LOSS_NOT_FINITE": lambda: Tracker(
            _mlp(), BatchLoss(_infinite_gradient_loss, per_example=F.mse_loss)
        ).step(x, y),
        "EXAMPLE_LOSS_NOT_FINITE": lambda: Tracker(_mlp(), BatchLoss(_masked_mse, per_example=_masked_mse)).step(
            x, _with_mask(y)
        ),
        "OPAQUE_LOSS_NOT_MEAN": lambda: _opaque_weighted_loss(),
        "MODEL_LOSS_NOT_RECOMPUTED": lambda: _model_loss_with_class_weights(),
        "CLIP_NEEDS_EQUAL_WEIGHTS": lambda: Tracker(
            _classify()[0],
            partial(F.cross_entropy, weight=torch.tensor([0.2, 3.0], dtype=torch.float64)),
            clip_norm=1.0,
        ).step(*_classify()[1:]),
        "MEAN_MISMATCH": _check_mean_on_coupled,
        "PARAMETER_SUBSTITUTED": lambda: _fast(
            _with_forward(
                lambda s, x: s.b(torch.func.functional_call(s.a, {"weight": 1.1 * s.a.weight}, (x,), strict=False)),
                a=_lin(3, 4),
                b=_lin(4, 2),
            ),
            x,
            y,
        ),
        "BATCH_MIXED": lambda: _fast(
            _with_forward(lambda s, x: s.b(s.a(x).roll(1, 0)), a=_lin(3, 4), b=_lin(4, 2)), x, y
        ),
        "EXAMPLE_DIFFERS_ALONE": lambda: _fast(  # example 0 is zeroed by its position: no gradient crosses rows
            _with_forward(lambda s, x: s.b(s.a(x).index_fill(0, torch.tensor([0]), 0.0)), a=_lin(3, 4), b=_lin(4, 2)),
            x,
            y,
        ),
        "BATCH_OF_ONE_FAILS": lambda: persample.grad_stats(  # engine="auto": the fallback runs one example alone
            _with_forward(lambda s, x: s.b(s.a(x)[torch.tensor([1, 0, 3, 2, 4])]), a=_lin(3, 4), b=_lin(4, 2)),
            F.mse_loss,
            x,
            y,
        ),
        "TORCHSCRIPT_MODULE": lambda: _fast(torch.jit.script(_mlp()), x, y),
        "CAPTURE_HOOK_REFUSED": lambda: _fast(_with_forward(lambda s, x: s.a(x), a=_NoHooks(3, 2)).double(), x, y),
        "BATCH_LOSS_COUPLED": lambda: persample.grad_stats(
            _mlp(), lambda out, t: F.mse_loss(out - out.mean(0), t - t.mean(0)), x, y
        ),
        "CUSTOM_RULE_SUM_MISMATCH": _doubled_custom_rule,
    }


class _NoHooks(nn.Linear):
    """A wrapper that takes no forward hooks (as a TorchScript module)."""

    def register_forward_hook(self, *args, **kwargs):
        raise RuntimeError("this module takes no forward hooks")


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x * self.w


def _doubled_custom_rule():
    persample.register_rule(_Scale, lambda m, x, gy: {"w": 2 * x * gy}, params=("w",))
    try:
        x, y = _data()
        torch.manual_seed(0)
        _fast(nn.Sequential(_Scale(), nn.Linear(3, 2)).double(), x, y)
    finally:
        persample.unregister_rule(_Scale)


def _infinite_gradient_loss(out, t):
    """A batch loss whose value is finite but whose gradient at the output is not (sqrt at 0)."""
    return F.mse_loss(out, t) + (out[:1] - out[:1].detach()).abs().sqrt().sum()


def _masked_mse(out, t):
    """A mean over the unmasked entries (mask in t's last column): NaN for an example whose mask is empty,
    as a token mean over an all-padding sequence is, while the batch's mean stays finite."""
    mask = t[:, -1:]
    return ((out - t[:, :-1]).pow(2) * mask).sum() / mask.sum() / out.shape[-1]


def _with_mask(y):
    mask = torch.ones(len(y), 1, dtype=y.dtype)
    mask[0] = 0
    return torch.cat([y, mask], 1)


def _normalised_table():
    """GroupNorm on a buffer [3, 4, 2]: its dim 0 is not the batch, so the rule has no batch to read."""
    model = _with_forward(
        lambda s, x: s.head((x + s.norm(s.table)).mean(1).flatten(1)), norm=nn.GroupNorm(2, 4), head=_lin(8, 2)
    )
    model.register_buffer("table", torch.randn(3, 4, 2, dtype=torch.float64))
    torch.manual_seed(0)
    return model, torch.randn(5, 3, 4, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)


def _stores_hidden(self, x):
    self.hidden = torch.tanh(self.a(x))
    return self.b(self.hidden)


def _fsdp1_flagged():
    model = _mlp()
    model[0].weight._fsdp_flattened = True  # how FSDP1's FlatParameter marks its parameters
    return model


def _directional_with_dropout():
    from persample._batch import as_batch
    from persample.engines.directional import per_example_directional_derivatives

    model = _mlp(nn.Dropout(0.5))
    x, y = _data()
    per_example_directional_derivatives(
        model, F.mse_loss, as_batch(x, y), {n: torch.ones_like(p) for n, p in model.named_parameters()}
    )


def _opaque_weighted_loss():
    model, x, y = _classify()
    weight = torch.tensor([0.2, 3.0], dtype=torch.float64)

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, y):
            logits = self.net(x)
            return {"logits": logits, "loss": F.cross_entropy(logits, y, weight=weight)}

    Tracker(WithLoss(), lambda out: out["loss"]).step({"x": x, "y": y})


def _model_loss_with_class_weights():
    """A Hugging Face-style classification head (by its name and config) whose own loss weighs the classes."""
    model, x, y = _classify()
    weight = torch.tensor([0.2, 3.0], dtype=torch.float64)

    class TinyForSequenceClassification(nn.Module):
        config = type("Config", (), {"num_labels": 2, "problem_type": "single_label_classification"})()

        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, labels):
            logits = self.net(x)
            return {"logits": logits, "loss": F.cross_entropy(logits, labels, weight=weight)}

    persample.grad_stats(TinyForSequenceClassification(), lambda out: out["loss"], {"x": x, "labels": y}, engine="fast")


# OTHER_RANK_FAILED: tests/_distributed_worker.py (another rank fails in a 2- and 4-process group) and
# test_other_rank_failed_has_a_code_and_pickles below
TRIGGERED_IN_A_PROCESS_GROUP = {
    "DDP_WRAPPER",
    "DDP_COMM_HOOK",
    "DDP_MIXED_PRECISION",
    "FSDP2_OPTION",
    "FSDP2_EMPTY_RANK",
    "EMPTY_RANK",
    "OTHER_RANK_FAILED",
}
TRIGGERED_BY_A_RENAME = {"TORCH_INTERNALS_UNKNOWN"}


@pytest.mark.parametrize("code", sorted(_triggers()))
def test_every_code_has_a_model_that_triggers_it(code):
    with pytest.raises(PersampleError) as info:
        _triggers()[code]()
    assert info.value.code == code, str(info.value)
    assert isinstance(info.value, PRECONDITIONS[code].error)
    assert info.value.fix == PRECONDITIONS[code].fix
    assert str(info.value).endswith(f"[{code}]")


def test_the_registry_and_the_triggers_cover_the_same_codes():
    covered = set(_triggers()) | TRIGGERED_IN_A_PROCESS_GROUP | TRIGGERED_BY_A_RENAME
    assert covered == set(PRECONDITIONS), (
        f"declared without a trigger: {sorted(set(PRECONDITIONS) - covered)}; "
        f"triggered but not declared: {sorted(covered - set(PRECONDITIONS))}"
    )


def test_ddp_refusals_in_a_one_process_group():
    script = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        from torch import nn
        import persample
        from persample.errors import PersampleError
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        codes = []
        def code_of(fn):
            try:
                fn()
            except PersampleError as err:
                codes.append(err.code)
        x, y = torch.randn(4, 3), torch.randn(4, 2)
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        code_of(lambda: persample.grad_stats(ddp, nn.functional.mse_loss, x, y))
        hooked = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        hooked.register_comm_hook(None, lambda state, bucket: None)
        code_of(lambda: persample.Tracker(hooked, nn.functional.mse_loss).step(x, y))
        mixed = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        mixed.mixed_precision = object()
        code_of(lambda: persample.Tracker(mixed, nn.functional.mse_loss).step(x, y))
        from torch.distributed.fsdp import fully_shard
        sharded = nn.Linear(3, 2)
        fully_shard(sharded)
        code_of(lambda: persample.Tracker(sharded, nn.functional.mse_loss, clip_norm=1.0))
        code_of(lambda: persample.Tracker(sharded, nn.functional.mse_loss).step(x[:0], y[:0]))
        code_of(lambda: persample.Tracker(ddp, nn.functional.mse_loss).step(x[:0], y[:0]))
        print(" ".join(map(str, codes)))
        dist.destroy_process_group()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [
        "DDP_WRAPPER",
        "DDP_COMM_HOOK",
        "DDP_MIXED_PRECISION",
        "FSDP2_OPTION",
        "FSDP2_EMPTY_RANK",
        "EMPTY_RANK",
    ]


# ------------------------------------------------------------------------ torch internals fail closed

RENAMABLE = [
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
]


@pytest.mark.parametrize("name", RENAMABLE)
def test_a_renamed_global_hook_registry_refuses_and_auto_stays_exact(monkeypatch, name):
    """torch itself reads these names, so the rename is simulated where persample reads them."""
    from persample import _torch_compat

    monkeypatch.setattr(_torch_compat, "_read", _raising_reader(_torch_compat._read, name))
    model = _mlp()
    x, y = _data()
    with pytest.raises(NotExact) as info:
        _fast(model, x, y)
    assert info.value.code == "TORCH_INTERNALS_UNKNOWN" and name in str(info.value)
    stats = persample.grad_stats(model, F.mse_loss, x, y, engine="auto")
    grads, _ = oracle_grads(model, F.mse_loss, x, y)
    assert_dicts_close(stats.mean, {k: g.mean(0) for k, g in grads.items()})


@pytest.mark.parametrize(
    "attribute", ["_forward_hooks", "_backward_hooks", "_forward_pre_hooks", "_backward_pre_hooks"]
)
def test_a_renamed_module_hook_registry_refuses(monkeypatch, attribute):
    model = _mlp()
    x, y = _data()
    # a torch whose modules keep their hooks elsewhere: the attribute is gone from every module
    for m in model.modules():
        object.__delattr__(m, attribute) if attribute in m.__dict__ else None
    with pytest.raises(NotExact) as info:
        _fast(model, x, y)
    assert info.value.code == "TORCH_INTERNALS_UNKNOWN"


def test_a_renamed_tensor_hook_registry_refuses(monkeypatch):
    from persample import _model, _torch_compat

    class Renamed:  # a tensor of a torch whose hook registry has another name
        pass

    with pytest.raises(NotExact) as info:
        _torch_compat.tensor_gradient_hooks(Renamed())
    assert info.value.code == "TORCH_INTERNALS_UNKNOWN"
    monkeypatch.setattr(_model, "tensor_gradient_hooks", lambda t: _torch_compat.tensor_gradient_hooks(Renamed()))
    x, y = _data()
    with pytest.raises(NotExact) as info:
        persample.grad_stats(_mlp(), F.mse_loss, x, y, engine="vmap")
    assert info.value.code == "TORCH_INTERNALS_UNKNOWN"


def _raising_reader(read, name):
    def reader(owner, attribute, what, kinds=(dict,)):
        if attribute == name:
            return read(object(), attribute, what, kinds)  # as if the attribute had gone
        return read(owner, attribute, what, kinds)

    return reader


def test_a_registry_of_an_unknown_type_refuses():
    from persample import _torch_compat

    class Layout:
        _comm_hooks = "not a list"

    with pytest.raises(NotExact) as info:
        _torch_compat.ddp_comm_hooks(Layout())
    assert info.value.code == "TORCH_INTERNALS_UNKNOWN"


# ------------------------------------------------------------------------------- the registry itself


def test_no_refusal_is_raised_without_a_code():
    """Every NotExact / UnsupportedModelError / ObservationError / BatchLossMismatch built in the library
    passes a code, or is built from a Finding (which carries one)."""
    missing = []
    for path in (ROOT / "persample").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in RAISED:
                if not any(k.arg == "code" for k in node.keywords) and not (
                    node.args and isinstance(node.args[0], (ast.Name, ast.Attribute))
                ):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not missing, missing


def test_every_code_the_library_names_is_declared():
    import re

    named = set()
    for path in (ROOT / "persample").rglob("*.py"):
        text = path.read_text()
        named |= set(re.findall(r'code="([A-Z_]+)"', text)) | set(re.findall(r'Finding\(\s*"([A-Z_]+)"', text))
    assert named <= set(PRECONDITIONS), sorted(named - set(PRECONDITIONS))


def test_the_readme_table_is_the_registrys():
    """The table of refusals moved from the README to the documentation site (docs/engines.md, TABLE_PAGE)."""
    page = (ROOT / TABLE_PAGE).read_text()
    begin, end = TABLE_MARKERS
    assert page.count(begin) == 1 and page.count(end) == 1
    table = page.split(begin)[1].split(end)[0].strip()
    assert table == refusal_table(), f"regenerate with: python -m persample.contract --write ({TABLE_PAGE})"


def test_the_generator_rewrites_the_table_in_place(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\n{TABLE_MARKERS[0]}\n| stale |\n{TABLE_MARKERS[1]}\n\nafter\n")
    done = subprocess.run(
        [sys.executable, "-m", "persample.contract", "--write", str(page)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert text == f"# Title\n\n{TABLE_MARKERS[0]}\n{refusal_table()}\n{TABLE_MARKERS[1]}\n\nafter\n"
    page.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        with_refusal_table(page.read_text())


def test_findings_refusals_and_enforce():
    finding = Finding("MODIFIED_IN_PLACE", "x was changed", module="0 (Linear)")
    with pytest.raises(NotExact) as info:
        enforce(None, finding, Finding("PARAMETER_USED_OUTSIDE", "later"))
    assert (info.value.code, info.value.module, str(info.value)) == (
        "MODIFIED_IN_PLACE",
        "0 (Linear)",
        "x was changed [MODIFIED_IN_PLACE]",
    )
    enforce(None, None)
    with pytest.raises(KeyError, match="undeclared"):
        Finding("NO_SUCH_CODE", "x")
    err = refusal("BATCHNORM_TRAIN")
    assert type(err) is persample.UnsupportedModelError and PRECONDITIONS["BATCHNORM_TRAIN"].statement in str(err)


def test_refusals_survive_pickling_with_their_code():
    for err in (refusal("MODIFIED_IN_PLACE", "x", module="m"), persample.MeanMismatchError("m", report=None)):
        back = pickle.loads(pickle.dumps(err))
        assert (type(back), back.code, back.module, str(back)) == (type(err), err.code, err.module, str(err))


def test_other_rank_failed_has_a_code_and_pickles():
    """``OtherRankFailed`` (raised by ``persample.distributed.agree`` where another rank failed) is a refusal
    with a code, still a RuntimeError, and survives pickling with its ranks (workers send it between
    processes)."""
    from persample.distributed import OtherRankFailed

    err = OtherRankFailed("rank 1 of 2 raised", [1])
    assert isinstance(err, PersampleError) and isinstance(err, RuntimeError)
    assert (err.code, err.ranks, err.fix) == ("OTHER_RANK_FAILED", (1,), PRECONDITIONS["OTHER_RANK_FAILED"].fix)
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.code, back.ranks, str(back)) == (OtherRankFailed, err.code, err.ranks, str(err))
    assert str(err).endswith("[OTHER_RANK_FAILED]")
