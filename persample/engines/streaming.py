"""Statistics streamed over chunks of materialised per-example gradients.

The ``vmap`` and ``loop`` engines both produce per-example gradients a chunk of
examples at a time; this module reduces each chunk to a :class:`GradStats` and
merges them exactly, so peak extra memory is O(chunk_size × P + P).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch
from torch import Tensor

from .._batch import Batch
from ..stats import GradStats

__all__ = ["GradsFn", "stream_grad_stats"]

#: ``grads_fn(chunk) -> ({name: [b, *shape]}, losses [b])`` for a sub-batch of b examples.
GradsFn = Callable[[Batch], "tuple[dict[str, Tensor], Tensor]"]


def stream_grad_stats(
    grads_fn: GradsFn,
    batch: Batch,
    chunk_size: int,
    *,
    var: bool,
    inner_products: bool,
    clip_norm: float | None,
    progress: Callable[[int], None] | None,
    rng_devices: list[int],
    reference: Mapping[str, Tensor] | None = None,
    replay_rng: bool = True,
) -> GradStats:
    """:class:`GradStats` of ``batch``, ``chunk_size`` examples at a time.

    With ``inner_products``, p_i = ⟨g_i, ḡ⟩ needs ḡ first: a batch that spans
    several chunks is streamed twice, the second pass replaying the first pass's
    RNG state (CPU and ``rng_devices``) so random ops draw the same values.
    With a fixed ``reference`` r, p_i = ⟨g_i, r⟩ in one pass.
    ``progress(k)`` is called after each chunk of k examples of the first pass.
    ``replay_rng=False`` (a model that may not draw, ``randomness="error"``): no replay, so the
    global generators, which other threads share, are never rewound.
    """
    if reference is not None:
        return _stream(
            grads_fn, batch, chunk_size, var=var, reference=reference, clip_norm=clip_norm, progress=progress
        )
    if inner_products and chunk_size >= batch.size:  # one chunk: ḡ is known before reducing
        grads, losses = grads_fn(batch)
        mean = {k: g.mean(0) for k, g in grads.items()}
        stats = GradStats.from_per_example(grads, losses, var=var, reference=mean, clip_norm=clip_norm)
        if progress is not None:
            progress(batch.size)
        return stats
    with torch.random.fork_rng(devices=rng_devices, enabled=inner_products and replay_rng):
        stats = _stream(grads_fn, batch, chunk_size, var=var, reference=None, clip_norm=clip_norm, progress=progress)
    if not inner_products:
        return stats
    reference = stats.mean
    with_inner = _stream(grads_fn, batch, chunk_size, var=False, reference=reference, clip_norm=None, progress=None)
    return dataclasses.replace(stats, inner_products=with_inner.inner_products, reference=reference)


def _stream(grads_fn: GradsFn, batch: Batch, size: int, *, var: bool, reference, clip_norm, progress) -> GradStats:
    parts = []
    for chunk in batch.chunks(size):
        grads, losses = grads_fn(chunk)
        parts.append(GradStats.from_per_example(grads, losses, var=var, reference=reference, clip_norm=clip_norm))
        del grads
        if progress is not None:
            progress(chunk.size)
    return GradStats.merge_all(parts)
