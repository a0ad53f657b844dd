"""Capturing what the fast engine needs during one ordinary forward + backward.

The model is split into *units*: a module with a closed-form rule
(:mod:`.rules`), or the top-most module that owns parameters but has no rule
(a *fallback* unit, which covers its whole subtree). For each call of a unit,
:func:`capturing` records the call's inputs and, through tensor hooks on its
outputs (not ``register_full_backward_hook``, which breaks in-place ops), the
gradients of those outputs. All hooks are removed on exit, also on error.

Before the backward, :func:`audit_graph` walks the autograd graph once:

- every call of a rule module puts exactly one edge into each of its
  parameters' ``AccumulateGrad`` nodes, so any other edge is a use no rule
  sees (say ``x @ self.embed.weight.T`` in a parent's ``forward``);
- transposes, permutes and stacks that move a tensor's dim 0 make a position
  dim of the batch's size ambiguous.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..._model import autocast_state
from ...errors import NotExact
from .rules import Rule, find_rule

__all__ = ["Unit", "Call", "find_units", "capturing", "store_grad", "audit_graph", "outputs_modified_in_place", "GraphAudit", "NotExact"]


@dataclass(eq=False)
class Call:
    """One call of a unit: its inputs and the gradients of its tensor outputs."""

    args: tuple
    kwargs: dict
    output: Any = None
    out_grads: dict[int, Tensor] = field(default_factory=dict)  # output leaf index → gradient
    broadcast: bool = False  # the input had batch dim 1 and the output was expanded to the batch
    autocast: Any = None  # autocast settings of a fallback unit's call, to recompute it the same way
    view_versions: dict[int, int] = field(default_factory=dict)  # output leaves that are views → version
    edges: list = field(default_factory=list)  # autograd edges of the outputs, to backpropagate to them

    def view_modified_in_place(self) -> bool:
        """Whether an output that is a view was modified in place after the call. Autograd then routes
        that gradient around the view's node (``CopySlices`` on its base), so the hook on the output
        sees none or part of it; the captured gradient would be wrong."""
        leaves, _ = tree_flatten(self.output)
        return any(leaves[i]._version != version for i, version in self.view_versions.items())


@dataclass(eq=False)
class Unit:
    """A module whose parameters' per-example gradients come from one rule or one fallback."""

    name: str
    module: nn.Module
    rule: Rule | None
    params: dict[str, nn.Parameter]  # names relative to ``module``
    calls: list[Call] = field(default_factory=list)


def find_units(model: nn.Module) -> list[Unit]:
    """Rule modules, and top-most rule-less modules owning parameters (covering their subtree)."""
    units: list[Unit] = []
    below: dict[nn.Module, bool] = {}

    def trainable_below(module: nn.Module) -> bool:
        if module not in below:
            below[module] = (any(p.requires_grad for p in module.parameters(recurse=False))
                             or any([trainable_below(c) for c in module.children()]))
        return below[module]

    def visit(prefix: str, module: nn.Module) -> None:
        if not trainable_below(module):
            return
        rule = find_rule(module)
        if rule is not None or any(p.requires_grad for p in module.parameters(recurse=False)):
            trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
            units.append(Unit(prefix, module, rule, trainable))
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    return units


# ------------------------------------------------------------------------ broadcast outputs

#: Ops after which a broadcast (expanded) output is the same tensor, values and shape.
_SAME_VALUE_OPS = frozenset({"to", "type_as", "float", "double", "half", "bfloat16", "contiguous"})
#: Elementwise ops whose result is unchanged when a size-1 batch operand is expanded to B.
_BROADCASTING_OPS = frozenset({"add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "mul", "__mul__",
                               "__rmul__", "div", "__truediv__", "__rtruediv__"})


class _BroadcastWatcher(TorchFunctionMode):
    """Checks every use of an output that was expanded from batch size 1 to B.

    Expanding is exact only when the output meets a batch-sized operand in a
    broadcasting elementwise op; any other use is kept in ``escape``.
    """

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        self.expanded: dict[int, Tensor] = {}  # id → tensor (kept alive so ids are not reused)
        self.escape: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.escape is None and isinstance(out, Tensor):
            tensors = [t for t in (*args, *(kwargs or {}).values()) if isinstance(t, Tensor)]
            if any(id(t) in self.expanded for t in tensors):
                self._check(getattr(func, "__name__", str(func)), tensors, out)
        return out

    def _check(self, name: str, tensors: list[Tensor], out: Tensor) -> None:
        if name in _SAME_VALUE_OPS:
            self.expanded[id(out)] = out
            return
        batch_sized_partner = any(id(t) not in self.expanded and t.dim() > 0 and t.shape[0] == self.batch_size
                                  for t in tensors)
        if not (name in _BROADCASTING_OPS and out.dim() > 0 and out.shape[0] == self.batch_size
                and batch_sized_partner):
            self.escape = (f"a module's output broadcast over the batch (input batch dim of size 1) is used "
                           f"by {name}, which may not treat it as a broadcast")


