"""Statistics of the float64 loop oracle (``zoo.oracle_grads``), computed here from the per-example rows,
independent of persample's GradStats, engines and noise module."""

from __future__ import annotations

import torch

from zoo import oracle_grads


def stats_from_rows(grads: dict, losses: torch.Tensor) -> dict:
    """mean, unbiased var, per-example squared norms (total and per parameter), inner products ⟨g_i, ḡ⟩."""
    b = losses.shape[0]
    mean = {n: g.mean(0) for n, g in grads.items()}
    flat = torch.cat([g.reshape(b, -1) for g in grads.values()], 1)
    flat_mean = torch.cat([m.reshape(-1) for m in mean.values()])
    return {
        "n": b,
        "mean": mean,
        "var": {n: g.var(0, unbiased=True) for n, g in grads.items()},
        "sq_norms": flat.pow(2).sum(1),
        "param_sq_norms": {n: g.reshape(b, -1).pow(2).sum(1) for n, g in grads.items()},
        "inner_products": flat @ flat_mean,
        "losses": losses,
    }


def oracle_stats(model, loss_fn, inputs, targets=None, clip_norm: float | None = None) -> dict:
    """The statistics of the float64 loop oracle; with ``clip_norm`` C also the clipped mean
    (1/B) Σ_i g_i · min(1, C/‖g_i‖)."""
    grads, losses = oracle_grads(model, loss_fn, inputs, targets)
    stats = stats_from_rows(grads, losses)
    if clip_norm is not None:
        factor = (clip_norm / stats["sq_norms"].sqrt()).clamp(max=1.0)
        stats["clipped_mean"] = {n: (g * factor.reshape(-1, *[1] * (g.dim() - 1))).mean(0) for n, g in grads.items()}
    return stats


def noise_scale(grads: dict, b: int) -> dict:
    """McCandlish et al.'s unbiased |G|², tr Σ and B_simple from per-example rows, written out."""
    flat = torch.cat([g.reshape(b, -1) for g in grads.values()], 1)
    m = flat.pow(2).sum(1).mean()
    mean_sq = flat.mean(0).pow(2).sum()
    grad_sq = (b * mean_sq - m) / (b - 1)
    trace_cov = (m - mean_sq) * b / (b - 1)
    return {"grad_sq": grad_sq.item(), "trace_cov": trace_cov.item(), "b_simple": (trace_cov / grad_sq).item()}
