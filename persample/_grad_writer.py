"""The ``p.grad`` writer of :class:`persample.Tracker`: what ``loss.backward()`` would leave, written so
that it can be undone.

A backward accumulates into ``.grad`` in place and cannot be taken back. The Tracker computes the
increment first (the statistics, or a plain backward of the batch loss), then writes it here,
out of place, so that a step that fails later (a hook that raises, a rank that disagrees) restores
every ``.grad`` as it was:

- :class:`GradSnapshot` records ``p.grad`` of the parameters and ``x.grad`` of the inputs that
  require grad before a step, and puts them back;
- :func:`accumulate_into_grads` adds ``scale · update`` into ``p.grad`` as autograd's
  ``AccumulateGrad`` does (the same dtype; ``None`` stays ``None`` for unreached parameters);
- :func:`add_input_gradients` does the same for ``x.grad``;
- :func:`run_post_accumulate_grad_hooks` then calls each leaf's post-accumulate-grad hooks once,
  in a backward's order.

Nothing here computes a gradient: see :mod:`persample._step_plan`.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ._batch import Batch
from ._torch_compat import post_accumulate_grad_hooks


class GradSnapshot:
    """``.grad`` of the parameters (and of inputs added with :meth:`add_inputs`) as they were, by
    reference: the writer never modifies a ``.grad`` in place, so :meth:`restore` puts back exactly
    what was there.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 1)
    >>> snap = GradSnapshot(dict(lin.named_parameters()))
    >>> accumulate_into_grads(dict(lin.named_parameters()), {"bias": torch.ones(1)})
    >>> snap.restore(); lin.bias.grad is None
    True
    """

    def __init__(self, params: dict[str, nn.Parameter]):
        self._params = [(p, p.grad) for p in params.values()]
        self._inputs: list[tuple[Tensor, Tensor | None]] = []

    def add_inputs(self, inputs: Sequence[Tensor]) -> None:
        """Also record (and restore) ``x.grad`` of these input leaves."""
        self._inputs.extend((x, x.grad) for x in inputs)

    def restore(self) -> None:
        for p, g in self._params:
            p.grad = g
        for x, g in self._inputs:
            x.grad = g


def accumulate_into_grads(params: dict[str, nn.Parameter], update: dict[str, Tensor], *, scale: float = 1.0) -> None:
    """``p.grad += scale * update[name]`` as autograd's AccumulateGrad does, but out of place (so that a
    :class:`GradSnapshot` can undo it); the result never aliases ``update`` (statistics handed to hooks)."""
    for name, g in update.items():
        p = params[name]
        g = g.detach().to(p.dtype)
        g = g * scale if scale != 1.0 else g
        if p.grad is not None:
            p.grad = p.grad + g
        else:
            p.grad = g.clone() if scale == 1.0 else g


def add_input_gradients(inputs: Sequence[Tensor], grads: Sequence[Tensor | None], *, scale: float = 1.0) -> None:
    """``x.grad += scale * g`` for each input leaf that got a gradient, out of place."""
    for x, g in zip(inputs, grads):
        if g is not None:
            x.grad = g * scale if x.grad is None else x.grad + g * scale


def written_leaves(
    params: dict[str, nn.Parameter],
    update: dict[str, Tensor],
    inputs: Sequence[Tensor],
    input_grads: Sequence[Tensor | None],
) -> list[Tensor]:
    """The leaves a backward would have accumulated into, in a backward's order: the parameters the
    loss reaches (last parameters first), then the inputs that got a gradient."""
    return [params[name] for name in reversed(list(update))] + [x for x, g in zip(inputs, input_grads) if g is not None]


def run_post_accumulate_grad_hooks(leaves: Sequence[Tensor]) -> None:
    """Each leaf's post-accumulate-grad hooks (``register_post_accumulate_grad_hook``), in the order
    they were registered, called with the leaf as a backward calls them once it has accumulated
    into its ``.grad``."""
    for leaf in leaves:
        for hook in list((post_accumulate_grad_hooks(leaf) or {}).values()):
            if hook(leaf) is not None:
                raise RuntimeError("Tensor post accumulate grad hooks should return None.")


def leaf_inputs_requiring_grad(batch: Batch) -> list[Tensor]:
    """The batch's input tensors that a backward would give an ``x.grad``."""
    return [t for t in batch.input_leaves if t.requires_grad and t.is_leaf]
