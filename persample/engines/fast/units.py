"""Units of the fast engine, and the calls recorded for them.

A *unit* is a module with a closed-form rule (:mod:`.rules`), or the top-most module that owns parameters but
has no rule (a *fallback* unit, which covers its whole subtree). A :class:`Call` holds one call's inputs, the
autograd edges of its outputs and, once a backward ran, their gradients (:func:`store_grad`,
:func:`add_gradient`).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..._batch import flat_leaves, tensors_in
from ..._model import buffer_slots, own_trainable_parameters
from ...contract import refusal
from .rules import Rule, find_rule


@dataclass(eq=False)
class Call:
    """One call of a unit: its inputs and the gradients of its tensor outputs."""

    args: tuple
    kwargs: dict
    output: Any = None
    out_grads: dict[int, Tensor] = field(default_factory=dict)  # output leaf index → gradient
    broadcast: bool = False  # the input had batch dim 1 (or none: ``args[0]`` got one) and the output was expanded
    batch_dim_ambiguous: bool = False  # the expanded output met a batch-first tensor with another dim of size B
    autocast: Any = None  # autocast settings of a fallback unit's call, to recompute it the same way
    view_versions: dict[int, int] = field(default_factory=dict)  # output leaves that are views → version
    edges: dict[int, Any] = field(default_factory=dict)  # output leaf index → its autograd edge
    input_versions: tuple = ()  # the versions of the input tensors and the unit's parameters, at the call
    changed_buffers: bool = False  # a fallback unit's buffers changed during the forward up to this call
    #: k > 1: a call on a flattened token batch (an MoE layer's ``h.view(-1, d)``): dim 0 of its tensors has
    #: B·k rows, row r of example r // k (:func:`token_rows`); the graph audit's probe checks that map
    rows_per_example: int = 1
    #: a row-wise rule's call on rows gathered from token rows (an expert's ``x[token]``): each row's example
    #: is read off the graph by the probe of the rows (:func:`.audit.rows_leak` sets ``row_examples``: [N]
    #: example indices, −1 for a row no example reaches), and the rule's pieces are segment sums over them
    gathered: bool = False
    row_examples: Tensor | None = None
    place: Any = None  # a .places.Place: where a row-wise rule's input and output hold the batch (not dim 0)
    #: keyword arguments of a whole-call rule's call batched on dim 0 as the model's inputs are (one of them, a
    #: frozen result computed from them: position ids from a cumsum of the padding mask) or activations
    batched_kwargs: tuple = ()
    #: a MultiheadAttention call's recorded projections (:class:`.mha_capture.Projections`), or None; the
    #: gradients of its in-projections' outputs come under keys −1 − i (i: the linear call's index)
    inner: Any = None

    def view_modified_in_place(self) -> bool:
        """Whether an output that is a view was modified in place after the call. Autograd then routes
        that gradient around the view's node (``CopySlices`` on its base), so the hook on the output (or
        its edge) sees none or part of it; the captured gradient would be wrong."""
        leaves = flat_leaves(self.output)
        return any(leaves[i]._version != version for i, version in self.view_versions.items())

    def input_modified_in_place(self, params: Mapping[str, Tensor]) -> bool:
        """Whether an input or one of the unit's ``params`` was modified in place after the call: what
        the engine captured is then not what the module computed with. Autograd's own backward would
        refuse it when it reads a saved tensor whose version moved, but a layer whose gradients the
        engine forms itself need never be gone through by autograd, so the engine must check."""
        return _versions(self.args, self.kwargs, list(params.values())) != self.input_versions


def token_rows(x: Tensor, leaves: list, batch_size: int, from_batch: Callable[[Tensor], bool]) -> int:
    """k > 1 where a call is on a flattened token batch, else 1: its first input ``x`` comes from the batch
    (``from_batch``: an activation or the model's inputs, not a constant) and has B·k rows on dim 0, and every
    tensor in ``leaves`` (the call's other inputs and outputs) with a dim has those B·k rows on dim 0.

    The engine then reads row r as example r // k's (the rows of ``h.view(-1, d)`` for ``h`` of shape
    ``[B, T, d]``, T = k): the segment of rows [b·k, (b+1)·k) is example b's. That map is a claim, not a
    fact: the graph audit's probe (:func:`.audit.rows_leak`) checks it on the call's tensors that require
    grad (the gradient of the even examples' outputs must reach no row of an odd example), and a fallback
    recomputes each segment alone and compares it with the batch's rows (:func:`.engine._token_rows_pieces`).

    >>> h = torch.zeros(3, 6, 4, requires_grad=True).tanh().view(-1, 4)
    >>> token_rows(h, [h[:, :2]], 3, lambda t: True), token_rows(h, [h[:5]], 3, lambda t: True)
    (6, 1)
    """
    if x.dim() == 0 or batch_size < 1:
        return 1
    n = x.shape[0]
    if n <= batch_size or n % batch_size:
        return 1
    if any(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] != n for t in leaves):
        return 1
    return n // batch_size if from_batch(x) else 1


def _versioned_buffer_slots(module: nn.Module) -> list[tuple]:
    """``(owner, name, tensor, version)`` of every buffer in ``module``'s subtree, to tell later whether
    a forward updated one in place or assigned a new tensor."""
    return [(owner, name, t, t._version) for owner, name, t in buffer_slots(module)]


def _buffers_changed(slots: list[tuple]) -> bool:
    return any(owner._buffers.get(name) is not t or t._version != version for owner, name, t, version in slots)


def _versions(*obj) -> tuple:
    return tuple(t._version for t in tensors_in(obj))


@dataclass(eq=False)
class Unit:
    """A module whose parameters' per-example gradients come from one rule or one fallback."""

    name: str
    module: nn.Module
    rule: Rule | None
    params: dict[str, nn.Parameter]  # names relative to ``module``
    calls: list[Call] = field(default_factory=list)


def find_units(model: nn.Module, widened: Collection[nn.Module] = ()) -> list[Unit]:
    """Rule modules, and top-most rule-less modules owning parameters (covering their subtree).

    ``widened``: modules that are fallback units covering their subtree whatever their rules (a
    module whose parameter another module of it uses: :func:`.plan.widen`).

    A TorchScript module (``torch.jit.script`` or ``torch.jit.trace``) anywhere in the model is refused:
    it takes no hooks, runs its submodules' calls inlined where no hook sees them, and cannot be re-run
    with other parameters by ``torch.func``."""
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            raise refusal(
                "TORCHSCRIPT_MODULE",
                f"module {name or '<root>'} is a TorchScript module (torch.jit.script "
                "or torch.jit.trace): the fast engine cannot hook its calls or isolate its layers; the vmap "
                "engine (where torch.func can run it) or the per-example loop runs it as it is "
                "(engine='auto' takes them)",
                module=name or "<root>",
            )
    units: list[Unit] = []
    _add_units("", model, {}, units, frozenset(id(m) for m in widened))
    return units


# Module-level recursions, not closures: a closure that calls itself is a reference cycle, which would
# keep the units (and the activations they capture) alive until the garbage collector runs.
def _add_units(
    prefix: str, module: nn.Module, below: dict[nn.Module, bool], units: list[Unit], widened: frozenset[int]
) -> None:
    if not _trainable_below(module, below):
        return
    if id(module) in widened:  # one fallback for its whole subtree (its calls cover every use of its parameters)
        units.append(Unit(prefix, module, None, {n: p for n, p in module.named_parameters() if p.requires_grad}))
        return
    rule = find_rule(module)
    own = own_trainable_parameters(module)
    if rule is not None or own:
        trainable = (
            own
            if rule is not None and not rule.whole_call  # such a rule module has no trainable nested parameter
            else {n: p for n, p in module.named_parameters() if p.requires_grad}
        )
        units.append(Unit(prefix, module, rule, trainable))
        return
    for child_name, child in module.named_children():
        _add_units(f"{prefix}.{child_name}" if prefix else child_name, child, below, units, widened)


def _trainable_below(module: nn.Module, below: dict[nn.Module, bool]) -> bool:
    """Whether ``module`` or a module below it owns a trainable parameter (memoised in ``below``)."""
    if module not in below:
        below[module] = bool(own_trainable_parameters(module)) or any(
            [_trainable_below(c, below) for c in module.children()]
        )
    return below[module]


def _storage(t: Tensor) -> int | None:
    """The address of ``t``'s storage (views of a tensor share it); None where there is none."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


_PROBE = threading.local()


@contextlib.contextmanager
def probing() -> Iterator[None]:
    """Within the block, a backward is the graph audit's own probe (:func:`.audit.rows_leak`), not the
    batch's: the capture's gradient hooks store nothing and the user's tensor hooks seen in the forward
    do not run (:func:`probe_running` tells them)."""
    _PROBE.depth = getattr(_PROBE, "depth", 0) + 1
    try:
        yield
    finally:
        _PROBE.depth -= 1


def probe_running() -> bool:
    return getattr(_PROBE, "depth", 0) > 0


def store_grad(grads: dict, leaf_index: int):
    """A tensor hook that adds each gradient reaching an output into ``grads[leaf_index]`` (several
    backward passes add up, as in ``p.grad``). It stores into ``grads`` only: referencing the Call
    (and so the output tensor) from a hook on that output would make a cycle through autograd's C++
    hook storage, which Python's garbage collector cannot see, leaking the whole graph."""

    def hook(grad: Tensor) -> None:
        if not probe_running():
            add_gradient(grads, leaf_index, grad)

    return hook


def add_gradient(grads: dict, leaf_index: int, grad: Tensor | None) -> None:
    """``grads[leaf_index] += grad``, as ``p.grad`` adds up backward passes; None (an output that did
    not reach the loss) adds nothing."""
    if grad is not None:
        previous = grads.get(leaf_index)
        grads[leaf_index] = grad if previous is None else previous + grad
