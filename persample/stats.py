"""``GradStats``: the one value that flows from engines to hooks and diagnostics.

A ``GradStats`` holds sufficient statistics of the per-example gradients
g_i = dL_i/dθ (unscaled: the gradient of example i's own loss, never divided by
the batch size) of one batch, keyed by the names that ``model.named_parameters()``
yields:

- ``n``: the number of examples;
- ``mean``: ḡ = (1/n) Σ_i g_i, which equals autograd's gradient of the mean loss;
- ``m2``: Σ_i (g_i − ḡ)², per element (``None`` when variance was not asked for);
- ``param_sq_norms``: ‖g_i[name]‖² for every example, shape ``[n]``;
- ``losses``: L_i, shape ``[n]``;
- ``inner_products``: p_i = ⟨g_i, r⟩ for a fixed reference direction r (by
  default the batch mean ḡ), shape ``[n]``; optional;
- ``clipped_mean``: (1/n) Σ_i min(1, C/‖g_i‖) g_i for ``clip_norm`` C; optional.

``merge`` is exact (Chan, Golub & LeVeque's pairwise update), so statistics of
chunks, micro-batches or processes combine into the statistics of the
concatenated batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

__all__ = ["GradStats", "clip_factors", "sum_of_squares"]


def sum_of_squares(g: Tensor, center: Tensor | None = None) -> Tensor:
    """Σ_i (g_i − c)∘(g_i − c) over dim 0 (c = 0 when ``center`` is None).

    Large rows are accumulated one at a time (``addcmul_`` into a cache-resident
    accumulator): reductions over dim 0 of a B × P tensor are strided and slow on
    CPU, and ``(g - c).square().sum(0)`` writes B × P temporaries first.
    """
    if g[0].numel() < (1 << 16):
        d = g if center is None else g - center
        return d.square().sum(0)
    acc = torch.zeros_like(g[0])
    for row in g:
        d = row if center is None else row - center
        acc.addcmul_(d, d)
    return acc


def clip_factors(sq_norms: Tensor, clip_norm: float) -> Tensor:
    """Per-example clipping factors min(1, C/‖g_i‖); 1 for a zero gradient."""
    return (clip_norm / sq_norms.sqrt()).clamp(max=1.0)


@dataclass(frozen=True, eq=False, repr=False)
class GradStats:
    """Sufficient statistics of one batch of per-example gradients.

    Per-example gradients are unscaled (g_i is the gradient of example i's own
    loss). Variance is unbiased: ``var = m2 / (n - 1)``; with ``n == 1`` it is
    NaN by definition. Norms are L2, and ``sq_norms`` is the sum over
    parameters of ``param_sq_norms``.

    Build one with :func:`persample.grad_stats` (or :meth:`from_per_example`),
    and combine several with :meth:`merge`.
    """

    n: int
    mean: dict[str, Tensor]
    m2: dict[str, Tensor] | None
    param_sq_norms: dict[str, Tensor]
    losses: Tensor
    inner_products: Tensor | None = None
    reference: Mapping[str, Tensor] | None = field(default=None)
    clip_norm: float | None = None
    clipped_mean: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"GradStats needs at least one example, got n={self.n}")
        if self.m2 is not None and self.m2.keys() != self.mean.keys():
            raise ValueError("GradStats: 'm2' and 'mean' must have the same parameter names")
        if self.param_sq_norms.keys() != self.mean.keys():
            raise ValueError("GradStats: 'param_sq_norms' and 'mean' must have the same parameter names")
        for name, sq in self.param_sq_norms.items():
            if sq.shape != (self.n,):
                raise ValueError(f"GradStats: param_sq_norms[{name!r}] has shape {tuple(sq.shape)}, expected ({self.n},)")
        if self.losses.shape != (self.n,):
            raise ValueError(f"GradStats: losses has shape {tuple(self.losses.shape)}, expected ({self.n},)")
        if self.inner_products is not None and self.inner_products.shape != (self.n,):
            raise ValueError("GradStats: inner_products must have shape (n,)")
        if (self.clip_norm is None) != (self.clipped_mean is None):
            raise ValueError("GradStats: clip_norm and clipped_mean go together")

    # ------------------------------------------------------------------ views
    @property
    def names(self) -> list[str]:
        """Parameter names, in ``named_parameters()`` order."""
        return list(self.mean)

    @property
    def var(self) -> dict[str, Tensor] | None:
        """Unbiased per-element variance, (1/(n−1)) Σ_i (g_i − ḡ)²; NaN when n = 1."""
        if self.m2 is None:
            return None
        denom = self.n - 1
        if denom == 0:
            return {k: torch.full_like(v, math.nan) for k, v in self.m2.items()}
        return {k: v / denom for k, v in self.m2.items()}

    @property
    def sq_norms(self) -> Tensor:
        """‖g_i‖² over all parameters, shape ``[n]``."""
        return torch.stack(list(self.param_sq_norms.values())).sum(0)

    @property
    def norms(self) -> Tensor:
        """‖g_i‖ over all parameters, shape ``[n]``."""
        return self.sq_norms.sqrt()

    @property
    def mean_sq_norm(self) -> Tensor:
        """‖ḡ‖², the squared norm of the mean gradient (a 0-d float64 tensor, summed in float64)."""
        return sum(m.double().pow(2).sum() for m in self.mean.values())

    # -------------------------------------------------------------- building
    @classmethod
    def from_per_example(
        cls,
        grads: Mapping[str, Tensor],
        losses: Tensor,
        *,
        var: bool = True,
        reference: Mapping[str, Tensor] | None = None,
        clip_norm: float | None = None,
    ) -> "GradStats":
        """Statistics of materialised per-example gradients ``grads[name]: [n, *shape]``.

        When ``reference`` is given, ``inner_products`` holds p_i = ⟨g_i, r⟩.
        When ``clip_norm`` C is given, ``clipped_mean`` holds
        (1/n) Σ_i min(1, C/‖g_i‖) g_i, with ‖g_i‖ over all parameters.
        """
        if not grads:
            raise ValueError("GradStats.from_per_example needs at least one parameter")
        n = losses.shape[0]
        mean, m2, sq = {}, {} if var else None, {}
        for name, g in grads.items():
            if g.shape[0] != n:
                raise ValueError(f"grads[{name!r}] has {g.shape[0]} rows but there are {n} losses")
            mean[name] = g.mean(0)
            if m2 is not None:
                m2[name] = sum_of_squares(g, mean[name])
            sq[name] = torch.linalg.vector_norm(g.reshape(n, -1), dim=1).square()
        inner = None
        if reference is not None:
            inner = sum((grads[k].reshape(n, -1) @ reference[k].reshape(-1)) for k in grads)
        clipped = None
        if clip_norm is not None:
            factors = clip_factors(torch.stack(list(sq.values())).sum(0), clip_norm)
            clipped = {k: torch.tensordot(factors, g, dims=1) / n for k, g in grads.items()}
        return cls(n=n, mean=mean, m2=m2, param_sq_norms=sq, losses=losses,
                   inner_products=inner, reference=reference, clip_norm=clip_norm, clipped_mean=clipped)

    # ---------------------------------------------------------------- merging
    def merge(self, other: "GradStats") -> "GradStats":
        """Exact statistics of the concatenation (``self``'s examples first).

        With counts n_a, n_b, means μ_a, μ_b and δ = μ_b − μ_a:
        μ = μ_a + δ·n_b/n and M2 = M2_a + M2_b + δ²·n_a·n_b/n.
        Inner products are kept only when both records share the same reference
        object (they are relative to it); otherwise the merged record has none.
        Clipped means combine exactly when both records used the same ``clip_norm``.
        """
        if not isinstance(other, GradStats):
            raise TypeError(f"can only merge GradStats with GradStats, not {type(other).__name__}")
        if self.mean.keys() != other.mean.keys():
            missing = sorted(set(self.mean) ^ set(other.mean))
            raise ValueError(f"cannot merge GradStats over different parameters: {missing}")
        na, nb = self.n, other.n
        n = na + nb
        mean, m2 = {}, None if (self.m2 is None or other.m2 is None) else {}
        for k, mu_a in self.mean.items():
            delta = other.mean[k] - mu_a
            mean[k] = mu_a + delta * (nb / n)
            if m2 is not None:
                m2[k] = self.m2[k] + other.m2[k] + delta.pow(2) * (na * nb / n)
        sq = {k: torch.cat([v, other.param_sq_norms[k]]) for k, v in self.param_sq_norms.items()}
        same_ref = self.reference is not None and self.reference is other.reference
        inner = None
        if same_ref and self.inner_products is not None and other.inner_products is not None:
            inner = torch.cat([self.inner_products, other.inner_products])
        clip, clipped = None, None
        if self.clip_norm is not None and self.clip_norm == other.clip_norm:
            clip = self.clip_norm
            clipped = {k: v + (other.clipped_mean[k] - v) * (nb / n) for k, v in self.clipped_mean.items()}
        return GradStats(n=n, mean=mean, m2=m2, param_sq_norms=sq,
                         losses=torch.cat([self.losses, other.losses]),
                         inner_products=inner, reference=self.reference if same_ref else None,
                         clip_norm=clip, clipped_mean=clipped)

    @staticmethod
    def merge_all(parts: "list[GradStats]") -> "GradStats":
        """Merge a non-empty sequence of records in order."""
        if not parts:
            raise ValueError("merge_all needs at least one GradStats")
        out = parts[0]
        for part in parts[1:]:
            out = out.merge(part)
        return out

    # ------------------------------------------------------------------ misc
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "GradStats":
        """A copy with every tensor moved to ``device`` / cast to ``dtype``."""
        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)
        def mvd(d):
            return None if d is None else {k: mv(v) for k, v in d.items()}
        return GradStats(n=self.n, mean=mvd(self.mean), m2=mvd(self.m2),
                         param_sq_norms=mvd(self.param_sq_norms), losses=mv(self.losses),
                         inner_products=None if self.inner_products is None else mv(self.inner_products),
                         reference=mvd(self.reference), clip_norm=self.clip_norm,
                         clipped_mean=mvd(self.clipped_mean))

    def __repr__(self) -> str:
        numel = sum(v.numel() for v in self.mean.values())
        norms = self.norms
        return (f"GradStats(n={self.n}, params={len(self.mean)} ({numel} elements), "
                f"var={'yes' if self.m2 is not None else 'no'}, "
                f"mean_loss={self.losses.mean().item():.4g}, "
                f"median_norm={norms.median().item():.4g}, |mean|={self.mean_sq_norm.sqrt().item():.4g})")
