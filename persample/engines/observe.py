"""Statistics from the user's own ``loss.backward()``: the fast engine without a second pass.

Inside :func:`observing`, the user's forward and backward run unchanged while
the fast engine's hooks record each unit's inputs and output gradients. The
gradients are of the user's loss ℓ, so they are rescaled by s = B for a
declared ``reduction="mean"`` (ℓ = (1/B) Σ_i L_i) or s = 1 for ``"sum"``.

A wrong declaration must not give silently wrong statistics, and comparing
with ``p.grad`` alone cannot reveal it (every statistic scales consistently).
So two checks run after the backward:

1. **Reduction**: the gradient of ℓ at the model's output, times s, must equal
   ∇_o L_i for every example: one gradient of Σ_i L_i at the detached output
   (cheap: only the loss is redone, in closed form for standard losses).
2. **p.grad**: Σ_i g_i from the captured pieces must equal s times the increment
   of ``p.grad`` made by this backward; a loss with terms that are not
   per-example losses (a regulariser, a parameter used in the loss) fails here.
   Compared through random probes (:func:`.fast.means_that_differ`), at the
   cost of the activations rather than of another weight gradient.

Either failure raises :class:`ObservationError`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._model import autocast_as, trainable_parameters
from ..errors import NotExact, ObservationError
from ..stats import GradStats
from .capture import audit_graph, capturing, find_units, store_grad
from .fast import _pieces_by_parameter, output_leaves, per_example_losses, means_that_differ, reduce_pieces
from .rules import Layout

__all__ = ["observing", "Observation", "ObservationError", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")


@dataclass
class Observation:
    """Filled in when the ``with`` block exits: ``stats`` (None until then)."""

    stats: GradStats | None = None
    _output: Any = None
    _output_grads: dict = field(default_factory=dict)
    _audit: Any = None


@contextlib.contextmanager
def observing(model: nn.Module, loss_fn: Callable[..., Tensor], targets: Any, *, batch_size: int,
              reduction: str = "mean", var: bool = True, inner_products: bool = False) -> Iterator[Observation]:
    """Capture one forward + ``loss.backward()`` of ``model`` and build its GradStats on exit."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    params = trainable_parameters(model)
    before = {n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()}
    units = find_units(model)
    observation = Observation()
    names = {id(p): n for n, p in params.items()}

    def root_hook(module, args, output):
        observation._output = output
        leaves, _ = tree_flatten(output)
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor) and leaf.requires_grad:
                leaf.register_hook(store_grad(observation._output_grads, i))
        roots = [t for t in leaves if isinstance(t, Tensor) and t.grad_fn is not None]
        observation._audit = audit_graph(roots, units, names)

    handle = model.register_forward_hook(root_hook)
    try:
        with capturing(units, model, batch_size) as capture:
            yield observation
            capture.end_forward()
            if capture.escape is not None:
                raise NotExact(capture.escape)
    finally:
        handle.remove()
    with autocast_as(None):  # statistics in float32 or better, whatever the loop's autocast
        observation.stats = _observed_stats(observation, params, before, units, loss_fn, targets, batch_size,
                                            reduction, var, inner_products)


def _observed_stats(observation: Observation, params, before, units, loss_fn, targets, batch_size,
                    reduction, var, inner_products) -> GradStats:
    if observation._output is None or not observation._output_grads:
        raise ObservationError("no forward of the model reached a backward inside the block: run "
                               "`loss_fn(model(inputs), targets).backward()` inside `with tracker.observe(...)`")
    if observation._audit.escape is not None:
        raise NotExact(observation._audit.escape)
    scale = float(batch_size) if reduction == "mean" else 1.0
    losses = _check_reduction(observation, loss_fn, targets, batch_size, scale, reduction)
    means = {name: _mean_from_increment(p, before[name], scale / batch_size) for name, p in params.items()}
    layout = Layout(batch_size, dim_zero_moved=observation._audit.dim_zero_moved, grad_scale=scale)
    pieces = _pieces_by_parameter(units, params, means, layout)
    _check_against_grad(pieces, means)
    return reduce_pieces(pieces, means, losses, var=var, inner_products=inner_products, clip_norm=None)


def _mean_from_increment(p: nn.Parameter, before: Tensor | None, factor: float) -> Tensor:
    """factor · (p.grad − before), a new tensor (statistics must not alias ``p.grad``)."""
    if p.grad is None:
        return torch.zeros_like(p)
    increment = p.grad.detach().clone() if before is None else p.grad.detach() - before
    return increment.mul_(factor) if factor != 1.0 else increment


def _check_reduction(observation: Observation, loss_fn, targets, batch_size: int, scale: float,
                     reduction: str) -> Tensor:
    """Per-example losses, after checking s·∂ℓ/∂o == ∇_o L_i for every example."""
    leaves, spec, batched = output_leaves(observation._output, batch_size)
    differentiable = [i for i, t in enumerate(leaves) if i in observation._output_grads and batched[i]]
    detached = [t.detach().requires_grad_(i in differentiable) if isinstance(t, Tensor) else t
                for i, t in enumerate(leaves)]
    with torch.enable_grad():
        losses = per_example_losses(loss_fn, tree_unflatten(detached, spec), targets, batch_size)
        grads = torch.autograd.grad(losses.sum(), [detached[i] for i in differentiable], allow_unused=True)
    grads = [torch.zeros_like(detached[i]) if g is None else g for i, g in zip(differentiable, grads)]
    for i, per_example in zip(differentiable, grads):
        observed = observation._output_grads[i] * scale
        err = (observed - per_example).abs().max().item()
        size = per_example.abs().max().item()
        if err > 1e-3 * max(size, 1e-12):
            ratio = (observed * per_example).sum().item() / max(per_example.pow(2).sum().item(), 1e-30)
            hint = f"observed / expected ≈ {ratio:.4g}"
            if abs(ratio - batch_size) < 0.05 * batch_size:
                hint += ", as if the loss were summed: reduction='sum'?"
            elif abs(ratio * batch_size - 1) < 0.05:
                hint += ", as if the loss were averaged: reduction='mean'?"
            raise ObservationError(
                f"the loss's gradient at the model output does not match reduction={reduction!r} of the "
                f"per-example losses loss_fn(output_i, target_i) ({hint}); the statistics would be wrong. "
                "Declare the reduction the loss really uses, or pass the targets that the loss uses.")
    return losses.detach()


def _check_against_grad(pieces, means) -> None:
    differing = means_that_differ(pieces, means, float64_rtol=1e-6)
    if differing:
        raise ObservationError(
            f"per-example gradients of {differing[0]!r} do not add up to the change in its p.grad: the loss "
            "has terms that are not per-example losses of the model's output (a regulariser, say), "
            "or another backward ran inside the block")
