"""The mission's assertion: mean of per-example gradients == autograd's gradient of the mean loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._batch import Batch, as_batch
from ._model import preserved_state, trainable_parameters
from .api import compute_stats, grad_stats
from .engines._autograd import gradients
from .errors import MeanMismatchError
from .stats import GradStats

__all__ = ["check_mean", "check_batch_mean", "batch_loss_grads", "MeanCheck", "default_tolerances"]


@dataclass(frozen=True)
class ParamError:
    """Disagreement for one parameter: ‖ḡ − ∇‖_∞ and that divided by ‖∇‖_∞."""

    max_abs_err: float
    rel_err: float
    ok: bool


@dataclass(frozen=True)
class MeanCheck:
    """Result of :func:`check_mean`: per-parameter errors and the tolerances used."""

    errors: dict[str, ParamError]
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.errors.values())

    @property
    def max_rel_err(self) -> float:
        return max(e.rel_err for e in self.errors.values())

    @property
    def max_abs_err(self) -> float:
        return max(e.max_abs_err for e in self.errors.values())

    @property
    def mismatches(self) -> dict[str, ParamError]:
        return {k: e for k, e in self.errors.items() if not e.ok}

    def __str__(self) -> str:
        verdict = "OK" if self.ok else f"MISMATCH in {len(self.mismatches)} of {len(self.errors)} parameters"
        return (f"check_mean {verdict}: max rel err {self.max_rel_err:.2e}, max abs err "
                f"{self.max_abs_err:.2e} over {len(self.errors)} parameters (rtol={self.rtol:g}, atol={self.atol:g})")


def default_tolerances(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(rtol, atol) for comparing two float reductions of the same gradient in ``dtype``.

    TF32 matmuls on CUDA (when enabled) loosen float32 to rtol 5e-3.
    """
    if dtype == torch.float64:
        return 1e-7, 1e-12
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                          or torch.backends.cudnn.allow_tf32)
        return (5e-3 if tf32 else 1e-4), 1e-6
    return 2e-2, 1e-3  # float16 / bfloat16


def batch_loss_grads(model: nn.Module, loss_fn: Callable[..., Tensor], batch,
                     params: dict[str, nn.Parameter]) -> dict[str, Tensor | None]:
    """∇_θ loss_fn(model(X), Y) on the whole batch, without touching ``p.grad``
    (None for a parameter the loss does not use, as ``loss.backward()`` leaves it)."""
    with torch.enable_grad():
        loss = batch.call(model, loss_fn)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn on the whole batch must return a scalar (the mean loss)")
        grads = gradients(loss, list(params.values()))
    return {n: g.to_dense() if g is not None and g.is_sparse else g for n, g in zip(params, grads)}


def autograd_mean_grad(model: nn.Module, loss_fn: Callable[..., Tensor], batch) -> dict[str, Tensor]:
    """∇_θ loss_fn(model(X), Y) on the whole batch, zeros for unused parameters."""
    params = trainable_parameters(model)
    grads = batch_loss_grads(model, loss_fn, batch, params)
    return {n: torch.zeros_like(p) if grads[n] is None else grads[n] for n, p in params.items()}


def compare_means(per_example_mean: dict[str, Tensor], autograd: dict[str, Tensor], *,
                  rtol: float | None = None, atol: float | None = None) -> MeanCheck:
    """Compare per parameter: ok when ‖a − b‖_∞ ≤ atol + rtol·‖b‖_∞."""
    first = next(iter(autograd.values()))
    d_rtol, d_atol = default_tolerances(first.dtype, first.device)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    errors = {}
    for name, ref in autograd.items():
        diff = (per_example_mean[name] - ref).abs().max().item()
        scale = ref.abs().max().item()
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        errors[name] = ParamError(diff, rel, bool(diff <= atol + rtol * scale))
    return MeanCheck(errors, rtol, atol)


def check_mean(model: nn.Module, loss_fn: Callable[..., Tensor], inputs: Any, targets: Any = None, *,
               rtol: float | None = None, atol: float | None = None, stats: GradStats | None = None,
               **grad_stats_kwargs) -> MeanCheck:
    """Assert that (1/B) Σ_i g_i equals autograd's gradient of ``loss_fn(model(X), Y)``.

    The whole-batch loss must be the mean of the per-example losses (true for
    standard losses with their default ``mean`` reduction). Random ops make the
    two passes draw different values, so check models in ``eval()`` or without them.

    The per-example gradients come from engines that evaluate every example on
    its own: ``vmap``, or the per-example ``loop`` where vmap cannot run the model
    (attention masks, checkpointing, hooks). A model that couples the examples of
    a batch fails here. (The fast engine's mean is autograd's gradient, or the
    sum of its own per-example gradients, so it cannot test the invariant.)

    Args:
        rtol, atol: tolerances; by default from :func:`default_tolerances` for the
            parameters' dtype. A parameter passes when
            ‖ḡ − ∇‖_∞ ≤ atol + rtol·‖∇‖_∞.
        stats: already computed statistics of this batch (skips recomputing them;
            they should come from ``engine="vmap"`` or ``"loop"``).
        **grad_stats_kwargs: passed to :func:`persample.grad_stats` (by default
            ``var=False`` and the vmap engine, falling back to the loop).

    Returns:
        a :class:`MeanCheck` report when every parameter passes.

    Raises:
        MeanMismatchError: naming every mismatching parameter with its absolute
            and relative error.
    """
    batch = as_batch(inputs, targets)
    if stats is None:
        options = {"var": False, **grad_stats_kwargs}
        stats = (grad_stats(model, loss_fn, inputs, targets, **options) if "engine" in options
                 else compute_stats(model, loss_fn, batch, engine="independent", **options))
    return check_batch_mean(model, loss_fn, batch, stats, rtol=rtol, atol=atol)


def check_batch_mean(model: nn.Module, loss_fn: Callable[..., Tensor], batch: Batch,
                     stats: GradStats | None = None, *, rtol: float | None = None, atol: float | None = None,
                     chunk_size: int | None = None, randomness: str = "error") -> MeanCheck:
    """:func:`check_mean` for a validated batch (computing vmap statistics unless given)."""
    if stats is None:
        stats = compute_stats(model, loss_fn, batch, engine="independent", var=False, chunk_size=chunk_size,
                              randomness=randomness)
    with preserved_state(model):
        reference = autograd_mean_grad(model, loss_fn, batch)
    report = compare_means(stats.mean, reference, rtol=rtol, atol=atol)
    if not report.ok:
        lines = [f"  {name}: max abs err {e.max_abs_err:.3e}, rel err {e.rel_err:.3e}"
                 for name, e in report.mismatches.items()]
        raise MeanMismatchError(
            f"mean of per-example gradients differs from autograd's gradient of the mean loss for "
            f"{len(lines)} of {len(report.errors)} parameters (rtol={report.rtol:g}, atol={report.atol:g}):\n"
            + "\n".join(lines)
            + "\nLikely causes: the model couples the examples of a batch (batch statistics, "
              "train-mode BatchNorm, ops across dim 0), random ops, or a loss_fn whose whole-batch "
              "reduction is not the mean.", report)
    return report
