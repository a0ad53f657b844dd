"""The ``vmap`` engine: exact per-example gradients for any ``nn.Module``.

For example i with inputs x_i and target y_i, the per-example loss is
L_i(θ) = loss_fn(model(x_i[None]), y_i[None]) and g_i = ∇_θ L_i (unscaled).
The engine evaluates ``vmap(grad(L))`` with ``torch.func.functional_call``:
trainable parameters are the differentiated argument, frozen parameters are
constants, and buffers are passed through as clones (so in-place updates never
reach the model). Recurrent modules are routed through plain-op forwards
(:mod:`persample.engines._rnn`) so that ``vmap`` supports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .._batch import Batch, one_example
from .._model import detached_buffers, translate_vmap_error, trainable_parameters
from ..stats import GradStats
from ._rnn import rnn_modules_as_plain_ops

__all__ = ["per_example_grads", "vmap_grad_stats", "auto_chunk_size"]

LossFn = Callable[..., Tensor]

#: Default gradient budget per chunk: chunk_size × P ≤ this many elements.
CHUNK_ELEMENTS = 1 << 25


def auto_chunk_size(num_params: int, batch_size: int) -> int:
    """Examples per chunk so that one chunk's gradients hold ≤ ``CHUNK_ELEMENTS`` numbers."""
    return max(1, min(batch_size, CHUNK_ELEMENTS // max(num_params, 1)))


def _check_per_example_loss(loss) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            "loss_fn must return a scalar for ONE example: persample calls it on a batch of one, "
            f"loss_fn(model(x_i[None]), y_i[None]), but it returned shape {tuple(loss.shape)}. "
            "Use a reduction such as 'mean' or 'sum' (the PyTorch default 'mean' works as it is), "
            "not reduction='none'.")
    return loss


def example_loss(loss_fn: LossFn, output, target) -> Tensor:
    """L_i = loss_fn(output, target_i[None]) (or ``loss_fn(output)`` without targets) for ONE
    example whose ``output`` is already a batch of one; checked to be a scalar."""
    return _check_per_example_loss(loss_fn(output) if target is None else loss_fn(output, one_example(target)))


def _example_loss_fn(model: nn.Module, loss_fn: LossFn, frozen: dict, buffers: dict):
    """L(trainable, args, kwargs, target) for ONE example, returning (loss, loss) for has_aux."""

    def loss_of_example(trainable, args, kwargs, target):
        out = functional_call(model, (trainable, frozen, buffers), one_example(args), one_example(kwargs))
        loss = example_loss(loss_fn, out, target)
        return loss, loss.detach()

    return loss_of_example


@contextlib.contextmanager
def _engine_context(model: nn.Module) -> Iterator[None]:
    """What every vmap call runs under: no outer graph, vmap-friendly RNNs, clear errors."""
    with torch.no_grad(), rnn_modules_as_plain_ops(model):
        try:
            yield
        except RuntimeError as err:
            clearer = translate_vmap_error(err)
            if clearer is None:
                raise
            raise clearer from err


def _grads_function(model: nn.Module, loss_fn: LossFn, batch: Batch, randomness: str,
                    chunk_size: int | None):
    trainable = {n: p.detach() for n, p in trainable_parameters(model).items()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    loss_of_example = _example_loss_fn(model, loss_fn, frozen, detached_buffers(model))
    target_dim = None if batch.targets is None else 0
    fn = vmap(grad(loss_of_example, has_aux=True), in_dims=(None, 0, 0, target_dim),
              randomness=randomness, chunk_size=chunk_size)
    return lambda b: fn(trainable, b.args, b.kwargs, b.targets)


def per_example_grads(model: nn.Module, loss_fn: LossFn, batch: Batch, *, randomness: str = "error",
                      chunk_size: int | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """Materialised per-example gradients ``{name: [B, *shape]}`` and losses ``[B]``.

    ``chunk_size`` is passed to ``vmap``: it bounds the working memory of the
    computation, not the ``B × P`` result.
    """
    with _engine_context(model):
        grads_fn = _grads_function(model, loss_fn, batch, randomness, chunk_size)
        return grads_fn(batch)


def vmap_grad_stats(model: nn.Module, loss_fn: LossFn, batch: Batch, *, randomness: str = "error",
                    chunk_size: int | None = None, var: bool = True, inner_products: bool = False,
                    clip_norm: float | None = None, progress: Callable[[int], None] | None = None) -> GradStats:
    """:class:`GradStats` streamed over chunks: peak extra memory O(chunk_size × P + P).

    Each chunk's per-example gradients are reduced to statistics and merged
    exactly, then dropped. ``chunk_size=None`` picks :func:`auto_chunk_size`.
    With ``inner_products``, p_i = ⟨g_i, ḡ⟩ needs ḡ first: a batch that spans
    several chunks is streamed twice, the second pass replaying the first
    pass's RNG state so random ops draw the same values.
    ``progress(k)`` is called after each chunk of k examples.
    """
    num_params = sum(p.numel() for p in trainable_parameters(model).values())
    size = chunk_size or auto_chunk_size(num_params, batch.size)
    with _engine_context(model):
        grads_fn = _grads_function(model, loss_fn, batch, randomness, None)
        if inner_products and size >= batch.size:  # one chunk: ḡ is known before reducing
            grads, losses = grads_fn(batch)
            mean = {k: g.mean(0) for k, g in grads.items()}
            stats = GradStats.from_per_example(grads, losses, var=var, reference=mean, clip_norm=clip_norm)
            if progress is not None:
                progress(batch.size)
            return stats
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices, enabled=inner_products):
            stats = _stream(grads_fn, batch, size, var=var, reference=None, clip_norm=clip_norm,
                            progress=progress)
        if not inner_products:
            return stats
        reference = stats.mean
        with_inner = _stream(grads_fn, batch, size, var=False, reference=reference, clip_norm=None,
                             progress=None)
        return dataclasses.replace(stats, inner_products=with_inner.inner_products, reference=reference)


def _stream(grads_fn, batch: Batch, size: int, *, var: bool, reference, clip_norm, progress) -> GradStats:
    parts = []
    for chunk in batch.chunks(size):
        grads, losses = grads_fn(chunk)
        parts.append(GradStats.from_per_example(grads, losses, var=var, reference=reference,
                                                clip_norm=clip_norm))
        del grads
        if progress is not None:
            progress(chunk.size)
    return GradStats.merge_all(parts)