_DIM_MOVING_OPS = frozenset({"transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "permute", "t", "T",
                             "mT", "mH", "adjoint", "stack", "einsum"})


class _DimMoveWatcher(TorchFunctionMode):
    """Notes the first op outside every unit that may move a tensor's dim 0.

    Ops on tensors that require grad show up in the autograd graph; this mode is
    for the rest (raw inputs), and runs only when an input has a non-leading
    dim of the batch's size (otherwise a moved input cannot pass as batch-first).
    """

    def __init__(self, active: list):
        super().__init__()
        self.active = active
        self.moved: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.moved is None and not self.active:
            name = getattr(func, "__name__", "")
            if name in _DIM_MOVING_OPS and _moves_dim_zero_op(name, args, kwargs or {}):
                self.moved = name
        return out


def _moves_dim_zero_op(name: str, args, kwargs) -> bool:
    first = args[0] if args else None
    if name == "einsum":
        spec = first.replace(" ", "") if isinstance(first, str) else ""
        if "->" not in spec:
            return True
        inputs, output = spec.split("->")
        return any(not op or not output or op[0] != output[0] for op in inputs.split(","))
    if name == "stack":
        return kwargs.get("dim", args[1] if len(args) > 1 else 0) in (0,)
    if not isinstance(first, Tensor) or first.dim() == 0:
        return False
    ndim, rest = first.dim(), [*args[1:], *kwargs.values()]
    if name in ("t", "T", "mT", "mH", "adjoint"):
        return ndim == 2
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return bool(dims) and dims[0] % ndim != 0
    flat = [d for r in rest[:2] for d in (r if isinstance(r, (list, tuple)) else (r,))]
    return any(isinstance(d, int) and d % ndim == 0 for d in flat)


@dataclass
class Capture:
    """What :func:`capturing` saw: the broadcast watcher's verdict."""

    watcher: _BroadcastWatcher
    dim_watcher: _DimMoveWatcher | None
    watching: bool = False  # the broadcast watcher is entered (at the first broadcast)
    forward_ended: bool = False  # later calls (activation checkpointing recomputing in backward) are not recorded

    @property
    def escape(self) -> str | None:
        return self.watcher.escape

    @property
    def raw_input_moved(self) -> bool:
        return self.dim_watcher is not None and self.dim_watcher.moved is not None

    def end_forward(self) -> None:
        """Stop watching ops and recording calls (call once the forward and the losses are done)."""
        self.forward_ended = True
        if self.watching:
            self.watching = False
            self.watcher.__exit__(None, None, None)
        if self.dim_watcher is not None and self.dim_watcher.active is not None:
            self.dim_watcher.active = None
            self.dim_watcher.__exit__(None, None, None)


