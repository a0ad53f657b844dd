"""Capturing what the fast engine needs during one ordinary forward + backward.

The model is split into *units*: a module with a closed-form rule
(:mod:`.rules`), or the top-most module that owns parameters but has no rule
(a *fallback* unit, which covers its whole subtree). For each call of a unit,
:func:`capturing` records the call's inputs and the autograd edges of its
outputs; the gradients of those outputs come from asking autograd for the edges
(the fast engine's own backward) or from tensor hooks on the outputs (a training
loop's ``loss.backward()``; not ``register_full_backward_hook``, which breaks
in-place ops). All hooks are removed on exit, also on error.

A rule module called on an input without a batch dim, or with one of size 1
(``self.pos(torch.arange(T))``, ``position_ids[None]``), has its output
expanded to the batch so that its output gradient is per example; a
``TorchFunctionMode`` (:class:`_BroadcastWatcher`) checks that every use of the
expansion is a broadcast that cannot change any value of the forward, and
computes any other use on the original output (so the forward is unchanged
either way, and the engine then refuses). Outputs whose dim 0 has the batch's
size by coincidence (``arange(T)`` with T == B) are watched for uses that
treat dim 0 as a position.

Before the backward, :func:`audit_graph` walks the autograd graph once:

- every call of a rule module puts exactly one edge into each of its
  parameters' ``AccumulateGrad`` nodes, so any other edge is a use no rule
  sees (say ``x @ self.embed.weight.T`` in a parent's ``forward``);
- transposes, permutes and stacks that move a tensor's dim 0 make a position
  dim of the batch's size ambiguous, and so an expansion that met a tensor with
  another dim of the batch's size.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

from ..._batch import flat_leaves, tensors_in
from ..._model import autocast_state, buffer_slots, own_trainable_parameters, random_call
from ..._sharding import fsdp2_sharded_slots, sharding_of
from ..._torch_compat import torch_function_mode_stack
from ...contract import Finding, refusal
from ...errors import NotExact
from .._autograd import is_reentrant_checkpoint_node
from .rules import Rule, find_rule

__all__ = [
    "Unit",
    "Call",
    "find_units",
    "capturing",
    "store_grad",
    "audit_graph",
    "modified_in_place",
    "GraphAudit",
    "NotExact",
]


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


def find_units(model: nn.Module) -> list[Unit]:
    """Rule modules, and top-most rule-less modules owning parameters (covering their subtree).

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
    _add_units("", model, {}, units)
    return units


# Module-level recursions, not closures: a closure that calls itself is a reference cycle, which would
# keep the units (and the activations they capture) alive until the garbage collector runs.
def _add_units(prefix: str, module: nn.Module, below: dict[nn.Module, bool], units: list[Unit]) -> None:
    if not _trainable_below(module, below):
        return
    rule = find_rule(module)
    own = own_trainable_parameters(module)
    if rule is not None or own:
        trainable = (
            own
            if rule is not None  # a rule module has no trainable nested parameter
            else {n: p for n, p in module.named_parameters() if p.requires_grad}
        )
        units.append(Unit(prefix, module, rule, trainable))
        return
    for child_name, child in module.named_children():
        _add_units(f"{prefix}.{child_name}" if prefix else child_name, child, below, units)


def _trainable_below(module: nn.Module, below: dict[nn.Module, bool]) -> bool:
    """Whether ``module`` or a module below it owns a trainable parameter (memoised in ``below``)."""
    if module not in below:
        below[module] = bool(own_trainable_parameters(module)) or any(
            [_trainable_below(c, below) for c in module.children()]
        )
    return below[module]


# ------------------------------------------------------------------------ broadcast outputs

#: Ops whose result on an expansion is the expansion of their result on the original: casts, copies and
#: elementwise functions of one tensor (with number arguments only).
_SAME_VALUE_OPS = frozenset(
    {
        "to",
        "type_as",
        "float",
        "double",
        "half",
        "bfloat16",
        "contiguous",
        "clone",
        "relu",
        "gelu",
        "silu",
        "tanh",
        "sigmoid",
        "exp",
        "log",
        "neg",
        "__neg__",
        "abs",
        "square",
        "sqrt",
        "rsqrt",
        "sin",
        "cos",
        "softplus",
        "elu",
        "leaky_relu",
        "clamp",
    }
)
#: Elementwise ops with NumPy broadcasting: replacing an operand by its expansion along dim 0 leaves
#: the result's values unchanged whenever it leaves the result's shape unchanged.
_BROADCASTING_OPS = frozenset(
    {
        "add",
        "__add__",
        "__radd__",
        "sub",
        "__sub__",
        "__rsub__",
        "mul",
        "__mul__",
        "__rmul__",
        "div",
        "__truediv__",
        "__rtruediv__",
        "pow",
        "__pow__",
        "__rpow__",
        "maximum",
        "minimum",
    }
)
#: Their in-place forms (``embeddings += position_embeddings``); the tensor written to must not be expanded.
_IN_PLACE_BROADCASTING_OPS = frozenset(
    {"add_", "__iadd__", "sub_", "__isub__", "mul_", "__imul__", "div_", "__itruediv__"}
)


@dataclass(eq=False)
class _Expansion:
    """``tensor`` is ``original`` broadcast to the batch along dim 0 (a new dim, or one of size 1)."""

    tensor: Tensor
    original: Tensor
    label: str  # "module pos (its input of shape (5,) has no batch dim ...)", for messages
    calls: tuple  # the rule calls it comes from


def _op_name(func) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a property: Tensor.T, Tensor.shape, ...
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name or str(func)


