"""observe() under re-entrant activation checkpointing (``checkpoint(..., use_reentrant=True)``, issue 23).

The checkpointed block runs under no_grad in the forward and again, with gradients, in the backward; observe
follows that recomputation (its unit calls are the block's calls, the inner backward gives their output
gradients) and the graph audit walks through the recomputed graph. Statistics equal the float64 loop oracle
(on the same model without checkpointing, since re-entrant checkpointing refuses ``autograd.grad``), ``p.grad``
is the user's own backward's, and every guard still refuses inside the block."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

import persample
from oracle_stats import oracle_stats
from zoo import CheckpointedPositions
from test_integrations import summed_token_loss
from zoo import gpt2_tiny


class Stack(nn.Module):
    """A Linear stack whose middle block is checkpointed (re-entrant); ``mode`` chooses what the block
    does besides its layers, for the refusal tests; ``checkpointed=False`` runs it plainly (the oracle)."""

    def __init__(self, mode="plain", nested=False):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.c = nn.Linear(8, 3)
        self.mode, self.nested, self.checkpointed = mode, nested, True

    def _block(self, h):
        if self.mode == "mixes_batch":
            h = h - h.mean(0)  # every example's output depends on the others
        if self.mode == "parameter_outside":
            h = h + h @ self.c.weight.T @ self.c.weight  # c's weight used outside c
        if self.mode == "rewrites_gradient":
            h = h * 1.0  # computed in the block: requires grad in the recomputation only
            if h.requires_grad:
                h.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
        if self.nested and self.checkpointed:
            h = checkpoint(self.block[:2], h, use_reentrant=True)
            return self.block[2:](h)
        return self.block(h)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = checkpoint(self._block, h, use_reentrant=True) if self.checkpointed else self._block(h)
        return self.c(h)


def _batch(b=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


def _checkpoint_nodes(out):
    stack, seen, found = [out.grad_fn], set(), []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("CheckpointFunctionBackward"):
            found.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


def _expected(model, x, y):
    plain = copy.deepcopy(model)
    plain.checkpointed = False
    return oracle_stats(plain, lambda out, t: F.cross_entropy(out, t, reduction="sum"), x, y)


def _assert_oracle(stats, expected, rtol=1e-9, atol=1e-14):
    for k in expected["mean"]:
        torch.testing.assert_close(stats.mean[k], expected["mean"][k], rtol=rtol, atol=atol, msg=k)
        torch.testing.assert_close(stats.var[k], expected["var"][k], rtol=rtol, atol=atol, msg=k)
    torch.testing.assert_close(stats.sq_norms, expected["sq_norms"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("nested", [False, True])
def test_reentrant_checkpointed_linear_stack_is_exact(nested):
    """Was refused (REENTRANT_CHECKPOINT). Two steps: statistics = the oracle's, p.grad = the user's own
    backward's, no torch-function mode left behind, the checkpoint's function given back."""
    torch.manual_seed(0)
    model, (x, y) = Stack(nested=nested).double(), _batch()
    expected = _expected(model, x, y)
    tracker = persample.Tracker(model, F.cross_entropy)
    for _ in range(2):
        model.zero_grad()
        with tracker.observe(y) as observed:
            out = model(x)
            F.cross_entropy(out, y).backward()
        observed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        _assert_oracle(observed.stats, expected)
        assert _get_current_function_mode_stack() == []
        assert [node.run_function for node in _checkpoint_nodes(out)] == [model._block]
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            assert torch.equal(observed_grads[n], p.grad), n


@pytest.mark.parametrize(
    "mode, code",
    [
        ("mixes_batch", "BATCH_MIXED"),
        ("parameter_outside", "PARAMETER_USED_OUTSIDE"),
        ("rewrites_gradient", "GRADIENT_REWRITTEN"),
    ],
)
def test_guards_hold_inside_a_reentrant_block(mode, code):
    """What the block does in its recomputation is audited as the forward would be: a batch mean, a parameter
    used outside its module, a gradient hook that rewrites the batch's gradient (registered in the
    recomputation only: in the forward's no_grad pass nothing requires grad) are refused with their code."""
    torch.manual_seed(0)
    model, (x, y) = Stack(mode).double(), _batch()
    tracker = persample.Tracker(model, F.cross_entropy)
    with pytest.raises(persample.NotExact) as raised:
        with tracker.observe(y):
            F.cross_entropy(model(x), y).backward()
    assert raised.value.code == code
    assert _get_current_function_mode_stack() == []


def test_reentrant_checkpoint_without_layers_inside_is_still_refused_and_the_fix_works():
    """A checkpoint whose block calls no layer (an activation function) is not followed (nothing to record;
    its graph stays hidden): refused as before, naming the setting (use_reentrant=True) and the fix,
    use_reentrant=False, which makes the same model exact."""

    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 3)
            self.reentrant = True

        def forward(self, x):
            return self.c(checkpoint(lambda h: torch.tanh(h) * 2, self.a(x), use_reentrant=self.reentrant))

    torch.manual_seed(0)
    model, (x, y) = Raw().double(), _batch()
    with pytest.raises(persample.NotExact, match=r"use_reentrant=True.*use_reentrant=False") as raised:
        with persample.Tracker(model, F.cross_entropy).observe(y):
            F.cross_entropy(model(x), y).backward()
    assert raised.value.code == "REENTRANT_CHECKPOINT"
    model.reentrant = False  # the fix the message names
    expected = oracle_stats(model, lambda out, t: F.cross_entropy(out, t, reduction="sum"), x, y)
    with persample.Tracker(model, F.cross_entropy).observe(y) as observed:
        F.cross_entropy(model(x), y).backward()
    _assert_oracle(observed.stats, expected)


