"""Per-example losses of standard PyTorch losses, without ``vmap``.

The contract is L_i = loss_fn(output_i[None], target_i[None]) with the loss's
own (mean) reduction over that one example. For the standard losses that is a
closed form of ``reduction="none"``:

- cross-entropy / NLL with class-index targets: L_i = Σ_t ℓ_it / Σ_t w_{y_it}
  over the example's positions t, where w is the class weight (1 without
  weights) and ignored targets have weight 0 (an example with only ignored
  targets gets NaN, as the loss itself gives);
- MSE, L1, BCE-with-logits: the mean over the example's elements.

Anything else (other losses, options with other semantics, non-tensor
outputs) returns None and the engine falls back to ``vmap`` over ``loss_fn``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["closed_form_losses"]


def _options(loss_fn, function, module_type) -> dict | None:
    """The loss's options, if ``loss_fn`` is ``function`` or a ``module_type`` with mean reduction."""
    if loss_fn is function:
        return {}
    if type(loss_fn) is module_type and getattr(loss_fn, "reduction", None) == "mean":
        return {k: getattr(loss_fn, k) for k in ("weight", "ignore_index", "label_smoothing", "pos_weight")
                if hasattr(loss_fn, k)}
    return None


def _class_index_loss(output: Tensor, target: Tensor, options: dict, elementwise: Callable) -> Tensor | None:
    if output.dim() < 2 or target.dtype not in (torch.long, torch.int64, torch.int32) \
            or target.shape != output.shape[:1] + output.shape[2:]:
        return None
    weight, ignore = options.get("weight"), options.get("ignore_index", -100)
    per_position = elementwise(output, target, weight=weight, ignore_index=ignore, reduction="none",
                               **({"label_smoothing": options["label_smoothing"]}
                                  if options.get("label_smoothing") else {}))
    kept = (target != ignore).to(per_position.dtype)
    if weight is not None:
        kept = kept * weight.to(per_position.dtype)[target.clamp(min=0)]
    batch = output.shape[0]
    return per_position.reshape(batch, -1).sum(1) / kept.reshape(batch, -1).sum(1)


def _elementwise_mean(output: Tensor, target: Tensor, elementwise: Callable, options: dict) -> Tensor | None:
    if output.shape != target.shape or output.dim() == 0:
        return None
    per_element = elementwise(output, target, reduction="none", **options)
    return per_element.reshape(output.shape[0], -1).mean(1)


def closed_form_losses(loss_fn: Callable, output: Any, targets: Any) -> Tensor | None:
    """``[B]`` per-example losses for a standard loss, or None when there is no closed form here."""
    if not isinstance(output, Tensor) or not isinstance(targets, Tensor):
        return None
    for function, module_type, kind in ((F.cross_entropy, nn.CrossEntropyLoss, "ce"), (F.nll_loss, nn.NLLLoss, "nll"),
                                        (F.mse_loss, nn.MSELoss, "mse"), (F.l1_loss, nn.L1Loss, "l1"),
                                        (F.binary_cross_entropy_with_logits, nn.BCEWithLogitsLoss, "bce")):
        options = _options(loss_fn, function, module_type)
        if options is None:
            continue
        if kind in ("ce", "nll"):
            return _class_index_loss(output, targets, options, F.cross_entropy if kind == "ce" else F.nll_loss)
        if kind == "bce":
            if options.get("weight") is not None:
                return None
            extra = {"pos_weight": options["pos_weight"]} if options.get("pos_weight") is not None else {}
            return _elementwise_mean(output, targets, function, extra)
        return _elementwise_mean(output, targets, function, {})
    return None