def _operands(args, kwargs) -> list[Tensor]:
    """The tensors among the arguments, also inside lists and tuples (``torch.cat([a, b])``)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, Tensor))
    return found


def _no_dropout(args, kwargs) -> bool:
    """Whether ``F.dropout(input, p, training, inplace)`` is the identity (p = 0 or not training)."""
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    training = args[2] if len(args) > 2 else kwargs.get("training", True)
    inplace = args[3] if len(args) > 3 else kwargs.get("inplace", False)
    return not inplace and (not training or p == 0)


def _is_expansion_of(shape, original, batch_size: int) -> bool:
    """Whether ``shape`` is ``original`` broadcast to the batch along dim 0 (a new dim, or one of size 1)."""
    shape, original = tuple(shape), tuple(original)
    if not shape or shape[0] != batch_size:
        return False
    return shape[1:] == original or (len(original) == len(shape) and original[0] == 1 and shape[1:] == original[1:])


class _BroadcastWatcher(TorchFunctionMode):
    """Keeps expanded outputs exact, and watches outputs whose batch dim is in doubt.

    A rule module's output is *expanded* to the batch when its input has a batch
    dim of size 1 or none (position ids, ``torch.arange(T)``), so that its output
    gradient is per example. The expansion is exact only where it cannot change
    any value of the forward: when it meets a tensor batched on dim 0 in a
    broadcasting elementwise op whose result keeps its shape (and the expanded
    dim 0 lines up with that result's dim 0), or when a cast or an elementwise
    op with tensors that do not reach dim 0 gives another expansion. Every other
    use is kept in ``escape`` and computed on the original output, so the
    forward (the user's own, under ``Tracker.observe``) is unchanged either way;
    non-tensor results (``.shape``, ``len``) also come from the original.

    A *suspect* output comes from an input whose dim 0 has the batch's size but
    which comes neither from the model's inputs nor from a differentiable
    activation (a constant such as ``torch.arange(T)`` with T == B, a frozen
    layer's output): its dim 0 may be a position. Uses that would treat dim 0
    as something other than the batch go to ``escape``: an op with a tensor of
    more dims (a broadcast), an op that moves dim 0, a product that contracts
    it (``w @ table``, ``F.linear`` with it as the weight), a result whose dim
    0 is 1 or that may have gained leading dims. Differentiable results are
    watched in turn (full reductions, such as a loss, and results without
    gradient are not); ops inside rule-less modules are theirs (vmapped alone
    over dim 0 and checked by their sum, as the graph audit treats them).
    """

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        self.expanded: dict[int, _Expansion] = {}  # id → expansion (holding the tensor, so ids are not reused)
        self.suspects: dict[int, tuple] = {}  # id → (weak reference, label)
        self.escape: Finding | None = None
        self.ambiguous: list[str] = []  # expansions met by batch-first tensors with another dim of size B
        self.paused = 0  # inside rule modules called on an expansion
        self.in_fallback = 0  # inside rule-less modules, handled as a whole (their own dim-0 moves are theirs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = _operands(args, kwargs)
        expansions = [self.expanded[id(t)] for t in operands if id(t) in self.expanded]
        out = self._use_expanded(func, args, kwargs, operands, expansions) if expansions else func(*args, **kwargs)
        if self.suspects:
            watched = [t for t in operands if id(t) in self.suspects]
            if watched:
                self._follow_suspects(_op_name(func), args, kwargs, operands, watched, out)
        return out

    # -------------------------------------------------------------- expansions
    def watch_expansion(self, tensor: Tensor, original: Tensor, label: str, call: Call) -> None:
        self.expanded[id(tensor)] = _Expansion(tensor, original, label, (call,))

    def _originals(self, value):
        """``value`` (args, kwargs, or one argument) with every expanded tensor replaced by its original."""
        if isinstance(value, Tensor):
            entry = self.expanded.get(id(value))
            return entry.original if entry is not None else value
        if isinstance(value, dict):
            return {k: self._originals(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._originals(v) for v in value)
        return value

    def _original_result(self, func, args, kwargs):
        return func(*self._originals(args), **self._originals(kwargs))

    def _escape(self, expansions: list[_Expansion], what: str) -> None:
        if self.escape is None:
            self.escape = Finding("EXPANSION_ESCAPES", f"{expansions[0].label}; {what}")

    def _use_expanded(self, func, args, kwargs, operands: list[Tensor], expansions: list[_Expansion]):
        name = _op_name(func)
        if self.paused:  # inside a rule module that computes row by row (see capturing)
            return func(*args, **kwargs)
        same_value = name in _SAME_VALUE_OPS or (name == "dropout" and _no_dropout(args, kwargs))
        if same_value and args and id(args[0]) in self.expanded and (len(operands) == 1 or name == "type_as"):
            return self._derived(func(*args, **kwargs), self._original_result(func, args, kwargs), expansions, name)
        in_place = name in _IN_PLACE_BROADCASTING_OPS and not (args and id(args[0]) in self.expanded)
        if name in _BROADCASTING_OPS or in_place:
            verdict = self._broadcast_verdict(name, operands)
            if verdict == "batched":
                return func(*args, **kwargs)
            if verdict == "expanded" and not in_place:
                return self._derived(func(*args, **kwargs), self._original_result(func, args, kwargs), expansions, name)
            self._escape(
                expansions,
                verdict if verdict != "expanded" else f"{name} writes into a tensor that is not batched on dim 0",
            )
            return self._original_result(func, args, kwargs)
        out = self._original_result(func, args, kwargs)
        if any(isinstance(t, Tensor) for t in flat_leaves(out)):
            self._escape(
                expansions,
                f"it is used by {name}, which is not a broadcast over the batch (only "
                "elementwise +, -, *, / with a tensor batched on dim 0, and casts, are)",
            )
        return out

    def _broadcast_verdict(self, name: str, operands: list[Tensor]) -> str:
        """ "batched" (the result is batched on dim 0 and has the shape it would have without the
        expansion), "expanded" (the result is itself an expansion), or why the expansion may change it."""
        batch = self.batch_size
        try:
            shape = torch.broadcast_shapes(*[t.shape for t in operands])
            original = torch.broadcast_shapes(*[self._originals(t).shape for t in operands])
        except RuntimeError:
            return f"{name} cannot broadcast it with its other operands once expanded"
        rank = len(shape)
        for t in operands:
            if id(t) in self.expanded and t.dim() != rank:
                return (
                    f"{name} broadcasts it against a tensor of more dims (result {tuple(shape)}), so its "
                    f"dim 0 lines up with dim {rank - t.dim()} there, not with the batch"
                )
        partners = [t for t in operands if id(t) not in self.expanded]
        if any(t.dim() == rank and t.shape[0] == batch for t in partners):  # a tensor batched on dim 0
            if tuple(shape) != tuple(original):
                return f"{name} would give shape {tuple(shape)} with it and {tuple(original)} without"
            if batch in tuple(shape[1:]):
                for t in operands:
                    entry = self.expanded.get(id(t))
                    if entry is not None:
                        self.ambiguous.append(entry.label)
                        for call in entry.calls:
                            call.batch_dim_ambiguous = True
            return "batched"
        if all(t.dim() < rank or t.shape[0] == 1 for t in partners) and _is_expansion_of(shape, original, batch):
            return "expanded"
        return f"{name} combines it with no tensor batched on dim 0 (result {tuple(shape)})"

    def _derived(self, out, original, expansions: list[_Expansion], name: str):
        """``out`` computed from expansions: watched as an expansion of ``original`` when it is one."""
        if (
            isinstance(out, Tensor)
            and isinstance(original, Tensor)
            and _is_expansion_of(out.shape, original.shape, self.batch_size)
        ):
            calls = tuple(call for entry in expansions for call in entry.calls)
            self.expanded[id(out)] = _Expansion(out, original, expansions[0].label, calls)
            return out
        self._escape(expansions, f"{name} does not keep it an expansion over the batch")
        return original

    # ---------------------------------------------------------------- suspects
    def watch_suspect(self, tensor: Tensor, label: str) -> None:
        key = id(tensor)
        # mypy cannot infer a lambda with a default argument
        self.suspects[key] = (weakref.ref(tensor, lambda _, key=key: self.suspects.pop(key, None)), label)  # type: ignore[misc]

    def _follow_suspects(self, name: str, args, kwargs, operands: list[Tensor], watched: list[Tensor], out) -> None:
        results = [t for t in flat_leaves(out) if isinstance(t, Tensor) and t.requires_grad and t.dim() > 0]
        if not results:  # no gradient flows back through it, or a full reduction (a loss)
            return
        problem = None
        for s in watched:
            label = self.suspects[id(s)][1]
            if self.in_fallback:  # a rule-less module, vmapped alone over dim 0 and checked by its sum
                break
            wider = [t for t in operands if t is not s and t.dim() > s.dim()]
            if wider:
                problem = (
                    f"{name} combines it with a tensor of more dims {tuple(wider[0].shape)}, so its dim 0 "
                    "may line up with a position there"
                )
            elif _moves_dim_zero_op(name, args, kwargs):
                problem = f"{name} {'moves' if name in _DIM_MOVING_OPS else 'works along'} its dim 0"
            elif _contracts_dim_zero(name, args, s):
                problem = f"{name} contracts its dim 0 with another tensor's dims"
            for r in results:
                if problem is not None:
                    break
                if r.shape[0] == 1:
                    problem = f"{name} gives shape {tuple(r.shape)}, folding its dim 0 into others"
                elif r.dim() > s.dim() and tuple(r.shape[r.dim() - s.dim() :]) == tuple(s.shape):
                    problem = f"{name} gives shape {tuple(r.shape)}: it may have gained a leading dim"
            if problem is not None:
                if self.escape is None:
                    self.escape = Finding("BATCH_DIM_AMBIGUOUS", f"{label}; {problem}. Its batch dim is ambiguous")
                return
        for r in results:
            if id(r) not in self.suspects:
                self.watch_suspect(r, label)


_DIM_MOVING_OPS = frozenset(
    {
        "transpose",
        "swapaxes",
        "swapdims",
        "movedim",
        "moveaxis",
        "permute",
        "t",
        "T",
        "mT",
        "mH",
        "adjoint",
        "stack",
        "einsum",
    }
)


class _DimMoveWatcher(TorchFunctionMode):
    """Notes the first op outside every unit that may move a tensor's dim 0.

    Ops on tensors that require grad show up in the autograd graph; this mode is
    for the rest (raw inputs), and runs only when an input has a non-leading
    dim of the batch's size (otherwise a moved input cannot pass as batch-first).
    """

    def __init__(self, active: list):
        super().__init__()
        self.active: list | None = active
        self.moved: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.moved is None and not self.active:
            name = getattr(func, "__name__", "")
            if name in _DIM_MOVING_OPS and _moves_dim_zero_op(name, args, kwargs or {}):
                self.moved = name
        return out


class _UserCodeWatcher(TorchFunctionMode):
    """Watches the user's code while the capture is on, for two things the graph does not show.

    **Gradient hooks on activations.** Every ``tensor.register_hook(fn)`` on a
    non-leaf tensor is wrapped to note the first hook that rewrites a gradient
    (returns a new one, or changes it in place). Such a hook (gradient
    reversal, scaling, clipping) acts on the whole batch's gradient, while
    per-example gradients need it applied to each example's: the engine would
    read the gradient at the tensor before the hook, and a hook that is not
    linear (a clamp) is not even the same map on one example's gradient as on
    the batch's. ``torch.func`` (the vmap engine) and the loop apply it per
    example. Hooks that only look (return None) change nothing and pass; hooks
    the capture adds itself run with torch functions disabled and are not seen.

    **What the loss reads** (``observe``: after :meth:`watch_loss`, once the
    model's forward has returned). An op that reads an activation of the
    forward other than the model's outputs (an auxiliary loss on hidden states,
    an activation penalty, a second head) gets a hook on its results; if the
    backward reaches them, the backwarded loss has a term that is not a loss of
    the output, which the output-gradient and ``p.grad`` checks cannot see (its
    gradient enters the layers below the activation, and ``p.grad`` has it too).

    **Frozen activations of the batch** (during the model's forward). A result
    without gradient whose dim 0 has the batch's size, computed from the
    model's inputs or from such results (a frozen embedding and LayerNorm
    below a LoRA adapter, PEFT's frozen base layers) by an op that keeps its
    operand's dim 0 as its own (not a transpose of dim 0, not a broadcast
    against a tensor of more dims, not a product contracting it), is batched
    on dim 0 like the inputs: ``derived`` keeps it, and a rule module called
    on it is not ambiguous (:class:`_BroadcastWatcher`'s suspects).
    """

    def __init__(self, batch_size: int = 0, stop_random: bool = False):
        super().__init__()
        self.batch_size = batch_size
        self.stop_random = stop_random
        self.input_storages: set[int] = set()  # storages of the model's inputs (filled by capturing)
        self.derived: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # frozen results of the batch
        self.mixed: str | None = None  # the first op that mixed the rows of a raw input on the way to the loss
        self.tainted: dict[int, tuple] = {}  # id → (weak reference, what): raw tensors whose rows were mixed
        self.random: str | None = None  # the first call of the forward that drew random numbers
        self.rewritten: str | None = None  # where the first rewriting hook was registered
        self.outputs: set[int] | None = None  # ids of the model's output tensors, once the forward returned
        self.after_forward: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # results of later ops
        self.aux_term: str | None = None  # where a later op read an activation whose term reached the backward

    def watch_loss(self, outputs: list) -> None:
        self.outputs = {id(t) for t in outputs if isinstance(t, Tensor)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _REGISTER_HOOK and getattr(args[0] if args else None, "grad_fn", None) is not None:
            hook = args[1] if len(args) > 1 else kwargs.pop("hook")
            where = f"a tensor of shape {tuple(args[0].shape)} at {_caller_outside_torch()}"
            args = (args[0], _RewriteReporter(hook, self, where))
        mixing = None
        if self.outputs is None:
            name = getattr(func, "__name__", None)
            if self.mixed is None and self.batch_size > 1 and name in _RAW_MIXING:
                mixing = _mixes_raw_rows(name, args, kwargs, self.batch_size)
            if self.random is None:
                self.random = random_call(func, args, kwargs)
                if self.random is not None and self.stop_random:
                    raise RandomCallStopped(self.random)  # before it draws
        out = func(*args, **kwargs)
        if self.outputs is not None:
            with torch._C.DisableTorchFunction():
                self._follow_loss(func, args, kwargs, out)
        else:
            if self.input_storages:
                with torch._C.DisableTorchFunction():
                    self._follow_inputs(func, args, kwargs, out)
            if self.mixed is None and (mixing is not None or self.tainted):
                with torch._C.DisableTorchFunction():
                    self._follow_mixing(mixing, args, kwargs, out)
        return out

    def from_inputs(self, t: Tensor) -> bool:
        """Whether ``t`` is batched on dim 0 as the model's inputs are: one of them (or a view sharing
        their storage), or a frozen result computed from them (``derived``)."""
        return self.derived.get(id(t)) is t or _storage(t) in self.input_storages

    def _follow_inputs(self, func, args, kwargs, out) -> None:
        batch = self.batch_size
        results = [t for t in tensors_in(out) if t.grad_fn is None and t.dim() > 0 and t.shape[0] == batch]
        if not results:
            return
        name = _op_name(func)
        if (name in _DIM_MOVING_OPS and _moves_dim_zero_op(name, args, kwargs or {})) or _mixes_dim_zero(
            name, args, kwargs or {}
        ):
            return
        operands = _operands(args, kwargs)
        if not operands:  # a new tensor (torch.ones(B, ...)): not computed from the inputs
            return
        rank = max(t.dim() for t in operands)
        if not any(
            t.dim() == rank
            and t.shape[0] == batch
            and not _contracts_dim_zero(name, args, t)
            and (t.grad_fn is not None or self.from_inputs(t))
            for t in operands
        ):
            return
        for r in results:
            if r.dim() >= rank:
                self.derived[id(r)] = r

    def _follow_mixing(self, mixing: str | None, args, kwargs, out) -> None:
        """Follow rows mixed across examples in tensors that do not require grad (no backward node shows
        them) until they enter the differentiable forward (a batch-mean normalisation of the input fed to
        a layer); where they never do (a running mean kept in a buffer), they change nothing."""
        if mixing is None:
            for t in _operands(args, kwargs):
                entry = self.tainted.get(id(t))
                if entry is not None and entry[0]() is t:
                    mixing = entry[1]
                    break
            if mixing is None:
                return
        results = tensors_in(out)
        if any(r.requires_grad for r in results):
            self.mixed = mixing
            return
        for r in results:
            self.tainted[id(r)] = (weakref.ref(r), mixing)

    def _follow_loss(self, func, args, kwargs, out) -> None:
        results = [t for t in tensors_in(out) if t.requires_grad]
        reads_activation = any(
            # called once the forward returned, when self.outputs is set
            t.grad_fn is not None and id(t) not in self.outputs and id(t) not in self.after_forward  # type: ignore[operator]
            for t in tensors_in((args, kwargs))
            if t.requires_grad
        )
        for t in results:
            self.after_forward[id(t)] = t
            if reads_activation and t.grad_fn is not None:
                t.register_hook(_ReachReporter(self, f"{_op_name(func)} at {_caller_outside_torch()}"))


#: Ops that reorder or combine the rows of a dim they are given (``x.flip(0)``, ``x.cumsum(0)``).
_ALONG_DIM_OPS = frozenset(
    {
        "flip",
        "roll",
        "cumsum",
        "cumprod",
        "cummax",
        "cummin",
        "logcumsumexp",
        "sort",
        "argsort",
        "index_select",
        "gather",
        "take_along_dim",
        "narrow",
        "scatter",
        "scatter_add",
        "index_add",
        "index_copy",
        "index_fill",
        "repeat_interleave",
        "unfold",
        "diff",
    }
)


def _mixes_dim_zero(name: str, args, kwargs) -> bool:
    """Whether op ``name`` may reorder or combine the rows of its operand's dim 0 (then its result's dim 0
    is not that of the batch's examples one by one): an op along dim 0, or indexing dim 0 with a tensor."""
    first = args[0] if args else None
    if name.startswith("new_"):  # x.new_ones(T, T): a new tensor whose shape is not x's
        return True
    if name == "__getitem__":
        index = args[1] if len(args) > 1 else None
        lead = index[0] if isinstance(index, tuple) and index else index
        return isinstance(lead, (Tensor, list)) or (isinstance(lead, slice) and lead.step not in (None, 1))
    if name not in _ALONG_DIM_OPS or not isinstance(first, Tensor) or first.dim() == 0:
        return False
    dims = [kwargs[k] for k in ("dim", "dims", "shifts_dims") if k in kwargs] + list(args[1:3])
    flat = [d for r in dims for d in (r if isinstance(r, (list, tuple)) else (r,))]
    return name in ("take_along_dim", "repeat_interleave") or any(
        isinstance(d, int) and not isinstance(d, bool) and d % first.dim() == 0 for d in flat
    )


#: Ops that combine or reorder rows along a dim: name → (position of the dim argument, its keyword, default;
#: "all": along every dim). Reductions without a dim (a mask's token count) are not counted here.
_RAW_MIXING = {
    "roll": (2, "dims", "all"),
    "flip": (1, "dims", None),
    "sort": (1, "dim", -1),
    "argsort": (1, "dim", -1),
    "cumsum": (1, "dim", None),
    "cumprod": (1, "dim", None),
    "logcumsumexp": (1, "dim", None),
    "cummax": (1, "dim", None),
    "cummin": (1, "dim", None),
    "mean": (1, "dim", None),
    "sum": (1, "dim", None),
    "nansum": (1, "dim", None),
    "std": (1, "dim", None),
    "var": (1, "dim", None),
    "amax": (1, "dim", None),
    "amin": (1, "dim", None),
    "max": (1, "dim", None),
    "min": (1, "dim", None),
    "softmax": (1, "dim", None),
    "log_softmax": (1, "dim", None),
    "logsumexp": (1, "dim", None),
    "prod": (1, "dim", None),
    "median": (1, "dim", None),
    "topk": (2, "dim", -1),
    "kthvalue": (2, "dim", -1),
    "index_select": (1, "dim", None),
    "gather": (1, "dim", None),
    "__getitem__": (1, None, None),
}


def _mixes_raw_rows(name: str, args, kwargs, batch_size: int) -> str | None:
    """Where op ``name`` combines or reorders the rows of a floating tensor that does not require grad
    (a raw input: no backward node shows it) and whose dim 0 has the batch's size, along dim 0."""
    t = args[0] if args else None
    if (
        not isinstance(t, Tensor)
        or t.requires_grad
        or not t.is_floating_point()
        or t.dim() == 0
        or t.shape[0] != batch_size
    ):
        return None
    position, keyword, default = _RAW_MIXING[name]
    if name == "__getitem__":
        index = args[1] if len(args) > 1 else None
        first = index[0] if isinstance(index, tuple) and index else index
        if isinstance(first, slice):
            rows = range(batch_size)[first]
            if rows == range(batch_size):
                return None
            return f"slicing {first} the rows of a tensor of shape {tuple(t.shape)}"
        if not isinstance(first, Tensor) or first.dim() != 1:
            return None
        in_place = first.shape[0] == batch_size and (
            bool(first.all()) if first.dtype == torch.bool else bool(torch.equal(first.cpu(), torch.arange(batch_size)))
        )
        return None if in_place else f"indexing with rows of other examples a tensor of shape {tuple(t.shape)}"
    dims = args[position] if len(args) > position else kwargs.get(keyword, default)
    if dims == "all":
        return f"{name} over all of a tensor of shape {tuple(t.shape)}"
    dims = [dims] if isinstance(dims, int) and not isinstance(dims, bool) else dims
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None
    if any(d % t.dim() == 0 for d in dims):
        return f"{name} along dim 0 of a tensor of shape {tuple(t.shape)} that does not require grad (an input?)"
    return None


class RandomCallStopped(Exception):
    """The forward was stopped at its first random call, before it drew (``capturing(stop_random=True)``)."""


class _ReachReporter:
    """A tensor hook noting that the backward reached a term that read an activation (gradient ≠ 0)."""

    __slots__ = ("watcher", "where")

    def __init__(self, watcher: _UserCodeWatcher, where: str):
        self.watcher, self.where = watcher, where

    def __call__(self, grad):
        if self.watcher.aux_term is None and bool((grad != 0).any()):
            self.watcher.aux_term = self.where


class _RewriteReporter:
    """A user's tensor hook, unchanged in effect, that tells its watcher when it rewrites a gradient."""

    __slots__ = ("hook", "watcher", "where")

    def __init__(self, hook, watcher: _UserCodeWatcher, where: str):
        self.hook, self.watcher, self.where = hook, watcher, where

    def __call__(self, grad):
        version = grad._version
        result = self.hook(grad)
        if (result is not None and result is not grad) or grad._version != version:
            self.watcher.rewritten = self.watcher.rewritten or self.where
        return result


_REGISTER_HOOK = Tensor.register_hook

# both are packages loaded from files (their __file__ and this module's __package__ are set)
_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__.split(".")[0]]))  # type: ignore[type-var, operator, union-attr]


