"""The torch-function modes that watch the forward for what the autograd graph does not show.

- :class:`_BroadcastWatcher`: a rule module's output expanded over the batch (its input had no batch dim, or
  one of size 1: ``self.pos(torch.arange(T))``) may only meet batched tensors in broadcasts that cannot change
  a value; outputs whose dim 0 has the batch's size by coincidence are watched for uses that treat it as a
  position.
- :class:`_DimMoveWatcher`: the first op outside every unit that moves a raw input's dim 0.
- :class:`_UserCodeWatcher`: gradient hooks that rewrite an activation's gradient, terms of the loss read off
  activations other than the output (``observe``), frozen activations computed from the inputs, rows of raw
  inputs mixed across examples, and the first random call of the forward.

They only collect evidence (:class:`persample.contract.Finding`); the engines decide.
"""

from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..._batch import flat_leaves, tensors_in
from ..._model import random_call
from ...contract import Finding
from .units import Call, _storage, probe_running
from .places import _FLATTENING_OPS, _TRANSPOSING_OPS, Place, carried, made


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


#: Ops that only rearrange (or repeat, by a broadcast) one tensor's elements: applied to each example of an
#: expansion with their dims moved past the batch dim (:func:`_per_example`), they give the expansion of their
#: result on the original, and the batch's gradient reaches the expansion example by example.
_SHAPE_OPS = frozenset(
    {
        "permute",
        "transpose",
        "swapaxes",
        "swapdims",
        "unsqueeze",
        "squeeze",
        "view",
        "reshape",
        "flatten",
        "unflatten",
        "movedim",
        "moveaxis",
        "narrow",
        "select",
        "__getitem__",
        "expand",
        "expand_as",
        "broadcast_to",
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
    #: computed from parameters and constants alone (a relative-position bucket index into an Embedding),
    #: so that none of the original's dims can hold the batch: shape ops may then rearrange it per example
    constant: bool = False


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


def _per_example(name: str, args, kwargs, entry: _Expansion, batch_size: int, watcher) -> tuple[Tensor, bool] | None:
    """Shape op ``name`` (``args[0]`` is ``entry.tensor``) applied to each example of the expansion: the op's
    dims on the original moved one past the batch dim, on the expansion in new-dim form E (B, *original).
    Returns (result, batched): result is (B, *op(original).shape) with example i's row op(E_i), or, where
    ``batched``, op(original) itself with dim 0 broadcast to the batch example by example (an expand of
    the original's new or size-1 dim 0 to B). None where the arguments are not plain ints, sizes or basic
    indices (a tensor index, another expansion, a dtype)."""
    o = entry.original
    n = o.dim()
    tensor = entry.tensor
    e = tensor if tensor.dim() == n + 1 else tensor.unsqueeze(1)  # new-dim form (B, *o.shape)
    rest = [*args[1:], *kwargs.values()]
    if any(id(t) in watcher.expanded for t in rest if isinstance(t, Tensor)):
        return None

    def dim(d, rank=n) -> int | None:
        if not _is_dim(d) or rank == 0 or not -rank <= d < rank:
            return None
        return d % rank + 1

    def dims_of(values, rank=n) -> list[int] | None:
        flat = values[0] if len(values) == 1 and isinstance(values[0], (list, tuple)) else values
        moved = [dim(d, rank) for d in flat]
        return None if any(d is None for d in moved) else moved  # type: ignore[return-value]

    def sizes_of(values) -> list[int] | None:
        flat = values[0] if len(values) == 1 and isinstance(values[0], (list, tuple, torch.Size)) else values
        return list(flat) if all(_is_dim(s) for s in flat) else None

    if name == "permute":
        moved = dims_of(rest)
        return None if moved is None or len(moved) != n else (e.permute(0, *moved), False)
    if name in ("transpose", "swapaxes", "swapdims"):
        moved = dims_of(rest)
        return None if moved is None or len(moved) != 2 else (e.transpose(*moved), False)
    if name == "unsqueeze":
        d = dim(rest[0], n + 1) if len(rest) == 1 else None
        return None if d is None else (e.unsqueeze(d), False)
    if name == "squeeze":
        if not rest:
            return e.squeeze(tuple(i + 1 for i, s in enumerate(o.shape) if s == 1)), False
        moved = dims_of(rest)
        return None if moved is None else (e.squeeze(tuple(moved)), False)
    if name in ("view", "reshape"):
        sizes = sizes_of(rest)
        return None if sizes is None else (e.reshape(batch_size, *sizes), False)
    if name == "flatten":
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        first, last = dim(start), dim(end)
        return None if first is None or last is None else (e.flatten(first, last), False)
    if name == "unflatten":
        d = dim(rest[0]) if len(rest) == 2 else None
        sizes = sizes_of([rest[1]]) if d is not None else None
        return None if d is None or sizes is None else (e.unflatten(d, sizes), False)
    if name in ("movedim", "moveaxis"):
        if len(rest) != 2:
            return None
        source, destination = (dims_of([r]) for r in rest)
        return None if source is None or destination is None else (e.movedim(source, destination), False)
    if name in ("narrow", "select"):
        d = dim(rest[0]) if len(rest) == (3 if name == "narrow" else 2) else None
        if d is None or not all(_is_dim(v) for v in rest[1:]):
            return None
        return (e.narrow(d, *rest[1:]) if name == "narrow" else e.select(d, rest[1])), False
    if name == "__getitem__":
        index = rest[0] if len(rest) == 1 else None
        index = index if isinstance(index, tuple) else (index,)
        if not all(i is None or i is Ellipsis or isinstance(i, slice) or _is_dim(i) for i in index):
            return None
        if any(
            isinstance(i, slice) and not all(v is None or _is_dim(v) for v in (i.start, i.stop, i.step)) for i in index
        ):
            return None
        return e[(slice(None),) + index], False
    if name in ("expand", "expand_as", "broadcast_to"):
        if name == "expand_as":
            sizes = list(rest[0].shape) if len(rest) == 1 and isinstance(rest[0], Tensor) else None
        else:
            sizes = sizes_of([v for v in rest if not isinstance(v, bool)])  # expand(*sizes, implicit=False)
        if sizes is None:
            return None
        if sizes and sizes[0] == batch_size and len(sizes) == n + 1:  # a new dim 0 broadcast to the batch
            return e.expand(batch_size, *sizes[1:]), True
        if sizes and sizes[0] == batch_size and len(sizes) == n and n > 0 and o.shape[0] == 1:  # dim 0 of size 1
            return e.squeeze(1).expand(*sizes), True
        return e.expand(batch_size, *sizes), False
    return None


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
    gradient are not), except the result of an elementwise op with a tensor of
    its shape batched on dim 0 (an activation or an input with no other place
    for the batch; RoFormer's ``word + token_type`` embeddings): there the
    suspect's dim 0 is the batch's, and the result an activation like any
    other (the suspect itself stays watched); ops inside rule-less modules are
    theirs (vmapped alone over dim 0 and checked by their sum, as the graph
    audit treats them).
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
        #: whether a tensor may carry the batch's data (an activation, an input, a frozen result of one); set
        #: by the capture, which knows the inputs. Until then every tensor may.
        self.batch_dependent: Callable[[Tensor], bool] = lambda t: True
        #: whether a tensor holds the batch on dim 0 alone (no other place known); set by the capture
        self.batch_first: Callable[[Tensor], bool] = lambda t: False

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
    def watch_expansion(self, tensor: Tensor, original: Tensor, label: str, call: Call, constant: bool = False) -> None:
        self.expanded[id(tensor)] = _Expansion(tensor, original, label, (call,), constant)

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
            return self._derived(
                func(*args, **kwargs), self._original_result(func, args, kwargs), expansions, name, operands
            )
        if name in _SHAPE_OPS and args and id(args[0]) in self.expanded and self.expanded[id(args[0])].constant:
            return self._rearranged(func, name, args, kwargs, operands, expansions)
        in_place = name in _IN_PLACE_BROADCASTING_OPS and not (args and id(args[0]) in self.expanded)
        if name in _BROADCASTING_OPS or in_place:
            verdict = self._broadcast_verdict(name, operands)
            if verdict == "batched":
                return func(*args, **kwargs)
            if verdict == "expanded" and not in_place:
                return self._derived(
                    func(*args, **kwargs), self._original_result(func, args, kwargs), expansions, name, operands
                )
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

    def _rearranged(self, func, name: str, args, kwargs, operands: list[Tensor], expansions: list[_Expansion]):
        """A shape op on a constant expansion E of ``original`` (``permute``, ``unsqueeze``, basic indexing,
        ``view``, ``expand``...): the op applied to each example, E_i ↦ op(E_i), which has the values of
        op(original) and routes the gradient of example i to E_i. Its result is an expansion again, or batched
        outright where the op itself broadcasts the original's new or size-1 dim 0 to the batch (MPNet's
        ``bias.expand(B, -1, T, T)``); anything else escapes. Only constant expansions (computed from
        parameters and constants alone): a dim of an original computed from the batch's activations may
        hold the batch (OPT's rows of B·T tokens, a sequence-first tensor), which a rearrangement would
        bring to dim 0 under the expansion's."""
        entry = self.expanded[id(args[0])]
        original = self._original_result(func, args, kwargs)
        if not isinstance(original, Tensor):  # .shape-like results come from the original
            return original
        try:
            found = _per_example(name, args, kwargs, entry, self.batch_size, self)
        except (RuntimeError, TypeError, IndexError, ValueError):  # arguments the original took, read otherwise
            found = None
        if found is None:
            self._escape(
                expansions, f"{name} with these arguments is not one the engine can apply to each example of it"
            )
            return original
        out, batched = found
        if batched:
            if tuple(out.shape) != tuple(original.shape):
                self._escape(
                    expansions, f"{name} gives shape {tuple(out.shape)} per example, not {tuple(original.shape)}"
                )
                return original
            self._note_ambiguous(tuple(out.shape), [entry])
            return out
        if tuple(out.shape) != (self.batch_size, *original.shape):
            self._escape(expansions, f"{name} does not keep it an expansion over the batch")
            return original
        if original.dim() > 0 and original.shape[0] == 1:
            out = out.squeeze(1)  # the expansion along the original's dim 0 of size 1, as broadcasts expect
        return self._derived(out, original, expansions, name, operands)

    def _note_ambiguous(self, shape: tuple, entries: list[_Expansion]) -> None:
        """A batched result from an expansion: where another of its dims has the batch's size, a raw input
        whose dim 0 moved may have lined up with it (see :func:`..audit._ambiguous_expansion`)."""
        if self.batch_size in tuple(shape[1:]):
            for entry in entries:
                self.ambiguous.append(entry.label)
                for call in entry.calls:
                    call.batch_dim_ambiguous = True

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
            self._note_ambiguous(tuple(shape), [self.expanded[id(t)] for t in operands if id(t) in self.expanded])
            return "batched"
        if all(t.dim() < rank or t.shape[0] == 1 for t in partners) and _is_expansion_of(shape, original, batch):
            return "expanded"
        return f"{name} combines it with no tensor batched on dim 0 (result {tuple(shape)})"

    def _derived(self, out, original, expansions: list[_Expansion], name: str, operands: list[Tensor]):
        """``out`` computed from expansions: watched as an expansion of ``original`` when it is one (a
        constant one when the expansions are and its other operands cannot carry the batch's data)."""
        if (
            isinstance(out, Tensor)
            and isinstance(original, Tensor)
            and _is_expansion_of(out.shape, original.shape, self.batch_size)
        ):
            calls = tuple(call for entry in expansions for call in entry.calls)
            constant = all(entry.constant for entry in expansions) and not any(
                self.batch_dependent(t) for t in operands if id(t) not in self.expanded
            )
            self.expanded[id(out)] = _Expansion(out, original, expansions[0].label, calls, constant)
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
        if name in _BROADCASTING_OPS or name in _IN_PLACE_BROADCASTING_OPS:
            # met elementwise by a tensor batched on dim 0 of the result's shape: the suspect's dim 0 lines up
            # with that batch dim (no wider operand, checked above), so the result is an activation like any
            results = [r for r in results if not self._meets_batch(r, operands, watched)]
        for r in results:
            if id(r) not in self.suspects:
                self.watch_suspect(r, label)

    def _meets_batch(self, r: Tensor, operands: list[Tensor], watched: list[Tensor]) -> bool:
        """Whether an operand other than the suspects has ``r``'s shape, carries the batch's data and holds
        the batch on dim 0 alone (an activation with no other place, or the inputs)."""
        return r.shape[0] == self.batch_size and any(
            all(t is not s for s in watched)
            and id(t) not in self.suspects
            and id(t) not in self.expanded
            and t.shape == r.shape
            and self.batch_dependent(t)
            and self.batch_first(t)
            for t in operands
        )


def _in_place_name(name: str) -> bool:
    """A torch method that writes into its first argument (``add_``, ``copy_``, ``masked_fill_``)."""
    return name.endswith("_") and not name.endswith("__")


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
        #: the same for raw tensors of B·k token rows (k > 1, a flattened batch: an MoE's routing mask):
        #: row count → the first op that mixed them on the way to the loss (capture: refused where some
        #: unit call is on that many token rows, units.token_rows); and their tainted results
        self.token_mixed: dict[int, str] = {}
        self.token_tainted: dict[int, tuple] = {}
        self.tainted: dict[int, tuple] = {}  # id → (weak reference, what): raw tensors whose rows were mixed
        self.random: str | None = None  # the first call of the forward that drew random numbers
        self.rewritten: str | None = None  # where the first rewriting hook was registered
        self.outputs: set[int] | None = None  # ids of the model's output tensors, once the forward returned
        self.after_forward: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # results of later ops
        self.aux_term: str | None = None  # where a later op read an activation whose term reached the backward
        self.placed: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id → tensor with a place
        self.places: dict[int, Place] = {}  # id → its place (see .places), valid while ``placed`` holds it

    def watch_loss(self, outputs: list) -> None:
        self.outputs = {id(t) for t in outputs if isinstance(t, Tensor)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _REGISTER_HOOK and getattr(args[0] if args else None, "grad_fn", None) is not None:
            hook = args[1] if len(args) > 1 else kwargs.pop("hook")
            where = f"a tensor of shape {tuple(args[0].shape)} at {_caller_outside_torch()}"
            args = (args[0], _RewriteReporter(hook, self, where))
        mixing = token_mixing = None
        if self.outputs is None:
            name = getattr(func, "__name__", None)
            if self.mixed is None and self.batch_size > 1 and name in _RAW_MIXING:
                mixing = _mixes_raw_rows(name, args, kwargs, self.batch_size)
            if self.batch_size > 1 and name in _RAW_MIXING:
                token_mixing = _mixes_token_rows(name, args, kwargs, self.batch_size)
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
            if self.batch_size > 1:
                self._follow_places(func, args, kwargs, out)
            if token_mixing is not None or self.token_tainted:
                with torch._C.DisableTorchFunction():
                    self._follow_token_mixing(token_mixing, args, kwargs, out)
        return out

    def place_of(self, t) -> Place | None:
        """Where ``t`` holds the batch when not on dim 0 alone (:mod:`.places`), or None."""
        return self.places.get(id(t)) if self.placed.get(id(t)) is t else None

    def set_place(self, t: Tensor, place: Place) -> None:
        self.placed[id(t)] = t
        self.places[id(t)] = place

    def _follow_places(self, func, args, kwargs, out) -> None:
        """Note the place of a flattening or a transpose of a tensor batched on dim 0, and carry places
        through elementwise ops (:func:`.places.made`, :func:`.places.carried`)."""
        name = getattr(func, "__name__", None)  # no place-making op is a property (_op_name's __get__ case)
        if not self.placed and name not in _FLATTENING_OPS and name not in _TRANSPOSING_OPS:
            return  # the common case: nothing placed yet, and not an op that places
        name = name or ""
        if self.placed and (name == "__setitem__" or name in _IN_PLACE_BROADCASTING_OPS or _in_place_name(name)):
            with torch._C.DisableTorchFunction():
                self._mutated(name, args, kwargs)
            return
        if self.placed and isinstance(kwargs.get("out"), Tensor):  # torch.add(a, b, out=h) writes into h
            with torch._C.DisableTorchFunction():
                self._mutated("out=", (kwargs["out"],), {})
            return
        if name in _FLATTENING_OPS or name in _TRANSPOSING_OPS:
            with torch._C.DisableTorchFunction():
                place = made(name, args, out, self.batch_size, self._batched)
        elif self.placed and (
            name in _SAME_VALUE_OPS
            or name in _BROADCASTING_OPS
            or name in _IN_PLACE_BROADCASTING_OPS
            or name == "dropout"
        ):
            with torch._C.DisableTorchFunction():
                place = carried(_operands(args, kwargs), out, self.place_of)
        else:
            return
        if place is not None:
            self.set_place(out, place)

    def _mutated(self, name: str, args, kwargs) -> None:
        """An op wrote into ``args[0]``: every placed tensor sharing its storage loses its place (its rows
        may now hold other examples' values), unless the op is elementwise and carries the place
        (``h += bias``, ``relu_``)."""
        target = args[0] if args else None
        if not isinstance(target, Tensor):
            return
        place = self.place_of(target)
        elementwise = name in _IN_PLACE_BROADCASTING_OPS or name.rstrip("_") in _SAME_VALUE_OPS
        if place is not None and elementwise and carried(_operands(args, kwargs), target, self.place_of) == place:
            return
        storage = _storage(target)
        for key, t in list(self.placed.items()):
            if t is target or (storage is not None and _storage(t) == storage):
                self.placed.pop(key, None)

    def _batched(self, t: Tensor) -> bool:
        """Whether ``t`` (dim 0 of the batch's size) is batched there: an activation or the inputs'."""
        return t.grad_fn is not None or self.from_inputs(t)

    def _follow_token_mixing(self, mixing: tuple[int, str] | None, args, kwargs, out) -> None:
        """:meth:`_follow_mixing` for raw tensors of token rows: ``mixing`` is (row count, what)."""
        found = _follow_taint(self.token_tainted, mixing, args, kwargs, out)
        if found is not None:
            self.token_mixed.setdefault(*found)

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
        found = _follow_taint(self.tainted, mixing, args, kwargs, out)
        if found is not None:
            self.mixed = found

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


def _follow_taint(tainted: dict, mixing: Any, args, kwargs, out) -> Any:
    """One op of the taint that mixed rows leave on tensors without grad: ``mixing`` (what mixed them,
    found at this op) or the taint of an operand in ``tainted`` (id → (weakref, what)). Returned where
    it reaches a result that requires grad (the differentiable forward); else the results carry it on
    and None is returned."""
    if mixing is None:
        for t in _operands(args, kwargs):
            entry = tainted.get(id(t))
            if entry is not None and entry[0]() is t:
                mixing = entry[1]
                break
        if mixing is None:
            return None
    results = tensors_in(out)
    if any(r.requires_grad for r in results):
        return mixing
    for r in results:
        tainted[id(r)] = (weakref.ref(r), mixing)
    return None


def _mixes_raw_rows(name: str, args, kwargs, batch_size: int) -> str | None:
    """Where op ``name`` combines or reorders the rows of a tensor that does not require grad (a raw
    input: no backward node shows it) and whose dim 0 has the batch's size, along dim 0. Integer and
    boolean tensors count too: indices derived from the inputs (position ids from a cumsum of the padding
    mask) that mix the examples reach the differentiable forward through an embedding."""
    t = args[0] if args else None
    if not isinstance(t, Tensor) or t.requires_grad or t.dim() == 0 or t.shape[0] != batch_size:
        return None
    position, keyword, default = _RAW_MIXING[name]
    if name == "__getitem__":
        if t.layout == torch.strided and t.stride(0) == 0:
            return None  # an expansion over dim 0 (Qwen3.5's position ids[1:]): its rows are one row, no example's
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
        if name in ("gather", "index_select") and _rows_in_place(name, args, kwargs, t, batch_size):
            return None  # DeBERTa's own loss: the labelled rows of the labels, all of them
        return f"{name} along dim 0 of a tensor of shape {tuple(t.shape)} that does not require grad (an input?)"
    return None


def _mixes_token_rows(name: str, args, kwargs, batch_size: int) -> tuple[int, str] | None:
    """(B·k, what) where op ``name`` combines or reorders along dim 0 the rows of a tensor that does not
    require grad and has B·k rows, k > 1 (token rows of a flattened batch: an MoE's routing mask, whose
    cumsum over the tokens is an expert capacity counted over the whole batch), else None."""
    t = args[0] if args else None
    if not isinstance(t, Tensor) or t.requires_grad or t.dim() == 0:
        return None
    rows = t.shape[0]
    if rows <= batch_size or rows % batch_size:
        return None
    what = _mixes_raw_rows(name, args, kwargs, rows)
    return None if what is None else (rows, what)


def _rows_in_place(name: str, args, kwargs, t: Tensor, batch_size: int) -> bool:
    """Whether ``gather(t, 0, index)`` or ``index_select(t, 0, index)`` reads row i of ``t`` into row i of
    its result, for every i (the index is ``arange(B)``, broadcast along the other dims for ``gather``)."""
    index = args[2] if len(args) > 2 else kwargs.get("index")
    if (
        not isinstance(index, Tensor)
        or index.dtype not in (torch.int64, torch.int32)
        or index.shape[:1] != (batch_size,)
    ):
        return False
    if name == "index_select":
        return index.dim() == 1 and bool(torch.equal(index.cpu(), torch.arange(batch_size, dtype=index.dtype)))
    if index.dim() != t.dim():
        return False
    rows = torch.arange(batch_size, dtype=index.dtype).view(batch_size, *[1] * (t.dim() - 1))
    return bool(torch.equal(index.cpu(), rows.expand(index.shape)))


class RandomCallStopped(Exception):
    """The forward was stopped at its first random call, before it drew (``capturing(stop_random=True)``)."""


class _ReachReporter:
    """A tensor hook noting that the backward reached a term that read an activation (gradient ≠ 0)."""

    __slots__ = ("watcher", "where")

    def __init__(self, watcher: _UserCodeWatcher, where: str):
        self.watcher, self.where = watcher, where

    def __call__(self, grad):
        if probe_running():
            return
        if self.watcher.aux_term is None and bool((grad != 0).any()):
            self.watcher.aux_term = self.where


class _RewriteReporter:
    """A user's tensor hook, unchanged in effect, that tells its watcher when it rewrites a gradient."""

    __slots__ = ("hook", "watcher", "where")

    def __init__(self, hook, watcher: _UserCodeWatcher, where: str):
        self.hook, self.watcher, self.where = hook, watcher, where

    def __call__(self, grad):
        if probe_running():  # the graph audit's probe: not a gradient of the batch's loss
            return None
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