def _llama_tiny():
    from test_integrations_matrix import llama_tiny

    return llama_tiny()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_reentrant_gradient_checkpointing_observe_is_exact(arch):
    """gradient_checkpointing_enable(use_reentrant=True) on tiny GPT-2 and Llama (float64): the statistics
    are the oracle's (of the same model without checkpointing), p.grad is the plain backward's."""
    torch.manual_seed(0)
    model = (gpt2_tiny() if arch == "gpt2" else _llama_tiny()).double().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (4, 8), generator=g)
    loss = persample.causal_lm_loss()
    expected = oracle_stats(copy.deepcopy(model), summed_token_loss, {"input_ids": ids}, ids)
    unchecked = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    plain = copy.deepcopy(model)
    tracker = persample.Tracker(model, loss)
    with tracker.observe(ids) as observed:
        loss(model(input_ids=ids), ids).backward()
    # Llama computes its rotary embedding and RMSNorm in float32 inside a float64 model: the per-example
    # oracle agrees to that precision, and the observation without checkpointing to float64's
    _assert_oracle(observed.stats, expected, *((1e-9, 1e-14) if arch == "gpt2" else (1e-6, 1e-6)))
    with persample.Tracker(unchecked, loss).observe(ids) as without:
        loss(unchecked(input_ids=ids), ids).backward()
    for k in without.stats.mean:
        torch.testing.assert_close(observed.stats.var[k], without.stats.var[k], rtol=1e-12, atol=1e-16, msg=k)
    loss(plain(input_ids=ids), ids).backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_dropout_in_a_reentrant_block_uses_the_forwards_masks():
    """The checkpoint recomputes its block with the forward's random state (preserve_rng_state), so dropout
    in the block draws the forward's masks again: the statistics are those of the same forward without
    checkpointing (same seed, same masks), and p.grad is that forward's."""
    torch.manual_seed(0)
    model, (x, y) = Stack().double(), _batch()
    model.block.insert(2, nn.Dropout(0.5))
    model.train()
    results = []
    for checkpointed in (True, False):
        model.checkpointed = checkpointed
        model.zero_grad()
        torch.manual_seed(1)
        with persample.Tracker(model, F.cross_entropy).observe(y) as observed:
            F.cross_entropy(model(x), y).backward()
        results.append((observed.stats, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (stats, grads), (plain_stats, plain_grads) = results
    for k in plain_grads:
        torch.testing.assert_close(grads[k], plain_grads[k], rtol=1e-12, atol=1e-15, msg=k)
        torch.testing.assert_close(stats.var[k], plain_stats.var[k], rtol=1e-12, atol=1e-15, msg=k)
    torch.testing.assert_close(stats.sq_norms, plain_stats.sq_norms, rtol=1e-12, atol=1e-15)
    assert float(stats.var["block.0.weight"].abs().sum()) > 0


def test_following_a_checkpoint_leaves_no_reference_cycle():
    """The wrapped checkpoint functions refer to the capture; they are given back when the observation ends,
    so the step's graph and activations are freed by reference counting alone (no cycle through autograd's
    nodes, which the garbage collector may not see)."""
    import gc
    import weakref

    torch.manual_seed(0)
    model, (x, y) = Stack().double(), _batch()
    tracker = persample.Tracker(model, F.cross_entropy)
    F.cross_entropy(model(x), y).backward()  # torch imports lazily on its first checkpoint
    gc.collect()
    gc.disable()
    try:
        refs = []
        for _ in range(2):
            with tracker.observe(y):
                out = model(x)
                refs.append(weakref.ref(out))
                refs.extend(weakref.ref(node) for node in _checkpoint_nodes(out))
                F.cross_entropy(out, y).backward()
            del out
        assert len(refs) == 4 and all(r() is None for r in refs)
    finally:
        gc.enable()


def test_layer_on_a_batch_of_one_inside_a_reentrant_block_is_refused_naming_the_setting():
    """A layer called on positions shared by the batch (arange(T)[None]) inside the block: its output would
    be expanded over the batch in the recomputation, where no watcher checked the forward's uses of it, so
    observe refuses, naming re-entrant checkpointing and its fix (which is then exact)."""

    torch.manual_seed(0)
    model = CheckpointedPositions().double()
    ids, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))
    with pytest.raises(persample.NotExact, match=r"batch dim of size 1.*use_reentrant=True") as raised:
        with persample.Tracker(model, F.cross_entropy).observe(y):
            F.cross_entropy(model(ids), y).backward()
    assert raised.value.code == "REENTRANT_CHECKPOINT"
    assert _get_current_function_mode_stack() == []
    model.reentrant = False
    expected = oracle_stats(model, lambda out, t: F.cross_entropy(out, t, reduction="sum"), ids, y)
    with persample.Tracker(model, F.cross_entropy).observe(y) as observed:
        F.cross_entropy(model(ids), y).backward()
    _assert_oracle(observed.stats, expected)