def _caller_outside_torch() -> str:
    """``file:line, in function`` of the innermost caller outside torch and persample."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame = frame.f_back
    if frame is None:
        return "an unknown place"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}, in {frame.f_code.co_name}"


#: Products whose operands other than the first (``matmul(a, b)``'s ``b``, ``linear``'s weight) are
#: contracted over their dim 0 when they are matrices or vectors.
_PRODUCTS = frozenset(
    {
        "matmul",
        "__matmul__",
        "__rmatmul__",
        "mm",
        "mv",
        "linear",
        "addmm",
        "addmv",
        "dot",
        "vdot",
        "inner",
        "outer",
        "ger",
        "tensordot",
        "kron",
        "chain_matmul",
        "multi_dot",
    }
)


def _contracts_dim_zero(name: str, args, t: Tensor) -> bool:
    """Whether product ``name`` sums ``t``'s dim 0 against other dims: ``t`` is not its row operand
    (``args[0]``; ``args[1]`` for ``addmm``/``addmv``), or a vector or matrix operand of ``dot``-like
    products. Batched products (``bmm``, ``matmul`` of two tensors of 3 dims or more) keep dim 0."""
    if name not in _PRODUCTS:
        return False
    row = 1 if name in ("addmm", "addmv") else 0
    if (
        name in ("matmul", "__matmul__", "__rmatmul__")
        and len(args) > 1
        and all(isinstance(a, Tensor) and a.dim() >= 3 for a in args[:2])
    ):
        return False
    if name == "__rmatmul__":  # b.__rmatmul__(a) is a @ b: b (args[0]) is the contracted operand
        return bool(args) and args[0] is t
    return not (len(args) > row and args[row] is t) or name in (
        "dot",
        "vdot",
        "inner",
        "outer",
        "ger",
        "tensordot",
        "kron",
    )


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
        return bool(dims) and _is_dim(dims[0]) and dims[0] % ndim != 0
    if name in _DIM_MOVING_OPS:  # transpose, swapaxes, movedim: their first two arguments are dims
        flat = [d for r in rest[:2] for d in (r if isinstance(r, (list, tuple)) else (r,))]
        return any(_is_dim(d) and d % ndim == 0 for d in flat)
    dim_spec = _DIM_ARGUMENT.get(name)  # ops that take a dim: read it where it is (not sizes, not flags)
    if dim_spec is None:
        return False
    position, keyword, default = dim_spec
    dims = args[position] if len(args) > position else kwargs.get(keyword, default)
    if dims == "all":
        return True
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return any(_is_dim(d) and d % ndim == 0 for d in dims)


def _is_dim(d) -> bool:
    """An int that can be a dim index (a bool is an int in Python: ``F.dropout(x, p, False)``)."""
    return isinstance(d, int) and not isinstance(d, bool)


#: Ops with a dim argument that works along that dim, beyond :data:`_RAW_MIXING`'s: name → (position of
#: the dim argument, its keyword, its default).
_DIM_ARGUMENT = {
    **{name: spec for name, spec in _RAW_MIXING.items() if name != "__getitem__"},
    "cat": (1, "dim", 0),
    "concat": (1, "dim", 0),
    "concatenate": (1, "dim", 0),
    "narrow": (1, "dim", None),
    "select": (1, "dim", None),
    "split": (2, "dim", 0),
    "chunk": (2, "dim", 0),
    "unbind": (1, "dim", 0),
    "tensor_split": (2, "dim", 0),
    "repeat_interleave": (2, "dim", None),
    "diff": (2, "dim", -1),
    "index_add": (1, "dim", None),
    "scatter": (1, "dim", None),
    "scatter_add": (1, "dim", None),
}


@dataclass
class Capture:
    """What :func:`capturing` saw: the broadcast watcher's verdict."""

    watcher: _BroadcastWatcher
    dim_watcher: _DimMoveWatcher | None
    user_watcher: _UserCodeWatcher
    watching: bool = False  # the broadcast watcher is entered (at the first expanded or suspect output)
    forward_ended: bool = False  # later calls (activation checkpointing recomputing in backward) are not recorded
    lost_watch: bool = False  # torch dropped a watcher's mode (see _exit_mode): what it watched is unknown
    user_watcher_exited: bool = False

    @property
    def escape(self) -> Finding | None:
        if self.lost_watch:
            return Finding(
                "REENTRANT_CHECKPOINT",
                "part of the forward ran where the fast engine's checks cannot "
                "follow it (re-entrant gradient checkpointing, use_reentrant=True?); use "
                "checkpoint(..., use_reentrant=False), " + _HF_NON_REENTRANT,
            )
        if self.rewritten_gradient is not None:
            return self.rewritten_gradient
        if self.user_watcher.mixed is not None:
            return batch_mixing(self.user_watcher.mixed)
        if self.watcher.escape is not None:
            return self.watcher.escape
        if self.raw_input_moved and self.watcher.ambiguous:
            return _ambiguous_expansion(self.watcher.ambiguous[0])
        return None

    @property
    def rewritten_gradient(self) -> Finding | None:
        """Why the backward's gradients cannot be read per example: a tensor hook registered in the
        forward rewrote one (known once the backward has run), or None."""
        if self.user_watcher.rewritten is None:
            return None
        return Finding(
            "GRADIENT_REWRITTEN",
            "a gradient hook registered in the forward (tensor.register_hook on "
            f"{self.user_watcher.rewritten}) rewrote the batch's gradient, which the fast engine cannot "
            "apply to each example; the vmap and loop engines do (engine='auto' takes them)",
        )

    def watch_loss(self, outputs: list) -> None:
        """From now on (the model's forward has returned), note ops that read an activation other than
        ``outputs`` and whose results the backward reaches (see :class:`_UserCodeWatcher`)."""
        self.user_watcher.watch_loss(outputs)

    @property
    def auxiliary_term(self) -> str | None:
        """Where the backwarded loss read an activation other than the model's outputs (known once
        the backward has run), or None."""
        return self.user_watcher.aux_term

    @property
    def random_call(self) -> str | None:
        """The first call of the model's forward that drew random numbers (seen by what the model
        calls, not by the generators' state, which other threads share), or None."""
        return self.user_watcher.random

    @property
    def raw_input_moved(self) -> bool:
        return self.dim_watcher is not None and self.dim_watcher.moved is not None

    def watch(self) -> None:
        if not self.watching:
            self.watcher.__enter__()
            self.watching = True

    def stop_recording(self) -> None:
        """Record no more unit calls (the model's forward has returned; a checkpointed layer's
        recomputation in the backward is not a call); the watchers stay on."""
        self.forward_ended = True

    def end_model_forward(self) -> None:
        """The model's forward has returned and the caller computes the loss itself (the fast engine):
        stop watching the user's code now, unless a watcher entered later is still on (modes leave in
        the reverse order), since every op under a torch-function mode costs microseconds."""
        if not self.watching:
            self._exit_user_watcher()

    def end_forward(self) -> None:
        """Stop watching ops and recording calls (call once the forward and the losses are done).
        Modes leave innermost first: the broadcast watcher (entered during the forward), the
        user-code watcher, the dim-move watcher (entered first)."""
        self.forward_ended = True
        if self.watching:
            self.watching = False
            self.lost_watch |= not _exit_mode(self.watcher)
        self._exit_user_watcher()
        if self.dim_watcher is not None and self.dim_watcher.active is not None:
            self.dim_watcher.active = None
            self.lost_watch |= not _exit_mode(self.dim_watcher)

    def _exit_user_watcher(self) -> None:
        if not self.user_watcher_exited:
            self.user_watcher_exited = True
            self.lost_watch |= not _exit_mode(self.user_watcher)


