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
``TorchFunctionMode``: it qualifies when the only tensor operation it performs
is one call of a standard loss with mean reduction, on the model's output (or
one of its tensors) and the targets, whose result it returns unchanged. The
standard loss itself is never evaluated there, and the trace stops at the first
other operation, so it costs one Python call. This covers ``F.cross_entropy``,
``nn.CrossEntropyLoss(...)`` and plain wrappers such as
``lambda out, y: F.cross_entropy(out, y)`` alike. Anything else (other
operations, other reductions, options with other semantics) returns None and
the engine falls back to ``vmap`` over ``loss_fn``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..._batch import flat_leaves

__all__ = ["closed_form_losses", "traced_standard_loss", "StandardLoss"]

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


class StandardLoss:
    """One traced call of a standard loss: its function, input, target and keyword options."""

    def __init__(self, function: Callable, arguments: dict):
        self.function, self.kind = function, _STANDARD[function]
        self.input, self.target = arguments.pop("input"), arguments.pop("target")
        self.options = arguments


class _LossTrace(TorchFunctionMode):
    """Records the standard-loss call of ``loss_fn`` (returning a marker instead of computing it)
    and whether anything other than metadata queries happened: at the first such operation
    the trace stops ``loss_fn`` (a cross-entropy after slicing the logits is not computed twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.call: StandardLoss | None = None
        self.marker: Tensor | None = None
        self.other_ops = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _STANDARD and self.call is None and not self.other_ops:
            self.call = StandardLoss(func, _bound_arguments(func, args, kwargs))
            self.marker = torch.empty(())
            return self.marker
        if func not in _METADATA:
            self.other_ops = True
            raise _NotStandard  # the answer is known: stop before loss_fn computes anything
        return func(*args, **kwargs)


class _NotStandard(Exception):
    """Raised inside a trace at the first operation that is not the standard loss call."""


def traced_standard_loss(loss_fn: Callable, output: Any, targets: Any) -> StandardLoss | None:
    """The standard loss that ``loss_fn(output, targets)`` is, on tensors of ``output`` and
    ``targets``, or None (see the module docstring)."""
    trace = _LossTrace()
    try:
        with trace:
            result = loss_fn(output) if targets is None else loss_fn(output, targets)
    except Exception:  # whatever it is, it is not a plain standard loss: vmap will tell
        return None
    call = trace.call
    if call is None or trace.other_ops or result is not trace.marker:
        return None
    if not any(call.input is leaf for leaf in flat_leaves(output)) or not any(
        call.target is leaf for leaf in flat_leaves(targets)
    ):
        return None
    return call


def _class_index_loss(output: Tensor, target: Tensor, options: dict, elementwise: Callable) -> Tensor | None:
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
    if output.dim() == 2:  # one position per example
        return per_position / kept
    batch = output.shape[0]
    return per_position.reshape(batch, -1).sum(1) / kept.reshape(batch, -1).sum(1)


def _elementwise_mean(output: Tensor, target: Tensor, elementwise: Callable, options: dict) -> Tensor | None:
    if output.shape != target.shape or output.dim() == 0:
        return None
    per_element = elementwise(output, target, reduction="none", **options)
    return per_element.reshape(output.shape[0], -1).mean(1)


def closed_form_losses(loss_fn: Callable, output: Any, targets: Any) -> Tensor | None:
    """``[B]`` per-example losses for a standard loss, or None when there is no closed form here."""
    call = traced_standard_loss(loss_fn, output, targets)
    if call is None or not isinstance(call.input, Tensor) or not isinstance(call.target, Tensor):
        return None
    options = call.options
    if (
        options.pop("reduction") != "mean"
        or options.pop("size_average") is not None
        or options.pop("reduce") is not None
    ):
        return None
    if call.kind in ("ce", "nll"):
        return _class_index_loss(call.input, call.target, options, call.function)
    if options.pop("weight", None) is not None:  # element weights: not a per-example mean
        return None
    return _elementwise_mean(call.input, call.target, call.function, options)
