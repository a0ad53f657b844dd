"""Record every dropout mask a call draws, and replay them one example at a time in the float64 oracle.

``torch.nn.functional.dropout`` (which ``nn.Dropout`` and Hugging Face's eager attention call) is
replaced, for the duration of a ``with``, by the very computation PyTorch does on the CPU
(``noise = empty_like(x).bernoulli_(1 - p); noise.div_(1 - p); x * noise``: same draws from the same
generator, bitwise the same output, checked by ``test_recorder_is_native_dropout``) that also keeps
the mask. Under ``torch.func.vmap`` the mask is unwrapped from functorch's batching so that every
example's own draw is kept. The replay then runs the model one example at a time with the masks of
that example, and differentiates in float64: the oracle for a random model, independent of persample.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch._C import _functorch as functorch
from zoo import batch_size, call_model, split_example

_native = F.dropout


def _unwrap(t):
    """The plain tensor under functorch's wrappers, with vmap's batch dim moved to 0."""
    batched = False
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            bdim = functorch.maybe_get_bdim(t)
            t = functorch.get_unwrapped(t).movedim(bdim, 0)
            batched = True
        else:
            t = functorch.get_unwrapped(t)
    return t.detach().clone(), batched


class DropoutMasks:
    """``with DropoutMasks() as rec: <call>`` keeps ``rec.calls``: (mask, under_vmap) per dropout call."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, bool]] = []
        self._replay: list[torch.Tensor] | None = None

    def _dropout(self, input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return input
        if self._replay is not None:
            noise = self._replay.pop(0)
            assert noise.shape == input.shape, (noise.shape, input.shape)
            return input * noise.to(input.dtype).div(1 - p)
        noise = torch.empty_like(input).bernoulli_(1 - p)
        self.calls.append(_unwrap(noise))
        noise.div_(1 - p)
        return input.mul_(noise) if inplace else input * noise

    def __enter__(self):
        F.dropout = self._dropout
        return self

    def __exit__(self, *exc):
        F.dropout = _native
        return False

    # ------------------------------------------------------------------ reading the record

    def forwards(self, per_forward: int) -> list[list[tuple[torch.Tensor, bool]]]:
        """The calls grouped into forwards of ``per_forward`` dropout calls each."""
        assert len(self.calls) % per_forward == 0, (len(self.calls), per_forward)
        return [self.calls[i : i + per_forward] for i in range(0, len(self.calls), per_forward)]

    def example_masks(self, per_forward: int, b: int) -> list[list[torch.Tensor]]:
        """Per example, its masks (each shaped like one example's activation), as the engine drew them.

        The per-example forwards (vmap's chunks, the loop's single examples) if there are any, else
        the one batch forward (the fast engine, ``observe``)."""
        per_example = [f for f in self.forwards(per_forward) if f[0][1] or f[0][0].shape[0] == 1]
        if per_example:
            rows: list[list[torch.Tensor]] = []
            for forward in per_example:
                masks = [m for m, _ in forward]
                if forward[0][1]:  # a vmap chunk: dim 0 is the example
                    rows += [[m[j] for m in masks] for j in range(masks[0].shape[0])]
                else:
                    rows.append(masks)
            assert len(rows) == b, (len(rows), b)
            return rows
        return self.batch_masks(per_forward, b)

    def batch_masks(self, per_forward: int, b: int, which: int = -1) -> list[list[torch.Tensor]]:
        """Per example, its rows of the masks of a forward of the whole batch (the last one by default)."""
        batch = [f for f in self.forwards(per_forward) if not f[0][1] and f[0][0].shape[0] == b]
        assert batch, "no forward of the whole batch was recorded"
        masks = [m for m, _ in batch[which]]
        return [[m[i : i + 1] for m in masks] for i in range(b)]

    @contextlib.contextmanager
    def replaying(self, masks: list[torch.Tensor]):
        F.dropout, self._replay = self._dropout, list(masks)
        try:
            yield
            assert not self._replay, f"{len(self._replay)} masks were not used"
        finally:
            F.dropout, self._replay = _native, None


def count_dropout_calls(model, inputs) -> int:
    """How many dropout calls one forward of ``model`` makes (the RNG state is restored)."""
    state = torch.get_rng_state()
    with DropoutMasks() as rec, torch.no_grad():
        call_model(model, inputs)
    torch.set_rng_state(state)
    return len(rec.calls)


def replay_oracle(model, loss_fn, inputs, targets, masks: list[list[torch.Tensor]]):
    """({name: [B, *shape]}, losses [B]): a float64 loop of autograd, example i under its masks ``masks[i]``."""
    rec = DropoutMasks()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    losses = []
    for i in range(batch_size(inputs)):
        with rec.replaying(masks[i]):
            out = call_model(model, split_example(inputs, i))
        loss = loss_fn(out, split_example(targets, i))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            rows[n].append(torch.zeros_like(p) if g is None else g)
        losses.append(loss.detach())
    return {n: torch.stack(r) for n, r in rows.items()}, torch.stack(losses)


def batch_backward_oracle(model, loss_fn, inputs, targets, masks: list[list[torch.Tensor]]):
    """{name: grad}: autograd's gradient of the batch loss, the forward of the batch under the masks
    ``masks`` (rows of a batch forward), computed independently (no ``.grad`` touched)."""
    rec = DropoutMasks()
    batch_mask = [torch.cat([masks[i][k] for i in range(len(masks))]) for k in range(len(masks[0]))]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with rec.replaying(batch_mask):
        out = call_model(model, inputs)
    loss = loss_fn(out, targets)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: g for n, g in zip(params, grads) if g is not None}