def _exit_mode(mode: TorchFunctionMode) -> bool:
    """Leave ``mode`` if it is the innermost torch-function mode; False where torch dropped it: a mode
    entered inside a re-entrant checkpoint's forward (an ``autograd.Function``) is gone when it returns,
    and popping anyway would pop another mode."""
    stack = torch_function_mode_stack()
    if not stack or stack[-1] is not mode:
        return False
    mode.__exit__(None, None, None)
    return True


def _ambiguous_expansion(label: str) -> Finding:
    return Finding(
        "BATCH_DIM_AMBIGUOUS",
        f"{label}; it meets a tensor whose dim 0 has the batch's size and "
        "another dim of that size, while the forward moves dim 0 of some tensor (a transpose or "
        "permute): that tensor may be sequence-first, so whether the expansion lines up with the batch "
        "is ambiguous",
    )


@contextlib.contextmanager
def capturing(
    units: list[Unit],
    model: nn.Module,
    batch_size: int,
    *,
    watch_dim_moves: bool = False,
    hook_outputs: bool = True,
    stop_random: bool = False,
) -> Iterator[Capture]:
    """Record unit calls and output gradients within the block.

    With ``hook_outputs`` a tensor hook on every output stores the gradients of any backward pass
    (a training loop's own ``loss.backward()``); without, the caller asks autograd for the
    outputs' ``Call.edges`` itself and adds the results with :func:`add_gradient` (a hook on a
    fresh tensor costs about 12 µs, and runs Python during the backward).

    A rule unit called on an input whose dim 0 has size 1 (shared by the batch,
    such as position ids ``arange(T)[None]``), or that has no batch dim at all
    (``arange(T)``, for a rule that treats such an input as one example), gets
    its output expanded to the batch, so that its output gradient is per
    example; the rule then sees the input expanded the same way. From then on a
    ``TorchFunctionMode`` (:class:`_BroadcastWatcher`) checks that the
    expansion changes no value of the forward. An input whose dim 0 has the
    batch's size but that comes neither from the model's inputs nor from an
    activation (a constant ``arange(T)`` with T == B) is ambiguous; its output
    is watched for uses that treat dim 0 as a position.

    ``stop_random``: the forward's first call that would draw random numbers raises
    :class:`RandomCallStopped` instead (``Capture.random_call`` notes it either way).
    """
    watcher = _BroadcastWatcher(batch_size)
    handles = []
    active: list = []
    dim_watcher = _DimMoveWatcher(active) if watch_dim_moves else None
    input_storages: set[int] = set()  # also the user-code watcher's, which follows them through frozen ops

    def model_pre_hook(module, args, kwargs):
        if not capture.forward_ended:
            with torch._C.DisableTorchFunction():  # our own ops: not the user's code (and cheaper)
                for t in tensors_in((args, kwargs)):
                    if (storage := _storage(t)) is not None:
                        input_storages.add(storage)

    on_expansion: list = []  # (module, the expansion it was called on), innermost last
    rule_pre_hooks: list = []  # registered at the first expansion (with no dim watcher)
    fallbacks_entered: list = []  # rule-less units whose forward is running, innermost last
    fallback_pre_hooks: list = []  # registered at the first suspect output

    def fallback_pre_hook(module, args, kwargs):
        watcher.in_fallback += 1
        fallbacks_entered.append(module)

    def pre_hook(unit: Unit):
        def hook(module, args, kwargs):
            if dim_watcher is not None:
                active.append(module)
            if unit.rule is None or capture.forward_ended or not args:
                return
            entry = watcher.expanded.get(id(args[0])) if isinstance(args[0], Tensor) else None
            # A rule module computes row by row, so on an expansion it gives the expansion of its result
            # on the original: let its ops run on the expansion (the rule then sees a batched call).
            if entry is not None and (
                entry.original.dim() == args[0].dim() or unit.rule.unbatched(module, entry.original)
            ):
                watcher.paused += 1
                on_expansion.append((module, entry))

        return hook

    def post_hook(unit: Unit):
        def hook(module, args, kwargs, output):
            if active:
                active.pop()
            entry = None
            if on_expansion and on_expansion[-1][0] is module:
                entry = on_expansion.pop()[1]
                watcher.paused -= 1
            if fallbacks_entered and fallbacks_entered[-1] is module:
                fallbacks_entered.pop()
                watcher.in_fallback -= 1
            if capture.forward_ended:
                return None
            with torch._C.DisableTorchFunction():  # the watcher must not see (or redirect) our own ops
                return record(unit, args, kwargs, output, entry)

        return hook

    def record(unit: Unit, args, kwargs, output, on: _Expansion | None):
        substituted = _substituted_parameter(parameter_slots[id(unit)], resharded)
        if substituted is not None:  # the call computed with another tensor than the parameter a rule credits
            watcher.escape = watcher.escape or _substitution(unit, substituted)
            return None
        expanded = suspect = None
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if on is not None:  # called on an expansion: its output is one too, or the forward must not trust it
            if not (isinstance(output, Tensor) and output.dim() > 0 and output.shape[0] == batch_size):
                watcher.escape = watcher.escape or Finding(
                    "EXPANSION_ESCAPES", f"{on.label}; module {unit.name or '<root>'} does not keep it one"
                )
                return None
            original = output[:1] if on.original.dim() == x.dim() else output[0]  # type: ignore[union-attr]  # on: x is set
        elif unit.rule is not None and isinstance(output, Tensor) and output.requires_grad and x is not None:
            shape = tuple(x.shape)
            if batch_size > 1 and x.dim() > 0 and shape[0] == 1 and output.dim() > 0 and output.shape[0] == 1:
                expanded = output.expand(batch_size, *output.shape[1:])
                label = f"module {unit.name or '<root>'}: its input of shape {shape} has a batch dim of size 1"
            elif (x.dim() == 0 or shape[0] != batch_size) and unit.rule.unbatched(unit.module, x):
                expanded = output.unsqueeze(0).expand(batch_size, *output.shape)
                args = (x.unsqueeze(0), *args[1:])  # one example; the rule expands it to the batch
                label = (
                    f"module {unit.name or '<root>'}: its input of shape {shape} has no batch dim (dim 0 "
                    f"is not the batch of {batch_size}), so its output was expanded over the batch"
                )
            elif (
                batch_size > 1
                and shape
                and shape[0] == batch_size
                and x.grad_fn is None
                and _storage(x) not in input_storages
                and not capture.user_watcher.from_inputs(x)
            ):
                suspect = (
                    f"module {unit.name or '<root>'}: its input of shape {shape} has dim 0 of the batch's "
                    f"size {batch_size} but comes neither from the model's inputs nor from a differentiable "
                    "activation (a constant such as torch.arange(T) with T == B?)"
                )
        call = Call(
            args,
            kwargs,
            output if expanded is None else expanded,
            broadcast=expanded is not None,
            autocast=autocast_state() if unit.rule is None else None,
            input_versions=_versions(args, kwargs, list(unit.params.values())),
            changed_buffers=unit.rule is None and _buffers_changed(fallback_buffers[id(unit)]),
        )
        unit.calls.append(call)
        leaves = flat_leaves(call.output)
        for leaf_index, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor) and leaf.requires_grad:
                if hook_outputs:
                    leaf.register_hook(store_grad(call.out_grads, leaf_index))
                call.edges[leaf_index] = get_gradient_edge(leaf)
                if leaf._is_view():
                    call.view_versions[leaf_index] = leaf._version
        if on is not None:
            watcher.expanded[id(output)] = _Expansion(output, original, on.label, (*on.calls, call))
            return None
        if expanded is not None:
            watcher.watch_expansion(expanded, output, label, call)
            capture.watch()
            if dim_watcher is None and not rule_pre_hooks:  # from now on, rule modules may get expansions
                rule_pre_hooks.extend(
                    _hooked(unit.module.register_forward_pre_hook, pre_hook(unit), unit)
                    for unit in units
                    if unit.rule is not None
                )
            return expanded
        if suspect is not None:
            watcher.watch_suspect(output, suspect)
            capture.watch()
            if not fallback_pre_hooks:  # from now on, rule-less modules' own ops are theirs
                fallback_pre_hooks.extend(
                    _hooked(u.module.register_forward_pre_hook, fallback_pre_hook, u) for u in units if u.rule is None
                )
        return None

    fallback_buffers = {id(u): _versioned_buffer_slots(u.module) for u in units if u.rule is None}
    parameter_slots = {id(u): _parameter_slots(u.module) for u in units}
    resharded = fsdp2_sharded_slots(model) if sharding_of(model) == "FSDP2" else {}
    capture = Capture(watcher, dim_watcher, _UserCodeWatcher(batch_size, stop_random))
    capture.user_watcher.input_storages = input_storages
    try:
        handles.append(_hooked(model.register_forward_pre_hook, model_pre_hook, None))
        for unit in units:
            if dim_watcher is not None:
                handles.append(_hooked(unit.module.register_forward_pre_hook, pre_hook(unit), unit))
            handles.append(_hooked(unit.module.register_forward_hook, post_hook(unit), unit))
        if dim_watcher is not None:
            dim_watcher.__enter__()
        capture.user_watcher.__enter__()  # inside the dim watcher, outside the broadcast watcher (end_forward)
        yield capture
    finally:
        for h in (*handles, *rule_pre_hooks, *fallback_pre_hooks):
            h.remove()
        capture.end_forward()


