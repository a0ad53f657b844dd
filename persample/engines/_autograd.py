"""Gradients as every engine and the Tracker take them from autograd.

- :func:`gradients`: ∇ of a loss without touching ``.grad``, also under
  re-entrant activation checkpointing (which refuses ``autograd.grad``);
- :func:`dense_gradient`: zeros for unused parameters, dense for sparse ones.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["gradients", "is_reentrant_checkpoint_error", "dense_gradient"]


def gradients(loss: Tensor, wrt: Sequence[Tensor], also_restore: Sequence[Tensor] = ()) -> list[Tensor | None]:
    """∇ ``loss`` for every tensor of ``wrt`` (None where unused), without touching any ``.grad``.

    ``torch.autograd.grad`` where it can; re-entrant activation checkpointing
    (``checkpoint(..., use_reentrant=True)``) refuses it, and then ``backward()``
    runs into emptied ``.grad`` slots of ``wrt`` that are restored afterwards,
    as are those of ``also_restore`` (other leaves the backward reaches, such as
    inputs that require grad).
    """
    try:  # the graph is retained in case checkpointing refuses midway, having freed part of it
        return list(torch.autograd.grad(loss, list(wrt), allow_unused=True, retain_graph=True))
    except RuntimeError as err:
        if not is_reentrant_checkpoint_error(err):
            raise
    if any(getattr(t, "_post_accumulate_grad_hooks", None) for t in wrt):
        raise RuntimeError(
            "a parameter has a post-accumulate-grad hook, and re-entrant checkpointing needs backward(), "
            "which would run it once per example: use checkpoint(..., use_reentrant=False)")
    leaves = list({id(t): t for t in [*wrt, *also_restore] if t.requires_grad}.values())
    saved = [t.grad for t in leaves]
    try:
        for t in leaves:
            t.grad = None
        loss.backward()
        return [t.grad for t in wrt]
    finally:
        for t, g in zip(leaves, saved):
            t.grad = g


def is_reentrant_checkpoint_error(err: BaseException) -> bool:
    """Whether ``err`` is re-entrant checkpointing refusing ``autograd.grad`` (worded per torch version)."""
    text = str(err)
    return isinstance(err, RuntimeError) and "heckpoint" in text and ".grad()" in text


def dense_gradient(g: Tensor | None, p: Tensor) -> Tensor:
    """A gradient as a dense tensor: zeros for an unused parameter, densified when sparse
    (``nn.Embedding(sparse=True)``)."""
    if g is None:
        return torch.zeros_like(p)
    return g.to_dense() if g.is_sparse else g
