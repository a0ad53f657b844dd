"""Where a tensor holds the batch when dim 0 alone is not it: flattenings and sequence-first tensors.

Two shapes of model code hand a rule layer an input whose dim 0 is not the batch of B examples, yet
whose rows are each one example's:

- a **flattening**: ``h.reshape(-1, D)`` of a batch-first ``h`` of shape ``(B, *positions, D)`` (OPT's
  decoder layer runs its LayerNorm, fc1 and fc2 on ``(B·T, D)`` and views the result back). Row-major
  order puts example i's rows at ``i·k … (i+1)·k − 1`` for any reshape whose dim 0 is ``k·B``:
  :class:`Place` ``(positions=...)``;
- a **sequence-first** tensor: ``h.transpose(0, d)`` of a batch-first ``h`` (``batch_first=False``
  layers, ``(T, B, D)``): example i is the slice ``i`` of dim ``d``: :class:`Place` ``(dim=d)``.

The user-code watcher (:class:`.watchers._UserCodeWatcher`) sees every op of the forward and notes a
place where such an op makes one from a tensor batched on dim 0 (an activation, or the model's inputs):
:func:`made`. Elementwise ops carry it (:func:`carried`) when every operand with a place has the same place
and shape as the result and no other operand reaches the batch's dim with a size other than 1 (a bias, a
position table broadcast over the batch). A rule that computes each row of its input's leading dims alone
(``Rule.feature_dims``: Linear, Conv1D, LayerNorm, RMSNorm, Embedding) called on a placed input, with the
batch among those leading dims, reads example i's rows where the place says (:func:`batch_first`) and its
output has the same place (:func:`through_rule`); MultiheadAttention with ``batch_first=False`` keeps a
query batched on dim 1 batched on dim 1 (:func:`output_place`). Any other op gives no place: its
result, handed to a rule, is what it was before (an input without batch dim, expanded and watched). An op
that writes into a placed tensor or a view of its storage takes the place away unless it carries it.

Where the place cannot be vouched for, nothing changes. What happens to a placed call's output after the
call (a flattening viewed back as ``(T, B, D)``, rows rolled or summed across examples) is the graph
audit's: with a placed call it always probes the rows (:func:`.audit.rows_leak`, which reads placed
tensors by their place) and it names ops along a dim that may hold the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

__all__ = ["Place", "batch_first", "made", "carried", "through_rule", "output_place"]


@dataclass(frozen=True)
class Place:
    """The batch of a tensor whose dim 0 is not (only) the batch.

    ``positions`` (a flattening): dim 0 is ``B · prod(positions)``, example i's rows are ``i·k … (i+1)·k − 1``
    (k = prod(positions)), as ``reshape`` of a ``(B, *positions, ...)`` tensor lays them out. Else ``dim``
    (≥ 1): the batch is that dim (a sequence-first tensor)."""

    positions: tuple[int, ...] = ()
    dim: int = 0

    @property
    def axis(self) -> int:
        """The dim that holds (part of) the batch."""
        return self.dim

    def describe(self) -> str:
        if self.positions:
            return f"a flattening of (B, {', '.join(map(str, self.positions))}, ...) over dim 0"
        return f"batched on dim {self.dim}"


def batch_first(t: Tensor, place: Place, batch_size: int) -> Tensor:
    """``t`` (a placed call's input or output gradient) with example i at index i of dim 0:
    ``(B·k, *rest)`` → ``(B, *positions, *rest)``; a batch on dim d moved to dim 0 (the other dims keep
    their order: a row-wise rule sums over them)."""
    if place.positions:
        return t.reshape(batch_size, *place.positions, *t.shape[1:])
    return t.movedim(place.dim, 0)


_FLATTENING_OPS = frozenset({"reshape", "view", "flatten"})
_TRANSPOSING_OPS = frozenset({"transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "permute"})


def made(name: str, args: tuple, out, batch_size: int, batched: Callable[[Tensor], bool]) -> Place | None:
    """The place of ``out`` where op ``name`` made one from a tensor batched on dim 0 (``batched``):
    a reshape whose dim 0 is a multiple k·B of the batch's size (``(B, T, D)`` → ``(B·T, D)``: example i's
    rows are i·k … (i+1)·k − 1), or a transpose, swap or move of dim 0 (``(B, T, D)`` → ``(T, B, D)``)."""
    t = args[0] if args else None
    if (
        not isinstance(t, Tensor)
        or not isinstance(out, Tensor)
        or t.dim() < 2
        or t.shape[0] != batch_size
        or out.dim() == 0
        or out.shape[0] == batch_size
        or not batched(t)
    ):
        return None
    shape, result = tuple(t.shape), tuple(out.shape)
    if name in _FLATTENING_OPS:
        # Row-major order: element e of t belongs to example e // prod(shape[1:]). When out's dim 0 is k·B,
        # each of out's rows holds prod(shape[1:]) / k elements of one example, and example i's are rows
        # i·k … (i+1)·k − 1, whatever the other dims. Where the reshape merges dim 0 with whole dims
        # (B, T, D) → (B·T, D), the positions are those dims (the rule's layout checks see them).
        if out.dtype != t.dtype or out.numel() != t.numel() or result[0] % batch_size != 0:
            return None
        k = result[0] // batch_size
        merged = t.dim() - out.dim() + 1  # where dims 0 … merged-1 of t become dim 0 of out
        if 1 < merged <= t.dim() and result[1:] == shape[merged:] and math.prod(shape[1:merged]) == k:
            return Place(positions=shape[1:merged])
        return Place(positions=(k,))
    if name in _TRANSPOSING_OPS and out.dim() == t.dim():
        d = _where_dim_zero_goes(name, args, t.dim())
        if d is None or d == 0 or result[d] != batch_size:
            return None
        return Place(dim=d)
    return None


def _where_dim_zero_goes(name: str, args: tuple, ndim: int) -> int | None:
    """The dim of the result that a tensor's dim 0 goes to, read off the op's own dim arguments
    (``transpose(0, d)``, ``movedim(0, d)``, ``permute(dims)``); None where they cannot be read."""
    rest = args[1:]
    if not rest:
        return None
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if not all(_is_int(d) for d in dims) or len(dims) != ndim:
            return None
        normal = [d % ndim for d in dims]
        return normal.index(0) if sorted(normal) == list(range(ndim)) else None
    if len(rest) < 2 or not _is_int(rest[0]) or not _is_int(rest[1]):
        return None
    first, second = rest[0] % ndim, rest[1] % ndim
    if name in ("movedim", "moveaxis"):
        return second if first == 0 else None
    if first == 0:
        return second
    return first if second == 0 else None


def _is_int(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool)


def carried(operands: list[Tensor], out, place_of: Callable[[Tensor], Place | None]) -> Place | None:
    """The place of an elementwise op's result ``out`` (same value ops, broadcasting arithmetic): that of
    its placed operands when they all have the same one and the result's shape, and no other operand
    reaches the batch's dim with a size other than 1."""
    if not isinstance(out, Tensor):
        return None
    places = [(t, place_of(t)) for t in operands]
    found = {p for _, p in places if p is not None}
    if len(found) != 1:
        return None
    place = found.pop()
    rank, axis = out.dim(), place.axis
    for t, p in places:
        if p is not None:
            if t.shape != out.shape:
                return None
            continue
        offset = rank - t.dim()
        if offset < 0 or (axis >= offset and t.shape[axis - offset] != 1):
            return None
    return place


def through_rule(rule, module: nn.Module, x: Tensor, place: Place | None) -> Place | None:
    """``place`` where ``rule`` computes each row of ``x``'s leading dims alone (``Rule.feature_dims``)
    and the batch is one of them: the call then reads example i's rows there, and its output has the
    same place; else None."""
    if place is None or rule is None or rule.feature_dims is None or rule.whole_call:
        return None
    leading = x.dim() - rule.feature_dims(module)
    if place.axis >= leading:
        return None
    return place


def output_place(rule, module: nn.Module, x: Tensor, place: Place | None) -> Place | None:
    """The place of a whole-call rule's first output: ``nn.MultiheadAttention(batch_first=False)`` maps
    a query ``(T, B, E)`` batched on dim 1 to an output batched on dim 1 (its rule reads it so)."""
    if (
        place is not None
        and rule is not None
        and rule.whole_call
        and isinstance(module, nn.MultiheadAttention)
        and not module.batch_first
        and x.dim() == 3
        and place == Place(dim=1)
    ):
        return place
    return None