def _hooked(register, hook, unit: Unit | None):
    """``register(hook, with_kwargs=True)``; a module that refuses hooks (a TorchScript module, a
    wrapper that overrides ``register_forward_hook``) is a refusal, never a crash: without the hook
    the capture cannot see the calls."""
    try:
        return register(hook, with_kwargs=True)
    except Exception as err:
        where = "the model" if unit is None else f"module {unit.name or '<root>'} ({type(unit.module).__name__})"
        raise refusal(
            "CAPTURE_HOOK_REFUSED",
            f"the fast engine cannot hook {where}: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}",
        ) from err


def _parameter_slots(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """``(owner, name, parameter)`` of every parameter slot in ``module``'s subtree, as found before the
    forward: a call of the module computes with these very tensors unless something swapped them in."""
    return [(owner, name, p) for owner in module.modules() for name, p in owner._parameters.items() if p is not None]


def _substituted_parameter(slots: list[tuple], resharded: dict) -> str | None:
    """The name of a parameter slot that holds another tensor than it held before the forward (at a
    call of its module), or None. ``torch.func.functional_call(module, {"weight": 1.1 * W}, x)`` puts
    the derived tensor in the slot for the call: what the call's output gradient gives is the gradient
    with respect to that tensor, which a closed-form rule (or a fallback's re-run with the module's own
    parameters) would credit to W itself, dropping the chain rule through the derivation.
    ``resharded`` maps FSDP2's slots to their sharded parameter, which FSDP2's post-forward hook puts
    back before this check runs (:func:`persample._sharding.fsdp2_sharded_slots`)."""
    for owner, name, p in slots:
        held = owner._parameters.get(name)
        if held is not p and (not resharded or resharded.get((id(owner), name)) is not held):
            return name
    return None


def _substitution(unit: Unit, name: str) -> Finding:
    label = f"{unit.name or '<root>'} ({type(unit.module).__name__})"
    return Finding(
        "PARAMETER_SUBSTITUTED",
        f"module {label} was called with its parameter {name!r} replaced by "
        "another tensor (torch.func.functional_call with weights derived from its own: 1.1·W, W + ε as "
        "in SAM, a hypernetwork's output, an inner MAML step), so the gradient its call receives is not "
        "the parameter's own; the vmap and loop engines differentiate through the substitution "
        "(engine='auto' takes them)",
        module=label,
    )


def _storage(t: Tensor) -> int | None:
    """The address of ``t``'s storage (views of a tensor share it); None where there is none."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def store_grad(grads: dict, leaf_index: int):
    """A tensor hook that adds each gradient reaching an output into ``grads[leaf_index]`` (several
    backward passes add up, as in ``p.grad``). It stores into ``grads`` only: referencing the Call
    (and so the output tensor) from a hook on that output would make a cycle through autograd's C++
    hook storage, which Python's garbage collector cannot see, leaking the whole graph."""

    def hook(grad: Tensor) -> None:
        add_gradient(grads, leaf_index, grad)

    return hook


def add_gradient(grads: dict, leaf_index: int, grad: Tensor | None) -> None:
    """``grads[leaf_index] += grad``, as ``p.grad`` adds up backward passes; None (an output that did
    not reach the loss) adds nothing."""
    if grad is not None:
        previous = grads.get(leaf_index)
        grads[leaf_index] = grad if previous is None else previous + grad


def modified_in_place(units: list[Unit]) -> Finding | None:
    """Why the captured inputs or output gradients cannot be trusted, or None: a unit's input was
    modified in place after the call (``y = self.proj(x); x.mul_(2)``), or an output that is a view
    was (``y = self.proj(x); y.mul_(2)`` on a 3-D input)."""
    for unit in units:
        label = f"module {unit.name or '<root>'} ({type(unit.module).__name__})"
        if any(call.input_modified_in_place(unit.params) for call in unit.calls):
            return Finding(
                "MODIFIED_IN_PLACE",
                f"an input or a parameter of {label} was modified in place after "
                "the module was called, so what the fast engine captured is not what the module "
                "computed with (autograd's own backward would refuse it too); use an out-of-place op "
                "(x = x * 2) or another engine",
                module=label,
            )
        if any(call.changed_buffers for call in unit.calls):
            return Finding(
                "BUFFERS_CHANGED",
                f"{label} changed its buffers during the forward (spectral norm's "
                "power iteration, a running average?), so the fast engine cannot re-run its call for "
                "per-example gradients; the vmap and loop engines compute every example from the "
                "buffers as found (engine='auto' takes them)",
                module=label,
            )
        if any(call.view_modified_in_place() for call in unit.calls):
            return Finding(
                "MODIFIED_IN_PLACE",
                f"the output of {label} is a view and was modified in place after "
                "the module returned, which hides its gradient from the fast engine's hooks; use an "
                "out-of-place op (y = y * 2) or another engine",
                module=label,
            )
    return None


# ---------------------------------------------------------------------------- graph audit


@dataclass(frozen=True)
class GraphAudit:
    """What one walk of the autograd graph found."""

    escape: Finding | None
    dim_zero_moved: bool


_HF_NON_REENTRANT = (
    "or for Hugging Face models gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    "{'use_reentrant': False}) (TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': "
    "False}); Lightning: your own checkpoint(..., use_reentrant=False))"
)
REENTRANT_CHECKPOINT = Finding(
    "REENTRANT_CHECKPOINT",
    "re-entrant gradient checkpointing (use_reentrant=True) "
    "hides the checkpointed layers' inputs and output gradients from the fast engine; "
    "use checkpoint(..., use_reentrant=False), " + _HF_NON_REENTRANT,
)


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


def batch_mixing(what: str) -> Finding:
    return Finding(
        "BATCH_MIXED",
        f"the forward mixes the examples of the batch: {what}, so an example's output "
        "depends on other examples and its gradient cannot be read off the batch's backward; "
        "engine='auto' computes each example alone (the vmap engine or the loop: the gradient of "
        "loss_fn on a batch of one)",
    )


#: Backward nodes (their names without the trailing number) of ops that combine or reorder the rows of
#: their input along the dims that an attribute holds; None: along every dim (a full reduction).
_ALONG_DIMS = {
    "RollBackward": "_saved_dims",
    "FlipBackward": "_saved_dims",
    "SortBackward": "_saved_dim",
    "CumsumBackward": "_saved_dim",
    "CumprodBackward": "_saved_dim",
    "LogcumsumexpBackward": "_saved_dim",
    "CummaxBackward": "_saved_dim",
    "CumminBackward": "_saved_dim",
    "IndexSelectBackward": "_saved_dim",
    "GatherBackward": "_saved_dim",
    "IndexAddBackward": "_saved_dim",
    "ScatterAddBackward": "_saved_dim",
    "ScatterBackward": "_saved_dim",
    "MeanBackward": "_saved_dim",
    "SumBackward": "_saved_dim",
    "NansumBackward": "_saved_dim",
    "MaxBackward": "_saved_dim",
    "MinBackward": "_saved_dim",
    "AmaxBackward": "_saved_dim",
    "AminBackward": "_saved_dim",
    "StdBackward": "_saved_dim",
    "VarBackward": "_saved_dim",
    "StdMeanBackward": "_saved_dim",
    "VarMeanBackward": "_saved_dim",
    "SoftmaxBackward": "_saved_dim",
    "LogSoftmaxBackward": "_saved_dim",
    "LogsumexpBackward": "_saved_dim",
    "LinalgVectorNormBackward": "_saved_dim",
    "NormBackward": "_saved_dim",
    "TopkBackward": "_saved_dim",
    "ProdBackward": "_saved_dim",
    "MedianBackward": "_saved_dim",
    "NanmedianBackward": "_saved_dim",
    "KthvalueBackward": "_saved_dim",
    "ModeBackward": "_saved_dim",
}
_ROW_INDEXING = frozenset(
    {"IndexSelectBackward", "GatherBackward", "IndexAddBackward", "ScatterAddBackward", "ScatterBackward"}
)
#: Full reductions (no dim saved): every row of the input meets every other.
_FULL_REDUCTIONS = frozenset(
    {
        "SumBackward0",
        "MeanBackward0",
        "MaxBackward1",
        "MinBackward1",
        "MedianBackward0",
        "NanmedianBackward0",
        "ProdBackward0",
        "NormBackward0",
        "StdBackward0",
        "VarBackward0",
    }
)


def _node_input_shape(node) -> tuple | None:
    """The shape of the tensor an op read: its saved sizes or self, else its output's (shape-keeping ops)."""
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    if sizes is not None:
        return tuple(int(s) for s in sizes)
    saved = getattr(node, "_saved_self", None)
    if isinstance(saved, Tensor):
        return tuple(saved.shape)
    metadata = getattr(node, "_input_metadata", None)
    return tuple(metadata[0].shape) if metadata else None


def _of_parameters_only(node) -> bool:
    return all(nxt is None or hasattr(nxt, "variable") for nxt, _ in node.next_functions)


def _mixes_batch(node, batch_size: int | None) -> tuple[bool, tuple, str] | None:
    """(certain, the tensor's shape, what) where the op of backward node ``node`` combines or reorders the
    rows of a tensor whose dim 0 has the batch's size along dim 0, else None. Certain for reductions, scans, sorts,
    rolls, flips and gathers over dim 0; not certain (dim 0 may be a position once some dim 0 moved)
    for slices, selections and indexing across rows, and ``a @ b`` with ``a`` a transposed activation."""
    if batch_size is None or batch_size < 2:
        return None
    name = node.name()
    base = name.rstrip("0123456789")
    try:
        if name in _FULL_REDUCTIONS or base in _ALONG_DIMS:
            if _of_parameters_only(node):
                return None
            shape = _node_input_shape(node)
            if not shape or shape[0] != batch_size:
                return None
            dims = None if name in _FULL_REDUCTIONS else getattr(node, _ALONG_DIMS[base], None)
            if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0):
                return True, shape, f"{name} reduces or reorders all of a tensor of shape {shape}"
            dims = [dims] if isinstance(dims, int) else list(dims)
            if any(_signed(int(d)) % len(shape) == 0 for d in dims):
                # a gather or scatter of rows may be a reordering undone later (PackedSequence's sort)
                return base not in _ROW_INDEXING, shape, f"{name} works along dim 0 of a tensor of shape {shape}"
            return None
        if base in ("SliceBackward", "SelectBackward"):
            shape = tuple(int(s) for s in node._saved_self_sym_sizes)
            if not shape or shape[0] != batch_size or _signed(int(node._saved_dim)) % len(shape) != 0:
                return None
            if base == "SliceBackward":
                start, end, step = _signed(int(node._saved_start)), _signed(int(node._saved_end)), int(node._saved_step)
                if step == 1 and start in (0, -batch_size) and end >= batch_size:
                    return None
            return False, shape, f"{name} takes part of dim 0 of a tensor of shape {shape}"
        if base == "IndexBackward":
            shape = tuple(int(s) for s in node._saved_self_sym_sizes)
            indices = list(node._saved_indices)
            if not shape or shape[0] != batch_size or not indices or indices[0] is None:
                return None
            first = indices[0]
            if (
                first.dim() == 1
                and first.shape[0] == batch_size
                and (
                    bool(first.all())
                    if first.dtype == torch.bool
                    else bool(torch.equal(first.cpu(), torch.arange(batch_size)))
                )
            ):
                return None  # every row in place (x[arange(B), j], an all-true mask)
            return False, shape, f"{name} indexes dim 0 of a tensor of shape {shape} with rows of other examples"
        if base in ("MmBackward", "AddmmBackward"):
            self_node = node.next_functions[1 if base == "AddmmBackward" else 0][0]
            sizes = getattr(node, "_saved_self_sym_sizes", None) or getattr(node, "_saved_mat1_sym_sizes", None)
            if (
                self_node is not None
                and sizes is not None
                and int(sizes[-1]) == batch_size
                and not hasattr(self_node, "variable")
                and _moves_dim_zero(self_node)
            ):
                # a 2-D activation with B rows is batch-first (a sequence's rows are B·T)
                return True, (batch_size,), f"{name} contracts a transposed activation's dim 0 (x.T @ y) over the batch"
    except (AttributeError, IndexError, RuntimeError, TypeError, ValueError):
        return False, (), f"{name}, whose saved arguments cannot be read, works along some dim of the batch"
    return None


