"""The fast engine under re-entrant activation checkpointing (``checkpoint(..., use_reentrant=True)``, issue 22).

Such a checkpoint runs its block under no_grad in the forward and again, with gradients, inside the backward,
where it refuses ``autograd.grad``. The fast engine used to refuse it (REENTRANT_CHECKPOINT), and with vmap
refusing too, ``auto`` took the per-example loop. Now it follows the recomputation as ``observe`` does: one
``backward()`` into emptied ``.grad`` slots, the block's calls recorded when they are recomputed, their output
gradients from hooks, the recomputed graph audited after the backward. The oracle is the float64 loop on the
same model without checkpointing (the loop itself cannot take ``autograd.grad`` through the checkpoint)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

import persample
from oracle_stats import oracle_stats
from zoo import CheckpointedPositions, oracle_grads


class Stack(nn.Module):
    """Linear → checkpoint(block) → Linear; ``mode`` adds a misuse inside the block (the refusal tests)."""

    def __init__(self, mode="plain", nested=False):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.c = nn.Linear(8, 3)
        self.mode, self.nested, self.checkpointed = mode, nested, True

    def _block(self, h):
        if self.mode == "mixes_batch":
            h = h - h.mean(0)
        if self.mode == "parameter_outside":
            h = h + h @ self.c.weight.T @ self.c.weight
        if self.mode == "rewrites_gradient":
            h = h * 1.0
            if h.requires_grad:  # in the recomputation only
                h.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
        if self.nested and self.checkpointed:
            return self.block[2:](checkpoint(self.block[:2], h, use_reentrant=True))
        return self.block(h)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(checkpoint(self._block, h, use_reentrant=True) if self.checkpointed else self._block(h))


def _batch(b=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


def _summed(out, t):
    return F.cross_entropy(out, t, reduction="sum")


def _plain(model):
    plain = copy.deepcopy(model)
    plain.checkpointed = False
    return plain


def _assert_oracle(stats, expected, rtol=1e-9, atol=1e-14):
    for k in expected["mean"]:
        torch.testing.assert_close(stats.mean[k], expected["mean"][k], rtol=rtol, atol=atol, msg=k)
        torch.testing.assert_close(stats.var[k], expected["var"][k], rtol=rtol, atol=atol, msg=k)
    torch.testing.assert_close(stats.sq_norms, expected["sq_norms"], rtol=rtol, atol=atol)
    if stats.inner_products is not None:
        torch.testing.assert_close(stats.inner_products, expected["inner_products"], rtol=rtol, atol=atol)


def _checkpoint_functions(out):
    stack, seen, found = [out.grad_fn], set(), []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("CheckpointFunctionBackward"):
            found.append(node.run_function)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


@pytest.mark.parametrize("nested", [False, True])
def test_fast_engine_is_exact_through_a_reentrant_checkpoint_and_leaves_the_model_as_found(nested):
    """Was NotExact(REENTRANT_CHECKPOINT). The statistics are the oracle's; every p.grad (set or None), x.grad
    and post-accumulate-grad hook is as it was; no torch-function mode is left; the checkpoint keeps its own
    function; and the same call twice gives the same numbers."""
    torch.manual_seed(0)
    model, (x, y) = Stack(nested=nested).double(), _batch()
    expected = oracle_stats(_plain(model), _summed, x, y)
    model.a.weight.grad = torch.full_like(model.a.weight, 0.5)  # one set, the others None
    calls = []
    model.block[0].weight.register_post_accumulate_grad_hook(lambda p: calls.append(p))
    x.requires_grad_(True)
    for _ in range(2):
        stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast", inner_products=True)
        _assert_oracle(stats, expected)
        assert torch.equal(model.a.weight.grad, torch.full_like(model.a.weight, 0.5))
        assert all(p.grad is None for n, p in model.named_parameters() if n != "a.weight")
        assert x.grad is None and calls == []
        assert _get_current_function_mode_stack() == []
    out = model(x)
    assert _checkpoint_functions(out)[0] == model._block


def test_per_sample_grads_step_and_explain_take_the_fast_engine():
    """per_sample_grads gives the oracle's rows (the fast engine: vmap cannot run a checkpoint); Tracker.step
    writes the plain backward's p.grad with the oracle's statistics; explain names the fast engine, which
    ``auto`` then takes (no SlowPathWarning: the loop is not run)."""
    torch.manual_seed(0)
    model, (x, y) = Stack().double(), _batch()
    rows, _ = oracle_grads(_plain(model), _summed, x, y)
    got = persample.per_sample_grads(model, F.cross_entropy, x, y)
    for n in rows:
        torch.testing.assert_close(got[n], rows[n], rtol=1e-9, atol=1e-14, msg=n)
    report = persample.explain(model, F.cross_entropy, x, y)
    assert report.entry_points["grad_stats"] == "fast" and report.engines["fast"].exact, str(report)
    expected = oracle_stats(_plain(model), _summed, x, y)
    plain = _plain(model)
    F.cross_entropy(plain(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", persample.SlowPathWarning)
        stats = persample.Tracker(model, F.cross_entropy).step(x, y)
    _assert_oracle(stats, expected)
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=n)


@pytest.mark.parametrize(
    "mode, code",
    [
        ("mixes_batch", "BATCH_MIXED"),
        ("parameter_outside", "PARAMETER_USED_OUTSIDE"),
        ("rewrites_gradient", "GRADIENT_REWRITTEN"),
    ],
)
def test_guards_hold_inside_the_recomputed_block(mode, code):
    """What the block does in its recomputation is audited as a forward would be, each misuse refused with its
    code (was REENTRANT_CHECKPOINT for all), and p.grad stays None."""
    torch.manual_seed(0)
    model, (x, y) = Stack(mode).double(), _batch()
    with pytest.raises(persample.NotExact) as raised:
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    assert raised.value.code == code
    assert all(p.grad is None for p in model.parameters())
    assert _get_current_function_mode_stack() == []


def test_a_block_without_layers_and_a_leaf_hidden_in_it():
    """A checkpoint whose block calls no layer (its forward records nothing without gradients) is followed
    once the graph audit meets it; a leaf that requires grad and that only the recomputed graph reaches (a
    tensor attribute, not a parameter) keeps its .grad."""

    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 3)
            self.gain = torch.full((8,), 1.5, dtype=torch.float64, requires_grad=True)
            self.checkpointed = True

        def _block(self, h):
            return torch.tanh(h) * self.gain

        def forward(self, x):
            h = self.a(x)
            return self.c(checkpoint(self._block, h, use_reentrant=True) if self.checkpointed else self._block(h))

    torch.manual_seed(0)
    model, (x, y) = Raw().double(), _batch()
    model.gain.grad = torch.full_like(model.gain, 7.0)
    expected = oracle_stats(_plain(model), _summed, x, y)
    stats = persample.grad_stats(model, F.cross_entropy, x, y, engine="fast", inner_products=True)
    _assert_oracle(stats, expected)
    assert torch.equal(model.gain.grad, torch.full_like(model.gain, 7.0))


def test_dropout_in_the_block_is_refused_under_error_and_replayed_under_different():
    """randomness="error": the dropout in the block is refused as in any forward. "different": the
    recomputation draws the forward's masks again (preserve_rng_state), so the statistics equal the fast
    engine's on the same model without checkpointing from the same seed."""
    torch.manual_seed(0)
    model, (x, y) = Stack().double(), _batch()
    model.block.insert(2, nn.Dropout(0.5))
    model.train()
    with pytest.raises(persample.UnsupportedModelError, match="randomness"):
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast")
    results = []
    for checkpointed in (True, False):
        model.checkpointed = checkpointed
        torch.manual_seed(1)
        results.append(persample.grad_stats(model, F.cross_entropy, x, y, engine="fast", randomness="different"))
    got, want = results
    for k in want.mean:
        torch.testing.assert_close(got.mean[k], want.mean[k], rtol=1e-12, atol=1e-15, msg=k)
        torch.testing.assert_close(got.var[k], want.var[k], rtol=1e-12, atol=1e-15, msg=k)
    assert float(got.var["block.0.weight"].abs().sum()) > 0


