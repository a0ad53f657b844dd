"""The ``loop`` engine: one ordinary forward + backward per example. Exact for any model.

For example i, L_i = loss_fn(model(x_i[None]), y_i[None]) is computed by the
real module (no ``functional_call``, no ``vmap``), and g_i = ∇_θ L_i (unscaled)
by ``torch.autograd.grad``. So whatever the model does on a batch of one is
honoured as it is: data-dependent branches on attention masks, packed sequences,
gradient checkpointing (re-entrant checkpointing through ``backward()``), forward
and backward hooks, and tensor hooks on parameters.

It costs B small passes instead of one batched pass: ``engine="auto"`` uses it
only where neither the fast engine nor ``vmap`` can be exact, and warns
(:class:`~persample.errors.SlowPathWarning`).

Random ops follow the ``randomness`` contract of the other engines: ``"error"``
raises :class:`~persample.errors.UnsupportedModelError` naming the module,
``"same"`` replays one RNG state for every example, ``"different"`` lets each
example draw its own numbers.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .._batch import Batch, tensors_in
from .._model import (
    BufferState,
    RandomCalls,
    RandomCallStop,
    buffer_state,
    cuda_devices,
    first_random_module,
    randomness_error,
    restore_buffer_state,
    restore_rng,
    rng_snapshot,
    trainable_parameters,
)
from ..stats import GradStats
from ._autograd import dense_gradient, gradients
from .streaming import stream_grad_stats
from .vmap import check_per_example_loss

__all__ = ["loop_grads", "loop_grad_stats"]

LossFn = Callable[..., Tensor]

#: Examples whose gradients are stacked before they are reduced (bounds memory to chunk × P).
DEFAULT_CHUNK = 16


def loop_grads(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    *,
    randomness: str = "error",
    shared_rng: list[Tensor] | None = None,
    buffers: BufferState | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example gradients ``{name: [B, *shape]}`` and losses ``[B]``, one example at a time.

    Every example starts from the buffers ``buffers`` (default: those on entry), as every
    example of a batch forward sees the same ones (a forward that updates a buffer it reads,
    such as spectral norm's power iteration, would otherwise move each example along).
    Under ``randomness="same"`` every example starts from the RNG state ``shared_rng``
    (default: the state on entry).
    """
    params = trainable_parameters(model)
    start = buffer_state(model) if buffers is None else buffers
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    losses = []
    if randomness == "same" and shared_rng is None:
        shared_rng = rng_snapshot(model)
    for i in range(batch.size):
        example = batch.slice(i, i + 1)
        if i > 0 or buffers is not None:
            restore_buffer_state(start)
        if randomness == "same":
            assert shared_rng is not None  # taken above for randomness="same"
            restore_rng(model, shared_rng)
        # random draws seen by what the model calls (stopped before drawing), not by the shared generators
        watcher = RandomCalls(stop=True) if randomness == "error" else contextlib.nullcontext()
        with torch.enable_grad():
            try:
                with watcher:
                    loss = check_per_example_loss(example.call(model, loss_fn))
            except RandomCallStop:
                raise randomness_error(first_random_module(model, lambda: example.call(model, loss_fn))) from None
            inputs = tensors_in((example.args, example.kwargs))
            grads = dict(zip(params, gradients(loss, list(params.values()), inputs)))
        for name, p in params.items():
            rows[name].append(dense_gradient(grads[name], p).detach())
        losses.append(loss.detach())
    return {n: torch.stack(r) for n, r in rows.items()}, torch.stack(losses)


def loop_grad_stats(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    *,
    randomness: str = "error",
    chunk_size: int | None = None,
    var: bool = True,
    inner_products: bool = False,
    clip_norm: float | None = None,
    progress: Callable[[int], None] | None = None,
    reference: Mapping[str, Tensor] | None = None,
) -> GradStats:
    """:class:`GradStats` from :func:`loop_grads`, reduced ``chunk_size`` examples at a time
    (default :data:`DEFAULT_CHUNK`): peak extra memory O(chunk_size × P + P)."""
    shared_rng = rng_snapshot(model) if randomness == "same" else None
    start = buffer_state(model)

    def grads_fn(chunk: Batch):
        return loop_grads(model, loss_fn, chunk, randomness=randomness, shared_rng=shared_rng, buffers=start)

    return stream_grad_stats(
        grads_fn,
        batch,
        chunk_size or DEFAULT_CHUNK,
        var=var,
        inner_products=inner_products,
        clip_norm=clip_norm,
        progress=progress,
        rng_devices=cuda_devices(model),
        reference=reference,
        replay_rng=randomness != "error",
    )
