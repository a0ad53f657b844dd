"""Gradients as every engine and the Tracker take them from autograd.

- :func:`gradients`: ∇ of a loss without touching ``.grad`` or running
  post-accumulate-grad hooks, also under re-entrant activation checkpointing
  (which refuses ``autograd.grad``);
- :func:`dense_gradient`: zeros for unused parameters, dense for sparse ones.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import Tensor

from .._torch_compat import post_accumulate_grad_hooks, set_post_accumulate_grad_hooks

__all__ = [
    "gradients",
    "fresh_grad_slots",
    "graph_leaves",
    "is_reentrant_checkpoint_node",
    "is_reentrant_checkpoint_error",
    "dense_gradient",
]


def gradients(loss: Tensor, wrt: Sequence[Tensor], also_restore: Sequence[Tensor] = ()) -> list[Tensor | None]:
    """∇ ``loss`` for every tensor of ``wrt`` (None where unused), without touching any ``.grad``
    and without running any post-accumulate-grad hook.

    ``torch.autograd.grad`` where it can; re-entrant activation checkpointing
    (``checkpoint(..., use_reentrant=True)``) refuses it, and then ``backward()``
    runs into emptied ``.grad`` slots, restored afterwards, of the leaves it
    reaches: ``wrt``, the leaves of ``also_restore`` and those the graph shows
    (inputs that require grad, behind the views a per-example slice makes).
    Their post-accumulate-grad hooks are held back meanwhile: this backward is
    not a training step's (:class:`persample.Tracker` runs them once per step).
    """
    try:  # the graph is retained in case checkpointing refuses midway, having freed part of it
        return list(torch.autograd.grad(loss, list(wrt), allow_unused=True, retain_graph=True))
    except RuntimeError as err:
        if not is_reentrant_checkpoint_error(err):
            raise
    leaves = [*wrt, *also_restore, *graph_leaves([loss])[0]]
    with fresh_grad_slots(leaves):
        loss.backward()
        return [t.grad for t in wrt]


class fresh_grad_slots(contextlib.AbstractContextManager):
    """Within the block, a backward accumulates into emptied ``.grad`` slots of ``leaves`` (those that are
    leaves and require grad), whose post-accumulate-grad hooks are held back; on exit every slot gets its
    ``.grad`` back and every hook registry its hooks, also when the block raised.

    ``add(more)``: empty more slots the same way (leaves that only a backward shows: re-entrant
    checkpointing builds its block's graph in the backward); a leaf already held is left as it is."""

    def __init__(self, leaves: Sequence[Tensor]):
        self._held: dict[int, tuple[Tensor, Tensor | None, dict | None]] = {}
        self._initial = leaves

    def __enter__(self) -> "fresh_grad_slots":
        try:
            self.add(self._initial)
        except BaseException:
            self._restore()
            raise
        return self

    def add(self, leaves: Sequence[Tensor]) -> None:
        for t in leaves:
            if not (t.is_leaf and t.requires_grad) or id(t) in self._held:
                continue
            hooks = post_accumulate_grad_hooks(t)
            self._held[id(t)] = (t, t.grad, hooks)
            t.grad = None
            if hooks:
                set_post_accumulate_grad_hooks(t, None)  # the user's dict stays as it is, handles too

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for t, grad, hooks in self._held.values():
            if hooks:
                set_post_accumulate_grad_hooks(t, hooks)
            t.grad = grad
        self._held.clear()


def graph_leaves(roots: Sequence[Tensor]) -> tuple[list[Tensor], bool]:
    """(the leaf tensors whose ``.grad`` a backward from ``roots`` accumulates into, as far as the graph
    shows them before the backward; whether re-entrant checkpointing hides more: it builds its part
    of the graph only during the backward)."""
    found = [t for t in roots if t.grad_fn is None and t.requires_grad]
    stack, seen, hidden = [t.grad_fn for t in roots if t.grad_fn is not None], set(), False
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        hidden = hidden or is_reentrant_checkpoint_node(node)
        if (variable := getattr(node, "variable", None)) is not None:  # an AccumulateGrad node
            found.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return found, hidden


def is_reentrant_checkpoint_node(node) -> bool:
    """Whether a backward node is re-entrant checkpointing's (``checkpoint(..., use_reentrant=True)``),
    behind which the checkpointed layers' graph exists only during the backward."""
    return type(node).__name__.startswith("CheckpointFunctionBackward")


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