def _fallback_internals(units: list[Unit]) -> set:
    """Backward nodes created inside fallback calls: reachable from a call's outputs before its inputs."""
    inside: set = set()
    for unit in units:
        if unit.rule is not None:
            continue
        for call in unit.calls:
            inputs = {t.grad_fn for t in tensors_in((call.args, call.kwargs)) if t.grad_fn is not None}
            stack = [t.grad_fn for t in tensors_in(call.output)]
            while stack:
                node = stack.pop()
                if node is None or node in inside or node in inputs:
                    continue
                inside.add(node)
                stack.extend(nxt for nxt, _ in node.next_functions)
    return inside


def audit_graph(
    root: Tensor | list[Tensor],
    units: list[Unit],
    names: dict[int, str],
    *,
    batch_size: int | None = None,
    outputs: list | None = None,
    inputs_moved: bool = False,
) -> GraphAudit:
    """Walk the graph of ``root`` once: parameter uses per ``AccumulateGrad``, dim-0 moves and, with
    ``batch_size``, ops that mix the examples along the batch dim.

    Dim-0 moves inside fallback modules (an RNN or attention going time-major
    internally) do not count: those modules are handled as a whole. An expanded
    output that met a batch-first tensor with another dim of the batch's size
    is ambiguous when some dim 0 moved.

    The model's side of the graph is what the model's ``outputs`` batched on dim 0 are computed
    from (default: the roots themselves; the fast engine passes them, so that the loss's own mean
    over the examples is not the model's). There, an op that combines or reorders the rows of a
    tensor whose dim 0 has the batch's size (:func:`_mixes_batch`: roll, sort, flip, a scan or
    reduction over dim 0, an index or gather across rows, ``h.T @ h``) makes an example's output
    depend on other examples: the batch's backward then has no per-example reading. ``inputs_moved``:
    an op moved a raw input's dim 0 (which the graph does not show).
    """
    with torch._C.DisableTorchFunction():  # the broadcast watcher may be on (observe): read the real tensors
        return _audit_graph(root, units, names, batch_size, outputs, inputs_moved)


