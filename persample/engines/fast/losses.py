"""Per-example losses of standard PyTorch losses, without ``vmap``.

The contract is L_i = loss_fn(output_i[None], target_i[None]) with the loss's
own (mean) reduction over that one example. For the standard losses that is a
closed form of ``reduction="none"``:

- cross-entropy / NLL with class-index targets: L_i = Σ_t ℓ_it / Σ_t w_{y_it}
  over the example's positions t, where w is the class weight (1 without
  weights) and ignored targets have weight 0 (an example with only ignored
  targets gets NaN, as the loss itself gives);
- MSE, L1, BCE-with-logits: the mean over the example's elements.

``loss_fn`` is recognised by *tracing* one call of it on the batch under a
``TorchFunctionMode``: it qualifies when its tensor operations are one call of a
standard loss with mean reduction, whose result it returns unchanged, on the
model's output (or one of its tensors) and the targets, or on views of them that
keep each example's numbers together (below). The standard loss itself is never
evaluated there, and the trace stops at the first other operation. This covers
``F.cross_entropy``, ``nn.CrossEntropyLoss(...)`` and plain wrappers such as
``lambda out, y: F.cross_entropy(out, y)`` alike, and the language-model loss
``F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())``.
Anything else (other operations, other reductions, options with other
semantics) returns None and the engine falls back to ``vmap`` over ``loss_fn``.

The views, given the batch size B: a tensor of the output or targets with B on
dim 0 holds example i's numbers in the i-th of B equal blocks of its row-major
order. An index whose first entry is ``:`` (``logits[:, :-1]``, ``h[:, -1]``)
keeps that, and so does a ``transpose`` or ``permute`` that leaves dim 0 in
place, and any reshape (``flatten``, ``reshape``, ``view``, ``contiguous``, a
dtype cast), which keeps the (logical) row-major order: a result with
B·k rows has example i's numbers in rows i·k … i·k + k − 1. The loss's input and
target must have the same k; then L_i is the loss's own reduction over example
i's rows, which is ``loss_fn`` on example i alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..._batch import flat_leaves

__all__ = ["closed_form_losses", "example_weights", "standard_losses", "traced_standard_loss", "StandardLoss"]

#: The standard losses with a closed form here, and their kind.
_STANDARD: dict[Callable[..., Tensor], str] = {
    F.cross_entropy: "ce",
    F.nll_loss: "nll",
    F.mse_loss: "mse",
    F.l1_loss: "l1",
    F.binary_cross_entropy_with_logits: "bce",
}
_SIGNATURES = {function: inspect.signature(function) for function in _STANDARD}
#: Each standard loss's parameter names in order, and its defaults: binding a call by these costs a tenth of
#: ``Signature.bind`` (every parameter of these functions is positional-or-keyword).
_NAMES = {function: tuple(signature.parameters) for function, signature in _SIGNATURES.items()}
_DEFAULTS = {
    function: {name: p.default for name, p in signature.parameters.items() if p.default is not p.empty}
    for function, signature in _SIGNATURES.items()
}


def _bound_arguments(function: Callable, args: tuple, kwargs: dict) -> dict:
    """``{parameter: value}`` of one call of a standard loss, defaults included, as
    ``Signature.bind(...).apply_defaults()`` gives it (which a call that does not bind raises through)."""
    names = _NAMES[function]
    if len(args) <= len(names) and all(key in names[len(args) :] for key in kwargs):
        arguments = {**_DEFAULTS[function], **dict(zip(names, args)), **kwargs}
        if len(arguments) == len(names):
            return arguments
    bound = _SIGNATURES[function].bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


#: Queries that read a tensor's metadata and compute nothing: allowed around the loss call.
_METADATA = frozenset(
    {
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        # descriptors at run time; the stubs type them as their values
        torch.Tensor.shape.__get__,  # type: ignore[attr-defined]
        torch.Tensor.dtype.__get__,  # type: ignore[attr-defined]
        torch.Tensor.device.__get__,
        torch.Tensor.ndim.__get__,  # type: ignore[attr-defined]
    }
)


#: Operations that reshape a tensor or cast its dtype without changing the row-major order of its numbers.
_ORDER_KEEPING = frozenset(
    {
        torch.Tensor.flatten,
        torch.flatten,
        torch.Tensor.reshape,
        torch.reshape,
        torch.Tensor.view,
        torch.Tensor.contiguous,
        torch.Tensor.float,
        torch.Tensor.double,
        torch.Tensor.to,
    }
)


class StandardLoss:
    """One traced call of a standard loss: its function, input, target and keyword options, and ``rows``:
    the rows of the input (and target) per example (1: the output's or targets' own layout; 0: input and
    target are not the output's and the targets' own tensors or grouped views of them, alike).
    ``source``: the tensor of the output that the input is (or is a view of), where ``rows`` is set."""

    def __init__(self, function: Callable, arguments: dict):
        self.function, self.kind = function, _STANDARD[function]
        self.input, self.target = arguments.pop("input"), arguments.pop("target")
        self.options = arguments
        self.rows = 0
        self.source: Tensor | None = None


@dataclass
class _Grouped:
    """A tensor of the output or the targets (``side``), or a view of one made in the trace, with ``rows``
    rows per example; ``views``: whether views of it may be made (a batch size was given)."""

    tensor: Tensor
    rows: int
    side: str
    views: bool
    origin: Tensor  # the output's or targets' own tensor that this one is (or is a view of)


class _LossTrace(TorchFunctionMode):
    """Records the standard-loss call of ``loss_fn`` (returning a marker instead of computing it), and
    runs the views of the output and targets that keep each example's numbers together (given a batch
    size); at the first other operation the trace stops ``loss_fn`` (nothing it computes is computed
    twice). ``grouped``: id → :class:`_Grouped` of the output's and targets' tensors and their views."""

    def __init__(self, grouped: dict[int, _Grouped]) -> None:
        super().__init__()
        self.grouped = grouped
        self.call: StandardLoss | None = None
        self.marker: Tensor | None = None
        self.other_ops = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _STANDARD and self.call is None and not self.other_ops:
            call = StandardLoss(func, _bound_arguments(func, args, kwargs))
            call.rows = self._rows_of(call.input, call.target)
            if call.rows:
                call.source = self.grouped[id(call.input)].origin
            self.call, self.marker = call, torch.empty(())
            return self.marker
        if func in _METADATA:
            return func(*args, **kwargs)
        source = self._found(args[0]) if args else None
        if source is not None and source.views and self.call is None:
            view = self._grouped_view(func, args, kwargs, source)
            if view is not None:
                return view
        self.other_ops = True
        raise _NotStandard  # the answer is known: stop before loss_fn computes anything

    def _found(self, t: Any) -> _Grouped | None:
        found = self.grouped.get(id(t)) if isinstance(t, Tensor) else None
        return found if found is not None and found.tensor is t else None

    def _grouped_view(self, func, args: tuple, kwargs: dict, source: _Grouped) -> Tensor | None:
        """``func(*args, **kwargs)`` where it is a view that keeps ``source``'s examples together (recorded,
        with its rows per example), else None (not run)."""
        if func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if kwargs or not index or index[0] != slice(None) or not all(_plain_index(i) for i in index[1:]):
                return None
        elif func in _DIM_MOVES:
            if source.rows != 1 or kwargs or not _keeps_dim_zero(func, args):
                return None
        elif (
            func not in _ORDER_KEEPING
            or any(
                isinstance(a, Tensor) or (func is torch.Tensor.view and isinstance(a, torch.dtype))  # (a bit cast)
                for a in (*args[1:], *kwargs.values())
            )
        ):
            return None
        result = func(*args, **kwargs)
        batch = source.tensor.shape[0] // source.rows
        if not isinstance(result, Tensor) or result.dim() == 0 or result.shape[0] % batch:
            return None
        self.grouped[id(result)] = _Grouped(result, result.shape[0] // batch, source.side, True, source.origin)
        return result

    def _rows_of(self, input: Any, target: Any) -> int:
        """Rows per example of the loss's input (from the output) and target (from the targets); 0 where
        they are not such tensors, or not grouped alike."""
        found_input, found_target = self._found(input), self._found(target)
        if found_input is None or found_target is None:
            return 0
        if found_input.side != "output" or found_target.side != "targets" or found_input.rows != found_target.rows:
            return 0
        return found_input.rows


#: Operations that move dims; they keep each example's numbers together where dim 0 stays dim 0.
_DIM_MOVES = frozenset({torch.Tensor.transpose, torch.transpose, torch.Tensor.permute, torch.permute})


def _keeps_dim_zero(func: Callable, args: tuple) -> bool:
    """Whether a transpose or permute of ``args[0]`` leaves its dim 0 where it is."""
    tensor, dims = args[0], args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return False
    normal = [d % tensor.dim() for d in dims]
    if func in (torch.Tensor.transpose, torch.transpose):
        return len(normal) == 2 and 0 not in normal
    return len(normal) == tensor.dim() and normal[0] == 0


def _plain_index(entry: Any) -> bool:
    """An index entry after the first that selects within each row: a slice, an int or ``...``."""
    return entry is Ellipsis or isinstance(entry, slice) or (isinstance(entry, int) and not isinstance(entry, bool))


class _NotStandard(Exception):
    """Raised inside a trace at the first operation that is not the standard loss call."""


def traced_standard_loss(
    loss_fn: Callable, output: Any, targets: Any, batch_size: int | None = None
) -> StandardLoss | None:
    """The standard loss that ``loss_fn(output, targets)`` is, on tensors of ``output`` and
    ``targets`` or, given ``batch_size``, on views of them that keep each example's numbers together,
    or None (see the module docstring)."""
    grouped: dict[int, _Grouped] = {}
    for side, tree in (("output", output), ("targets", targets)):
        for t in flat_leaves(tree):
            if isinstance(t, Tensor) and (batch_size is None or (t.dim() and t.shape[0] == batch_size)):
                grouped[id(t)] = _Grouped(t, 1, side, batch_size is not None, t)
    trace = _LossTrace(grouped)
    try:
        with trace:
            result = loss_fn(output) if targets is None else loss_fn(output, targets)
    except Exception:  # whatever it is, it is not a plain standard loss: vmap will tell
        return None
    call = trace.call
    if call is None or trace.other_ops or result is not trace.marker or not call.rows:
        return None
    return call


def _class_index_loss(
    output: Tensor, target: Tensor, options: dict, elementwise: Callable, batch: int
) -> Tensor | None:
    if (
        output.dim() < 2
        or target.dtype not in (torch.long, torch.int64, torch.int32)
        or target.shape != output.shape[:1] + output.shape[2:]
    ):
        return None
    weight, ignore = options.get("weight"), options.get("ignore_index", -100)
    per_position = elementwise(
        output,
        target,
        weight=weight,
        ignore_index=ignore,
        reduction="none",
        **({"label_smoothing": options["label_smoothing"]} if options.get("label_smoothing") else {}),
    )
    kept = target != ignore  # divides as 1 / 0 (an example whose only target is ignored gets NaN)
    if weight is not None:
        kept = kept * weight.to(per_position.dtype)[target.clamp(min=0)]
    if output.dim() == 2 and output.shape[0] == batch:  # one position per example
        return per_position / kept
    # (rows grouped by example: example i's positions are the i-th of ``batch`` equal blocks)
    return per_position.reshape(batch, -1).sum(1) / kept.reshape(batch, -1).sum(1)


def _elementwise_mean(
    output: Tensor, target: Tensor, elementwise: Callable, options: dict, batch: int
) -> Tensor | None:
    if output.shape != target.shape or output.dim() == 0:
        return None
    per_element = elementwise(output, target, reduction="none", **options)
    return per_element.reshape(batch, -1).mean(1)


def closed_form_losses(loss_fn: Callable, output: Any, targets: Any, batch_size: int | None = None) -> Tensor | None:
    """``[B]`` per-example losses for a standard loss, or None when there is no closed form here (given
    ``batch_size``, also of a standard loss on views of the output and targets: the module docstring)."""
    call = traced_standard_loss(loss_fn, output, targets, batch_size)
    return None if call is None else standard_losses(call)


def standard_losses(call: StandardLoss) -> Tensor | None:
    """``[B]`` per-example losses of a traced standard loss (:func:`traced_standard_loss`), differentiable,
    or None where it has no closed form here (another reduction, element weights, shapes it does not
    cover). B is the input's rows over ``call.rows``, the rows of one example."""
    if not isinstance(call.input, Tensor) or not isinstance(call.target, Tensor):
        return None
    options = dict(call.options)
    if (
        options.pop("reduction") != "mean"
        or options.pop("size_average") is not None
        or options.pop("reduce") is not None
    ):
        return None
    batch = call.input.shape[0] // call.rows if call.input.dim() else 0
    if not batch:
        return None
    if call.kind in ("ce", "nll"):
        return _class_index_loss(call.input, call.target, options, call.function, batch)
    if options.pop("weight", None) is not None:  # element weights: not a per-example mean
        return None
    return _elementwise_mean(call.input, call.target, call.function, options, batch)


