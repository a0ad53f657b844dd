"""The fast engine's backward, split at recurrent layers whose closed form gives their input gradient.

A recurrent layer's closed form (:mod:`.recurrent`) back-propagates through time
itself, for every example; summed over examples, its δ_x W_ih of layer 0 is the
gradient at the layer's input. Autograd's own backward through the layer
(oneDNN's or cuDNN's RNN kernel, often the costliest node of the step) then only
repeats that work. So for a *cut* call the engine asks autograd twice:

1. from the mean loss, for every parameter and captured output edge that the loss
   reaches without passing through a cut call: the cut calls' output gradients
   among them. Autograd never runs the recurrent node: nothing it feeds is asked for;
2. from the cut calls' inputs, with the closed form's input gradients as
   cotangents, for everything below them.

Each parameter and edge is asked for once, in the phase that reaches it, so the
two phases add up to the single backward's gradients. A call is cut only where
this split is exact, as read off the autograd graph before the backward:

- its unit runs a cell the closed form covers (:func:`.recurrent.recurrent_mode`),
  and every call of the unit has the covered form, with only the sequence
  needing a gradient (:func:`.recurrent.cuttable_call`);
- the unit's parameters are reached only through the nodes its calls created:
  their means then come from the closed form alone (``Σ_i g_i / B``), where a
  rule-less unit's are otherwise checked against autograd's;
- nothing below a cut call's input is reached from the loss by another path, and
  no cut call lies below another.

If the closed form then turns down a call after all (its output gradients are not
of the covered form), :func:`backward` asks autograd for everything left from the
loss, and the unit is a plain fallback unit again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from ..._batch import tensors_in
from .units import Call, Unit, add_gradient
from .pieces import Piece
from .recurrent import cuttable_call

__all__ = ["Cut", "plan_cuts", "backward"]


@dataclass(eq=False)
class Cut:
    """One unit whose calls' backward comes from the closed form; ``below``: the graph under their inputs."""

    unit: Unit
    mode: str
    below: set = field(default_factory=set)
    pieces: list[dict[str, Piece]] = field(default_factory=list)  # per call, once computed


def plan_cuts(units: list[Unit], modes: dict[int, str], root: Tensor) -> list[Cut]:
    """The units whose backward can be cut exactly (see the module docstring), given ``modes``:
    ``{id(unit): cell}`` for the rule-less units the closed form covers."""
    cuts = [
        Cut(unit, modes[id(unit)])
        for unit in units
        if id(unit) in modes and unit.calls and all(cuttable_call(unit, call) for call in unit.calls)
    ]
    for cut in cuts:
        cut.below = _reachable(_input_nodes(cut.unit), stop=set())
    outputs = {node for cut in cuts for node in _output_nodes(cut.unit)}
    cuts = [cut for cut in cuts if not cut.below & outputs]  # of stacked layers, the lowest is cut
    while cuts:
        outputs = {node for cut in cuts for node in _output_nodes(cut.unit)}
        params = {_accumulator(p): cut for cut in cuts for p in cut.unit.params.values()}
        reached = _reachable([root.grad_fn], stop=outputs)
        outside_users = {
            id(params[nxt])
            for node in reached.union(*(cut.below for cut in cuts))
            for nxt, _ in node.next_functions
            if nxt in params
        }
        exact = [cut for cut in cuts if id(cut) not in outside_users and not cut.below & reached]
        if len(exact) == len(cuts):
            return cuts
        cuts = exact
    return []


def backward(
    mean_loss: Tensor, inputs: list, cuts: list[Cut], closed_form: Callable[[Cut, Call, bool], tuple | None]
) -> tuple[list, list[Cut]]:
    """autograd's gradient of ``mean_loss`` for every input (parameters or edges; None where unused),
    with the backward through the ``cuts`` replaced by their closed forms; and the cuts that held
    (their units' parameters, if among ``inputs``, then get None: their means are the pieces' sums).

    ``closed_form(cut, call, input_grad)`` gives (pieces, gradient at the call's input or None) once
    the call's output gradients are in, or None where it turns the call down: then all cuts are off,
    and everything not yet computed is asked of autograd from the loss. ``inputs`` must include the
    edges of the cut calls' outputs; their gradients are added to the calls (``Call.out_grads``).
    """
    if not cuts:
        return list(_grad(mean_loss, inputs)), []
    below = set().union(*(cut.below for cut in cuts))
    inside = {_accumulator(p) for p in _all_params(cuts)}
    nodes = [_node(t) for t in inputs]
    later = [i for i, node in enumerate(nodes) if node in below]
    skipped = [i for i, node in enumerate(nodes) if node in inside]
    first = [i for i, node in enumerate(nodes) if node not in below and node not in inside]
    grads = [None] * len(inputs)
    _fill(grads, first, _grad(mean_loss, [inputs[i] for i in first], retain_graph=True))
    _deliver_output_grads(inputs, grads, cuts)
    roots, cotangents = [], []
    for cut in cuts:
        for call in cut.unit.calls:
            x = call.args[0]
            found = closed_form(cut, call, bool(later) and x.requires_grad)
            if found is None:
                rest = later + skipped
                _fill(grads, rest, _grad(mean_loss, [inputs[i] for i in rest]))
                return grads, []
            pieces, d_x = found
            cut.pieces.append(pieces)
            if d_x is not None:
                roots.append(x)
                cotangents.append(d_x)
    if later and roots:
        _fill(grads, later, torch.autograd.grad(roots, [inputs[i] for i in later], cotangents, allow_unused=True))
    return grads, cuts


def _fill(grads: list, positions: list[int], values) -> None:
    for i, g in zip(positions, values):
        grads[i] = g


def _grad(root: Tensor, inputs: list, retain_graph: bool = False) -> tuple:
    return torch.autograd.grad(root, inputs, allow_unused=True, retain_graph=retain_graph) if inputs else ()


def _deliver_output_grads(inputs: list, grads: list, cuts: list[Cut]) -> None:
    """The cut calls' output gradients, from the first phase's answers for their edges."""
    position = {id(edge): i for i, edge in enumerate(inputs)}
    for cut in cuts:
        for call in cut.unit.calls:
            for leaf_index, edge in call.edges.items():
                add_gradient(call.out_grads, leaf_index, grads[position[id(edge)]])


def _all_params(cuts: list[Cut]) -> list:
    return [p for cut in cuts for p in cut.unit.params.values()]


def _node(t):
    """The autograd node an input of ``torch.autograd.grad`` stands for (its accumulator, for a leaf)."""
    return t.node if not isinstance(t, Tensor) else _accumulator(t)


def _accumulator(t: Tensor):
    return get_gradient_edge(t).node


def _input_nodes(unit: Unit) -> list:
    """The nodes of the calls' sequence inputs that need a gradient."""
    return [get_gradient_edge(call.args[0]).node for call in unit.calls if call.args[0].requires_grad]


def _output_nodes(unit: Unit) -> set:
    return {t.grad_fn for call in unit.calls for t in tensors_in(call.output) if t.grad_fn is not None}


def _reachable(starts: list, stop: set) -> set:
    """Nodes reachable from ``starts`` without entering those in ``stop``."""
    seen: set = set()
    stack = [node for node in starts if node is not None and node not in stop]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None and nxt not in stop)
    return seen