def test_a_layer_on_a_batch_of_one_in_the_block_is_still_refused_and_the_fix_works():
    """A layer called on positions shared by the batch inside the block would have its output expanded in the
    recomputation, where no watcher checked the forward's uses of it: REENTRANT_CHECKPOINT, naming the
    setting and its fix, use_reentrant=False, which is then exact."""

    torch.manual_seed(0)
    model = CheckpointedPositions().double()
    ids, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))
    with pytest.raises(persample.NotExact, match=r"batch dim of size 1.*use_reentrant=True") as raised:
        persample.grad_stats(model, F.cross_entropy, ids, y, engine="fast")
    assert raised.value.code == "REENTRANT_CHECKPOINT"
    assert all(p.grad is None for p in model.parameters())
    model.reentrant = False
    expected = oracle_stats(model, _summed, ids, y)
    _assert_oracle(persample.grad_stats(model, F.cross_entropy, ids, y, engine="fast", inner_products=True), expected)


class RecurrentBlock(nn.Module):
    """A GRU (no closed-form rule here: the fast engine's torch.func fallback) inside the re-entrant block."""

    def __init__(self):
        super().__init__()
        self.a, self.gru, self.c = nn.Linear(4, 6), nn.GRU(6, 5, batch_first=True), nn.Linear(5, 3)
        self.checkpointed = True

    def _block(self, h):
        return self.gru(h)[0]

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = checkpoint(self._block, h, use_reentrant=True) if self.checkpointed else self._block(h)
        return self.c(h[:, -1])


def test_a_fallback_module_inside_the_block_is_exact():
    """The recomputed call of a module without a rule gets its rows from torch.func on the recomputation's
    inputs and output gradients, checked against autograd's sum as any fallback."""
    torch.manual_seed(0)
    model = RecurrentBlock().double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 7, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    rows, _ = oracle_grads(_plain(model), _summed, x, y)
    _assert_oracle(
        persample.grad_stats(model, F.cross_entropy, x, y, engine="fast", inner_products=True),
        oracle_stats(_plain(model), _summed, x, y),
    )
    got = persample.per_sample_grads(model, F.cross_entropy, x, y)
    for n in rows:
        torch.testing.assert_close(got[n], rows[n], rtol=1e-9, atol=1e-14, msg=n)


def test_peft_lora_gpt2_under_reentrant_checkpointing_takes_the_fast_engine():
    """PEFT LoRA with re-entrant gradient checkpointing (the QLoRA recipe's setting): transformers hooks the
    input embeddings so that the blocks get gradients; the fast engine is exact (the oracle: the same model
    without checkpointing) and leaves every p.grad None."""
    pytest.importorskip("peft")
    from test_integrations import summed_token_loss
    from test_integrations_matrix import lora
    from zoo import gpt2_tiny

    torch.manual_seed(0)
    model = lora(gpt2_tiny().double(), ["c_attn"], fan_in_fan_out=True).train()
    ids = torch.randint(1, 40, (4, 8), generator=torch.Generator().manual_seed(1))
    expected = oracle_stats(copy.deepcopy(model), summed_token_loss, {"input_ids": ids}, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    stats = persample.grad_stats(model, summed_token_loss, {"input_ids": ids}, ids, engine="fast", inner_products=True)
    _assert_oracle(stats, expected)
    assert all(p.grad is None for p in model.parameters())