def _audit_graph(
    root: Tensor | list[Tensor],
    units: list[Unit],
    names: dict[int, str],
    batch_size: int | None = None,
    outputs: list | None = None,
    inputs_moved: bool = False,
) -> GraphAudit:
    uses: dict[int, int]
    seen, uses, moved = set(), {}, False
    internal = _fallback_internals(units)
    roots = list(root) if isinstance(root, (list, tuple)) else [root]
    model_side: set = set()
    if batch_size is not None:
        model_side = {
            t.grad_fn
            for t in (roots if outputs is None else outputs)
            if isinstance(t, Tensor) and t.grad_fn is not None and t.dim() > 0 and t.shape[0] == batch_size
        }
    checked: set = set()  # model-side nodes looked at for batch mixing
    mixing: list[tuple[bool, tuple, str]] = []  # (certain, shape, what): certain unless dim 0 may not be the batch
    stack = [(t.grad_fn, False) for t in roots]
    reentrant = False
    while stack:
        node, inside = stack.pop()
        if node is None:
            continue
        inside = inside or node in model_side
        first = node not in seen
        if not first and (not inside or node in checked):
            continue
        if inside:
            checked.add(node)
            if node not in internal and (found := _mixes_batch(node, batch_size)) is not None:
                mixing.append(found)
        if first:
            seen.add(node)
            moved = moved or (node not in internal and _moves_dim_zero(node))
            reentrant = reentrant or is_reentrant_checkpoint_node(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)
            if variable is not None and first:
                uses[id(variable)] = uses.get(id(variable), 0) + 1
            stack.append((nxt, inside))
    if reentrant:
        return GraphAudit(REENTRANT_CHECKPOINT, moved)
    if mixing:
        # Where some tensor may be sequence-first (a dim 0 moved, a recurrent or batch_first=False module),
        # dim 0 of a tensor with another dim of the batch's size may be a position: the layout checks decide.
        seq_first = (
            moved
            or inputs_moved
            or any(
                isinstance(u.module, nn.RNNBase) or getattr(u.module, "batch_first", True) is False
                for u in units
                if u.rule is None
            )
        )
        for certain, shape, what in mixing:
            if not seq_first or (certain and batch_size not in shape[1:]):
                return GraphAudit(batch_mixing(what), moved)
    expected: dict[int, int] = {}
    skip: set[int] = set()
    for unit in units:
        reached = sum(1 for call in unit.calls if _reached(call, seen))
        for p in unit.params.values():
            if unit.rule is None:
                skip.add(id(p))  # fallback units: checked by their sum against autograd instead
            expected[id(p)] = expected.get(id(p), 0) + reached
    if moved:
        for unit in units:
            for call in unit.calls:
                if call.batch_dim_ambiguous and _reached(call, seen):
                    return GraphAudit(
                        _ambiguous_expansion(f"module {unit.name or '<root>'}: its output was expanded over the batch"),
                        moved,
                    )
    for pid, count in uses.items():
        if pid in skip or pid not in names:
            continue
        if count != expected.get(pid, 0):
            return GraphAudit(
                Finding(
                    "PARAMETER_USED_OUTSIDE",
                    f"parameter {names[pid]!r} is used {count} "
                    f"time(s) in the graph but its module(s) were called {expected.get(pid, 0)} "
                    "time(s): it is used outside the module that owns it",
                ),
                moved,
            )
    return GraphAudit(None, moved)


def _reached(call: Call, seen: set) -> bool:
    leaves = flat_leaves(call.output)
    return any(isinstance(t, Tensor) and t.grad_fn is not None and t.grad_fn in seen for t in leaves)
