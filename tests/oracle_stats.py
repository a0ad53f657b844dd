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


def keyword_oracle_rows(model, loss_of, inputs: dict, size: int) -> tuple[dict, torch.Tensor]:
    """The float64 oracle for a model called with keyword tensors (a Hugging Face batch): example i alone,
    ``model(**{k: v[i:i+1]})``, its loss ``loss_of(output, i)``, and its gradient by autograd; a parameter the
    example does not reach gets zeros. Returns (per-example gradients ``{name: [B, ...]}``, losses ``[B]``)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows: dict[str, list] = {n: [] for n in params}
    losses = []
    for i in range(size):
        loss = loss_of(model(**{k: v[i : i + 1] for k, v in inputs.items()}), i)
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            rows[n].append(torch.zeros_like(params[n]) if g is None else g)
        losses.append(loss.detach())
    return {n: torch.stack(r) for n, r in rows.items()}, torch.stack(losses)


def assert_stats_match_rows(stats, rows: dict, losses: torch.Tensor) -> None:
    """A GradStats' mean, unbiased variance, per-example squared norms and losses against oracle rows, at 1e-9."""
    for n, r in rows.items():
        torch.testing.assert_close(stats.mean[n], r.mean(0), rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(stats.var[n], r.var(0), rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(stats.param_sq_norms[n], r.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.losses.to(losses), losses, rtol=1e-9, atol=1e-12)