@contextlib.contextmanager
def capturing(units: list[Unit], model: nn.Module, batch_size: int, *,
              watch_dim_moves: bool = False) -> Iterator[Capture]:
    """Record unit calls and output gradients within the block.

    A rule unit called on an input whose dim 0 has size 1 (shared by the batch,
    such as position ids) gets its output expanded to the batch, so that its
    output gradient is per example; from then on a ``TorchFunctionMode``
    checks that the expansion cannot change the result.
    """
    watcher = _BroadcastWatcher(batch_size)
    handles = []
    active: list = []
    dim_watcher = _DimMoveWatcher(active) if watch_dim_moves else None

    def pre_hook(module, args, kwargs):
        active.append(module)

    def post_hook(unit: Unit):
        def hook(module, args, kwargs, output):
            if active:
                active.pop()
            if capture.forward_ended:
                return None
            broadcast = (unit.rule is not None and batch_size > 1 and isinstance(output, Tensor)
                         and args and isinstance(args[0], Tensor) and args[0].dim() > 0 and args[0].shape[0] == 1
                         and output.dim() > 0 and output.shape[0] == 1)
            if broadcast:
                output = output.expand(batch_size, *output.shape[1:])
                watcher.expanded[id(output)] = output
                if not capture.watching:
                    watcher.__enter__()
                    capture.watching = True
            call = Call(args, kwargs, output, broadcast=broadcast,
                        autocast=autocast_state() if unit.rule is None else None)
            unit.calls.append(call)
            leaves, _ = tree_flatten(output)
            for leaf_index, leaf in enumerate(leaves):
                if isinstance(leaf, Tensor) and leaf.requires_grad:
                    leaf.register_hook(store_grad(call.out_grads, leaf_index))
                    call.edges.append(get_gradient_edge(leaf))
                    if leaf._is_view():
                        call.view_versions[leaf_index] = leaf._version
            return output if broadcast else None
        return hook

    capture = Capture(watcher, dim_watcher)
    try:
        for unit in units:
            if dim_watcher is not None:
                handles.append(unit.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(unit.module.register_forward_hook(post_hook(unit), with_kwargs=True))
        if dim_watcher is not None:
            dim_watcher.__enter__()
        yield capture
    finally:
        for h in handles:
            h.remove()
        capture.end_forward()


def store_grad(grads: dict, leaf_index: int):
    """A tensor hook that adds each gradient reaching an output into ``grads[leaf_index]`` (several
    backward passes add up, as in ``p.grad``). It stores into ``grads`` only: referencing the Call
    (and so the output tensor) from a hook on that output would make a cycle through autograd's C++
    hook storage, which Python's garbage collector cannot see, leaking the whole graph."""
    def hook(grad: Tensor) -> None:
        previous = grads.get(leaf_index)
        grads[leaf_index] = grad if previous is None else previous + grad
    return hook


def outputs_modified_in_place(units: list[Unit]) -> str | None:
    """Why the captured output gradients cannot be trusted: a unit's output that is a view was
    modified in place (``y = self.proj(x); y.mul_(2)`` on a 3-D input), or None."""
    for unit in units:
        if any(call.view_modified_in_place() for call in unit.calls):
            return (f"the output of module {unit.name or '<root>'} ({type(unit.module).__name__}) is a view and "
                    "was modified in place after the module returned, which hides its gradient from the "
                    "fast engine's hooks; use an out-of-place op (y = y * 2) or another engine")
    return None


# ---------------------------------------------------------------------------- graph audit

@dataclass(frozen=True)
class GraphAudit:
    """What one walk of the autograd graph found."""

    escape: str | None
    dim_zero_moved: bool


def _signed(value: int) -> int:
    """Saved int64 dims come back as unsigned: map 2**64 - k back to -k."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _moves_dim_zero(node) -> bool:
    """Whether a backward node belongs to an op that moved some activation's dim 0."""
    name = node.name()
    try:
        if name.startswith(("TransposeBackward", "PermuteBackward", "StackBackward")):
            ndim = len(node._input_metadata[0].shape)  # the op's output
            if name.startswith("TransposeBackward"):
                return 0 in (_signed(node._saved_dim0) % ndim, _signed(node._saved_dim1) % ndim)
            if name.startswith("PermuteBackward"):
                return _signed(tuple(node._saved_dims)[0]) % ndim != 0
            return _signed(node._saved_dim) % ndim == 0
        if name.startswith("TBackward"):  # .t() of a 2-D activation (not of a weight)
            return not all(hasattr(nxt, "variable") for nxt, _ in node.next_functions if nxt is not None)
    except (AttributeError, IndexError, ZeroDivisionError):
        return True
    return False


def _fallback_internals(units: list[Unit]) -> set:
    """Backward nodes created inside fallback calls: reachable from a call's outputs before its inputs."""
    inside: set = set()
    for unit in units:
        if unit.rule is not None:
            continue
        for call in unit.calls:
            inputs = {t.grad_fn for t in tree_flatten((call.args, call.kwargs))[0]
                      if isinstance(t, Tensor) and t.grad_fn is not None}
            stack = [t.grad_fn for t in tree_flatten(call.output)[0] if isinstance(t, Tensor)]
            while stack:
                node = stack.pop()
                if node is None or node in inside or node in inputs:
                    continue
                inside.add(node)
                stack.extend(nxt for nxt, _ in node.next_functions)
    return inside


def audit_graph(root: Tensor | list[Tensor], units: list[Unit], names: dict[int, str]) -> GraphAudit:
    """Walk the graph of ``root`` once: parameter uses per ``AccumulateGrad`` and dim-0 moves.

    Dim-0 moves inside fallback modules (an RNN or attention going time-major
    internally) do not count: those modules are handled as a whole.
    """
    seen, uses, moved = set(), {}, False
    internal = _fallback_internals(units)
    stack = [t.grad_fn for t in (root if isinstance(root, (list, tuple)) else [root])]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        moved = moved or (node not in internal and _moves_dim_zero(node))
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)
            if variable is not None:
                uses[id(variable)] = uses.get(id(variable), 0) + 1
            stack.append(nxt)
    expected: dict[int, int] = {}
    skip: set[int] = set()
    for unit in units:
        reached = sum(1 for call in unit.calls if _reached(call, seen))
        for p in unit.params.values():
            if unit.rule is None:
                skip.add(id(p))  # fallback units: checked by their sum against autograd instead
            expected[id(p)] = expected.get(id(p), 0) + reached
    for pid, count in uses.items():
        if pid in skip or pid not in names:
            continue
        if count != expected.get(pid, 0):
            return GraphAudit(f"parameter {names[pid]!r} is used {count} time(s) in the graph but its module(s) "
                              f"were called {expected.get(pid, 0)} time(s): it is used outside the module that "
                              "owns it", moved)
    return GraphAudit(None, moved)


def _reached(call: Call, seen: set) -> bool:
    leaves, _ = tree_flatten(call.output)
    return any(isinstance(t, Tensor) and t.grad_fn is not None and t.grad_fn in seen for t in leaves)
