"""Capturing what the fast engine needs during one ordinary forward + backward.

The model is split into *units*: a module with a closed-form rule
(:mod:`.rules`), or the top-most module that owns parameters but has no rule
(a *fallback* unit, which covers its whole subtree). For each call of a unit,
:func:`capturing` records the call's inputs and, through tensor hooks on its
outputs (not ``register_full_backward_hook``, which breaks in-place ops), the
gradients of those outputs. A ``TorchFunctionMode`` watches every op: a
trainable parameter used outside the units that own it (say
``x @ self.embed.weight.T`` in a parent's ``forward``) is a use no rule sees,
so it is reported and the engine is not exact for that model. All hooks are
removed on exit, also on error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .rules import Rule, find_rule

__all__ = ["Unit", "Call", "find_units", "capturing", "NotExact"]


class NotExact(RuntimeError):
    """The fast engine cannot give exact statistics for this model or batch (the message says why)."""


@dataclass(eq=False)
class Call:
    """One call of a unit: its inputs and the gradients of its tensor outputs."""

    args: tuple
    kwargs: dict
    output: Any = None
    out_grads: dict[int, Tensor] = field(default_factory=dict)  # output leaf index → gradient
    broadcast: bool = False  # the input had batch dim 1 and the output was expanded to the batch


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

    def visit(prefix: str, module: nn.Module) -> None:
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not trainable:
            return
        rule = find_rule(module)
        direct = any(p.requires_grad for p in module.parameters(recurse=False))
        if rule is not None or direct:
            units.append(Unit(prefix, module, rule, trainable))
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    return units


#: Ops after which a broadcast (expanded) output is the same tensor, values and shape.
_SAME_VALUE_OPS = {"to", "type_as", "float", "double", "half", "bfloat16", "contiguous"}
#: Elementwise ops whose result is unchanged when a size-1 batch operand is expanded to B.
_BROADCASTING_OPS = {"add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "mul", "__mul__",
                     "__rmul__", "div", "__truediv__", "__rtruediv__"}


def _moves_dim_zero(name: str, args, kwargs) -> bool:
    """Whether an op may move a batch-first tensor's dim 0 elsewhere (transposes, permutes, stacks)."""
    if not args or not isinstance(args[0], (Tensor, list, tuple, str)):
        return False
    first = args[0]
    ndim = first.dim() if isinstance(first, Tensor) else None
    rest = list(args[1:]) + list(kwargs.values())

    def is_zero(d) -> bool:
        return isinstance(d, int) and ndim is not None and d % max(ndim, 1) == 0

    if name in ("transpose", "swapaxes", "swapdims", "transpose_"):
        return any(is_zero(d) for d in rest[:2])
    if name in ("movedim", "moveaxis"):
        return any(is_zero(d) or (isinstance(d, (list, tuple)) and any(is_zero(x) for x in d)) for d in rest[:2])
    if name in ("permute",):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return bool(dims) and not is_zero(dims[0])
    if name in ("t", "T", "mT", "mH", "t_", "adjoint"):
        return ndim == 2
    if name == "stack":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        return dim == 0
    if name == "einsum" and isinstance(first, str):
        spec = first.replace(" ", "")
        if "->" not in spec:
            return True
        inputs, output = spec.split("->")
        return any(not op or not output or op[0] != output[0] for op in inputs.split(","))
    return False


def _tensors_in(args, kwargs):
    for arg in list(args) + list((kwargs or {}).values()):
        for t in (arg if isinstance(arg, (list, tuple)) else (arg,)):
            if isinstance(t, Tensor):
                yield t


