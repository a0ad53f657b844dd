"""The mission's assertion: mean of per-example gradients == autograd's gradient of the mean loss."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._batch import Batch, as_batch, tensors_in
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
        return (
            f"check_mean {verdict}: max rel err {self.max_rel_err:.2e}, max abs err "
            f"{self.max_abs_err:.2e} over {len(self.errors)} parameters (rtol={self.rtol:g}, atol={self.atol:g})"
        )


def default_tolerances(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(rtol, atol) for comparing two float reductions of the same gradient in ``dtype``.

    TF32 matmuls on CUDA (when enabled) loosen float32 to rtol 5e-3.
    """
    if dtype == torch.float64:
        return 1e-7, 1e-12
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
        return (5e-3 if tf32 else 1e-4), 1e-6
    return 2e-2, 1e-3  # float16 / bfloat16


class _Precisions(TorchFunctionMode):
    """Notes the dtypes of the differentiable floating results of every op (the precisions the
    forward really computes in: a float64 model may compute in float32 inside, as Gemma's RMSNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tensors_in(out):
            if t.requires_grad and t.is_floating_point():
                self.dtypes.add(t.dtype)
        return out


def batch_loss_grads(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batch,
    params: dict[str, nn.Parameter],
    precisions: set | None = None,
) -> dict[str, Tensor | None]:
    """∇_θ loss_fn(model(X), Y) on the whole batch, without touching ``p.grad``
    (None for a parameter the loss does not use, as ``loss.backward()`` leaves it). ``precisions``
    gets the floating dtypes the forward computed differentiable values in."""
    watcher = _Precisions() if precisions is not None else contextlib.nullcontext()
    with torch.enable_grad():
        with watcher:
            loss = batch.call(model, loss_fn)
        if precisions is not None:
            precisions |= cast(_Precisions, watcher).dtypes
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn on the whole batch must return a scalar (the mean loss)")
        grads = gradients(loss, list(params.values()))
    return {n: g.to_dense() if g is not None and g.is_sparse else g for n, g in zip(params, grads)}


def autograd_mean_grad(
    model: nn.Module, loss_fn: Callable[..., Tensor], batch, precisions: set | None = None
) -> dict[str, Tensor]:
    """∇_θ loss_fn(model(X), Y) on the whole batch, zeros for unused parameters."""
    params = trainable_parameters(model)
    grads = batch_loss_grads(model, loss_fn, batch, params, precisions)
    return {n: torch.zeros_like(p) if grads[n] is None else cast(Tensor, grads[n]) for n, p in params.items()}


def compare_means(
    per_example_mean: dict[str, Tensor],
    autograd: dict[str, Tensor],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    term_scales: dict[str, float] | None = None,
    precisions: set | None = None,
) -> MeanCheck:
    """Compare per parameter: ok when ‖a − b‖_∞ ≤ atol + rtol·s, s = max(‖b‖_∞, ``term_scales[name]``).

    Both sides are sums of B terms whose rounding is relative to the terms, not to their sum: where
    the per-example gradients nearly cancel (a mean far smaller than each g_i), half precision
    rounds the reference by more than rtol·‖b‖_∞. ``term_scales`` (the RMS element of the g_i) makes
    the tolerance relative to the terms. The default rtol is that of the least precise floating
    dtype among the parameters' and ``precisions`` (what the forward computed in).
    """
    first = next(iter(autograd.values()))
    dtypes = {first.dtype, *(precisions or ())}
    d_rtol, d_atol = default_tolerances(first.dtype, first.device)
    d_rtol = max([d_rtol, *(default_tolerances(d, first.device)[0] for d in dtypes if d.is_floating_point)])
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    errors = {}
    for name, ref in autograd.items():
        diff = (per_example_mean[name].double() - ref.double()).abs().max().item()
        scale = ref.abs().max().item()
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        terms = (term_scales or {}).get(name, 0.0)
        allowed = atol + rtol * max(scale, terms if math.isfinite(terms) else 0.0)
        errors[name] = ParamError(diff, rel, bool(diff <= allowed))
    return MeanCheck(errors, rtol, atol)


def _term_scales(stats: GradStats) -> dict[str, float]:
    """The RMS element of the per-example gradients, per parameter: sqrt(mean_i ‖g_i‖² / numel)."""
    scales = {}
    for name, mean in stats.mean.items():
        sq = stats.param_sq_norms.get(name) if stats.param_sq_norms else None
        if sq is not None and sq.numel() and mean.numel():
            scales[name] = math.sqrt(max(sq.double().mean().item(), 0.0) / mean.numel())
    return scales


def check_mean(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Any,
    targets: Any = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    stats: GradStats | None = None,
    **grad_stats_kwargs,
) -> MeanCheck:
    """Assert that (1/B) Σ_i g_i equals autograd's gradient of ``loss_fn(model(X), Y)``.

    >>> import torch, persample
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    >>> persample.check_mean(model, torch.nn.functional.mse_loss, x, y).ok
    True

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
        stats = (
            grad_stats(model, loss_fn, inputs, targets, **options)
            if "engine" in options
            else compute_stats(model, loss_fn, batch, engine="independent", **options)
        )
    return check_batch_mean(model, loss_fn, batch, stats, rtol=rtol, atol=atol)


def check_batch_mean(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batch: Batch,
    stats: GradStats | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
) -> MeanCheck:
    """:func:`check_mean` for a validated batch (computing vmap statistics unless given)."""
    if stats is None:
        stats = compute_stats(
            model, loss_fn, batch, engine="independent", var=False, chunk_size=chunk_size, randomness=randomness
        )
    precisions: set = set()
    with preserved_state(model):
        reference = autograd_mean_grad(model, loss_fn, batch, precisions)
    report = compare_means(
        stats.mean, reference, rtol=rtol, atol=atol, term_scales=_term_scales(stats), precisions=precisions
    )
    if not report.ok:
        lines = [
            f"  {name}: max abs err {e.max_abs_err:.3e}, rel err {e.rel_err:.3e}"
            for name, e in report.mismatches.items()
        ]
        first = next(iter(reference.values()))
        lower = sorted(
            {
                str(d).replace("torch.", "")
                for d in precisions
                if d.is_floating_point and d.itemsize < first.element_size()
            }
        )
        raise MeanMismatchError(
            f"mean of per-example gradients differs from autograd's gradient of the mean loss for "
            f"{len(lines)} of {len(report.errors)} parameters (rtol={report.rtol:g}, atol={report.atol:g}, "
            "relative to the larger of the gradient and its per-example terms):\n"
            + "\n".join(lines)
            + "\nLikely causes: the model couples the examples of a batch (batch statistics, "
            "train-mode BatchNorm, ops across dim 0), random ops, or a loss_fn whose whole-batch "
            "reduction is not the mean."
            + (
                f" (The forward computes in {', '.join(lower)} as well, whose rounding the tolerance "
                "already allows for.)"
                if lower
                else ""
            ),
            report,
        )
    return report