def example_weights(call: StandardLoss) -> Tensor:
    """D ``[B]`` (float64) with the batch loss ℓ = Σ_i (D_i / Σ_j D_j) L_i, for a traced standard loss whose
    per-example losses L_i :func:`standard_losses` gives (ask only where it gives them). Cross-entropy and
    NLL with the mean reduction divide the sum of the rows' losses by the sum of the rows' weights (the class
    weight of each kept target, 1 without class weights, 0 for an ignored one), and L_i divides example i's
    own sum by its own D_i; the element-wise means divide by the element count, which every example shares
    (D_i = 1). So the batch loss's weights over the L_i follow from the targets alone, without a backward.

    >>> import torch.nn.functional as F
    >>> logits, y = torch.randn(3, 4, 5), torch.tensor([[1, 2, -100, 0], [-100] * 4, [3, 3, 3, -100]])
    >>> call = traced_standard_loss(lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten()), logits, y, 3)
    >>> example_weights(call).tolist()
    [3.0, 0.0, 3.0]
    """
    batch = call.input.shape[0] // call.rows
    if call.kind not in ("ce", "nll"):
        return torch.ones(batch, dtype=torch.float64, device=call.input.device)
    target, weight = call.target, call.options.get("weight")
    kept = (target != call.options.get("ignore_index", -100)).to(torch.float64)
    if weight is not None:
        kept = kept * weight.to(torch.float64)[target.clamp(min=0)]
    return kept.reshape(batch, -1).sum(1)