class _UseWatcher(TorchFunctionMode):
    """Watches every op of the forward for uses the fast engine's rules would not see.

    - A differentiable use of a trainable parameter outside the units that own it.
    - A use of a broadcast unit's expanded output other than a broadcasting
      elementwise op with a batch-sized operand (the expansion is exact only then).
    The first such use is kept in ``escape``.
    """

    def __init__(self, owners: dict[int, set[int]], names: dict[int, str], active: list[int], batch_size: int):
        super().__init__()
        self.owners, self.names, self.active, self.batch_size = owners, names, active, batch_size
        self.expanded: dict[int, Tensor] = {}  # id → tensor (kept alive so ids are not reused)
        self.escape: str | None = None
        self.batch_dim_moved: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.escape is None:
            tensors = list(_tensors_in(args, kwargs))
            self._check_parameters(func, tensors, out)
            if self.expanded and isinstance(out, Tensor):
                self._check_expanded(func, tensors, out)
        if self.batch_dim_moved is None and not self.active and isinstance(out, Tensor):
            if _moves_dim_zero(getattr(func, "__name__", ""), args, kwargs or {}):
                self.batch_dim_moved = getattr(func, "__name__", str(func))
        return out

    def _check_parameters(self, func, tensors, out) -> None:
        if not (isinstance(out, Tensor) and out.requires_grad) and not (
                isinstance(out, (tuple, list)) and any(isinstance(o, Tensor) and o.requires_grad for o in out)):
            return
        for t in tensors:
            owners = self.owners.get(id(t)) if isinstance(t, nn.Parameter) else None
            if owners is not None and not owners.intersection(self.active):
                self.escape = (f"parameter {self.names[id(t)]!r} is used by "
                               f"{getattr(func, '__name__', func)} outside the module(s) that own it")
                return

    def _check_expanded(self, func, tensors, out) -> None:
        if not any(id(t) in self.expanded for t in tensors):
            return
        name = getattr(func, "__name__", str(func))
        if name in _SAME_VALUE_OPS and isinstance(out, Tensor):
            self.expanded[id(out)] = out
        elif not (name in _BROADCASTING_OPS and isinstance(out, Tensor) and out.dim() > 0
                  and out.shape[0] == self.batch_size
                  and any(id(t) not in self.expanded and t.dim() > 0 and t.shape[0] == self.batch_size
                          for t in tensors)):
            self.escape = (f"a module's output broadcast over the batch (input batch dim of size 1) is used "
                           f"by {name}, which may not treat it as a broadcast")


@contextlib.contextmanager
def capturing(units: list[Unit], model: nn.Module, batch_size: int) -> Iterator[_UseWatcher]:
    """Record unit calls and output gradients, and watch parameter uses, within the block.

    A rule unit called on an input whose dim 0 has size 1 (shared by the batch,
    such as position ids) gets its output expanded to the batch, so that its
    output gradient is per example.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    owners: dict[int, set[int]] = {}
    for index, unit in enumerate(units):
        for p in unit.params.values():
            owners.setdefault(id(p), set()).add(index)
    active: list[int] = []
    handles = []

    def pre_hook(index):
        def hook(module, args, kwargs):
            active.append(index)
        return hook

    def post_hook(index):
        def hook(module, args, kwargs, output):
            active.pop()
            broadcast = (units[index].rule is not None and batch_size > 1 and isinstance(output, Tensor)
                         and args and isinstance(args[0], Tensor) and args[0].dim() > 0 and args[0].shape[0] == 1
                         and output.dim() > 0 and output.shape[0] == 1)
            if broadcast:
                output = output.expand(batch_size, *output.shape[1:])
                watcher.expanded[id(output)] = output
            call = Call(args, kwargs, output, broadcast=broadcast)
            units[index].calls.append(call)
            leaves, _ = tree_flatten(output)
            for leaf_index, leaf in enumerate(leaves):
                if isinstance(leaf, Tensor) and leaf.requires_grad:
                    leaf.register_hook(_store_grad(call, leaf_index))
            return output if broadcast else None
        return hook

    watcher = _UseWatcher(owners, names, active, batch_size)
    try:
        for index, unit in enumerate(units):
            handles.append(unit.module.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
            handles.append(unit.module.register_forward_hook(post_hook(index), with_kwargs=True))
        with watcher:
            yield watcher
    finally:
        for h in handles:
            h.remove()


def _store_grad(call: Call, leaf_index: int):
    def hook(grad: Tensor) -> None:
        previous = call.out_grads.get(leaf_index)
        call.out_grads[leaf_index] = grad if previous is None else previous + grad
    return hook
