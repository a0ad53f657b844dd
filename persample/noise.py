"""Gradient-noise diagnostics: pure functions of :class:`~persample.GradStats`.

Every function here reads a ``GradStats`` (or a series of them) and returns
numbers; none calls an engine or touches a model. Notation, as in the design
notes: g_i are the per-example gradients (unscaled: example i's own loss), B the
batch size, ḡ = (1/B) Σ_i g_i, and m = (1/B) Σ_i ‖g_i‖² (``stats.sq_norms.mean()``).

What is here, and where it comes from:

- :func:`gradient_noise_scale` — unbiased |G|², tr Σ and the simple noise scale
  B_simple = tr Σ / |G|² (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical
  Model of Large-Batch Training", arXiv:1812.06162, App. A, with B_small = 1).
- :func:`rank_noise_scale` and :func:`two_batch_noise_scale` — the same
  estimates from two batch sizes, B_small = each rank's batch and B_big = the
  global batch (same paper, App. A.1; what nanoGNS and gpt-neox compute under
  DDP). ``NoiseScale.estimator`` says which one a value comes from.
- :class:`NoiseScaleEMA` — B_simple over training from separately smoothed,
  bias-corrected EMAs of tr Σ and |G|² (same paper, App. A.1).
- :func:`gsnr`, :func:`mean_gsnr` — gradient signal-to-noise ratio per element
  (Liu et al. 2020, "Understanding Why Neural Networks Generalize Well Through
  GSNR of Parameters", ICLR 2020).
- :func:`norm_test` (Byrd, Chin, Nocedal & Wu 2012, "Sample size selection in
  optimization methods for machine learning", Math. Program. 134),
  :func:`inner_product_test` and :func:`orthogonality_test` (Bollapragada, Byrd
  & Nocedal 2018, "Adaptive Sampling Strategies for Stochastic Optimization",
  SIAM J. Optim. 28(4), arXiv:1710.11258) — adaptive batch-size tests, with the
  batch size each one suggests.
- :func:`gradient_diversity` (Yin et al. 2018, "Gradient Diversity: a Key
  Ingredient for Scalable Distributed Learning", AISTATS 2018).
- :func:`layer_noise_scale`, :func:`layer_gsnr` — the same per layer (parameters
  grouped by module prefix, see :func:`group_by_layer`).
- :func:`diagnostics` — all of the above as one flat ``{name: float}`` row, what
  the loggers in :mod:`persample.loggers` write.

Numerics and edge cases (shared by every function):

- Scalar arithmetic is done in float64, whatever the dtype of the statistics:
  |G|² is a difference of close numbers.
- B = 1 raises ``ValueError`` ("needs at least 2 examples"): no variance can be
  estimated from one example. (:func:`gradient_diversity` is defined for B = 1.)
- Non-finite statistics (a NaN or inf in ``mean``, ``param_sq_norms``, ``m2`` or
  ``inner_products``) raise ``ValueError`` naming the field and the parameter.
- An all-zero gradient is finite input and gives IEEE results: 0/0 is NaN and
  x/0 is inf for x > 0. Each function's docstring says which it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, cast

import torch
from torch import Tensor

from .stats import GradStats

__all__ = [
    "NoiseScale",
    "BatchSizeTest",
    "NoiseScaleEMA",
    "gradient_noise_scale",
    "two_batch_noise_scale",
    "rank_noise_scale",
    "preconditioned_noise_scale",
    "layer_preconditioned_noise_scale",
    "adam_preconditioner",
    "jackknife_noise_scale",
    "gsnr",
    "mean_gsnr",
    "norm_test",
    "inner_product_test",
    "orthogonality_test",
    "gradient_diversity",
    "group_by_layer",
    "layer_noise_scale",
    "layer_gsnr",
    "diagnostics",
    "TESTS",
    "DEFAULT_EMA_BETA",
    "DEFAULT_NORM_THRESHOLD",
    "DEFAULT_INNER_THRESHOLD",
    "DEFAULT_ORTHO_THRESHOLD",
]

#: Default θ of the norm test. Byrd et al. (2012) require θ < 1 (θ bounds the
#: relative error ‖ḡ − ∇F‖/‖ḡ‖ of the batch gradient); 0.9 is a conventional
#: choice just below that bound. Lower is stricter. All defaults are parameters:
#: they are conventions, not values this library has verified against the papers.
DEFAULT_NORM_THRESHOLD = 0.9
#: Default θ of the inner-product test (Bollapragada et al. 2018): 0.9, the same convention.
DEFAULT_INNER_THRESHOLD = 0.9
#: Default ν of the orthogonality test (Bollapragada et al. 2018): 5.84 ≈ tan 80°,
#: so the batch gradient may turn up to about 80° away from ḡ.
DEFAULT_ORTHO_THRESHOLD = 5.84
#: Default decay of the EMAs behind the smoothed B_simple (NoiseScaleEMA, Diagnostics, the plot and the
#: demo): 0.95 averages over about 20 statistics steps.
DEFAULT_EMA_BETA = 0.95


# --------------------------------------------------------------------------- helpers


def _f64_sum_sq(tensors: Iterable[Tensor]) -> float:
    return float(sum(t.detach().double().pow(2).sum() for t in tensors))


def _mean_sq(stats: GradStats, names: Sequence[str] | None = None) -> float:
    """‖ḡ‖² over ``names`` (default: all) in float64; for a sharded record (FSDP2), the whole mean's,
    from its global sums (``stats.shard``), with no communication."""
    if stats.shard is not None:
        return stats.param_mean_sq(names)
    return _f64_sum_sq(stats.mean[k] for k in (stats.names if names is None else names))


def _refuse_sharded(fn: str, stats: GradStats) -> None:
    if stats.shard is not None:
        raise ValueError(
            f"{fn} weighs every element of the mean and variance, but these statistics hold only this "
            f"rank's shard of them (FSDP2, stats.shard); it would need a collective. Compute it from "
            f"your optimizer's sharded state and the shards, summed with torch.distributed.all_reduce, "
            f"or train with DDP"
        )


def _nonfinite_where(name: str, tensors: Mapping[str, Tensor] | Tensor) -> str | None:
    """'field[param] (k of n elements)' for the first non-finite tensor, or None."""
    items = {None: tensors}.items() if isinstance(tensors, Tensor) else tensors.items()
    for key, t in items:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            where = name if key is None else f"{name}[{key!r}]"
            return f"{where} ({int(bad.sum())} of {t.numel()} elements)"
    return None


def _require_finite(fn: str, stats: GradStats, *fields: str) -> None:
    for field in fields:
        value = getattr(stats, field)
        if value is None:
            continue
        where = _nonfinite_where(f"stats.{field}", value)
        if where is not None:
            raise ValueError(
                f"{fn}: non-finite values in {where}; the per-example gradients or losses "
                f"overflowed or are NaN (check the loss, the learning rate, or mixed-precision scaling)"
            )


def _require_two(fn: str, stats: GradStats) -> None:
    if not isinstance(stats, GradStats):
        raise TypeError(f"{fn} takes a GradStats, not {type(stats).__name__}")
    if stats.n < 2:
        raise ValueError(
            f"{fn} needs at least 2 examples (got a GradStats with n={stats.n}): "
            f"a variance cannot be estimated from one example"
        )


def _require_var(fn: str, stats: GradStats) -> None:
    if stats.m2 is None:
        raise ValueError(
            f"{fn} needs the per-element variance, but these statistics have none: "
            f"compute them with var=True (the default) in grad_stats / Tracker"
        )


def _div(num: float, den: float) -> float:
    """IEEE division in Python floats: x/0 = ±inf, 0/0 = NaN (Python raises instead)."""
    if den != 0:
        return num / den
    if num == 0 or math.isnan(num):
        return math.nan
    return math.copysign(math.inf, num) * (math.copysign(1.0, den))


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else math.nan


@dataclass(frozen=True)
class _Moments:
    """Float64 scalars of (a subset of the parameters of) one GradStats."""

    n: int
    mean_sq: float  # ‖ḡ‖²
    m: float  # (1/B) Σ_i ‖g_i‖²
    trace: float | None = None  # Σ_j Var_j from the per-element variance, when it was kept


def _moments(stats: GradStats, names: Sequence[str] | None = None) -> _Moments:
    names = stats.names if names is None else list(names)
    mean_sq = _mean_sq(stats, names)
    per_example = cast(Tensor, sum(stats.param_sq_norms[k].detach().double() for k in names))  # names not empty
    trace = None
    if stats.m2 is not None and stats.n > 1:
        trace = stats.param_m2_sum(names) / (stats.n - 1)
    return _Moments(stats.n, mean_sq, float(per_example.mean()), trace)


# ------------------------------------------------------------------ noise scale


@dataclass(frozen=True)
class NoiseScale:
    """Unbiased noise estimates of one batch (McCandlish et al. 2018, App. A).

    Two estimators fill it, and ``estimator`` says which:

    - ``"per-example"`` (:func:`gradient_noise_scale`): B_small = 1, from the
      per-example norms of one batch;
    - ``"rank"`` (:func:`rank_noise_scale`, :func:`two_batch_noise_scale`):
      B_small = each rank's batch, B_big = the global batch, from the ranks'
      mean gradients only. Both are unbiased; the per-example one has lower
      variance (B samples of the noise rather than W).
    - ``"micro-batch"`` (:meth:`persample.Tracker.accumulate` with
      ``estimator="micro-batch"``): the same two-batch estimator with B_small =
      the micro-batches of one optimiser step, for models without per-example
      gradients (train-mode BatchNorm).

    Attributes:
        n: the batch size B (B_big for the rank-level estimator).
        grad_sq: unbiased |G|² = (B‖ḡ‖² − m)/(B − 1). May be negative when the
            noise swamps the signal (an unbiased estimate of a small positive
            number); smooth it over steps with :class:`NoiseScaleEMA`.
        trace_cov: unbiased tr Σ = (m − ‖ḡ‖²)·B/(B − 1) (the sum of the unbiased
            per-element variances); ≥ 0, clamped at 0 against roundoff.
        b_simple: ``trace_cov / grad_sq``: negative when ``grad_sq`` is, NaN for
            an all-zero gradient (0/0).
        mean_sq_norm: ‖ḡ‖² (biased: it overestimates |G|² by tr Σ / B).
        mean_example_sq_norm: m = (1/B) Σ_i ‖g_i‖², the mean squared norm of the
            small batches (of one example each); for the rank-level estimator,
            the mean over ranks of ‖ḡ_r‖².
        estimator: ``"per-example"``, ``"rank"`` (see above) or ``"preconditioned"``
            (:func:`preconditioned_noise_scale`: the same quantities in the metric
            of an optimizer's diagonal preconditioner P).
        b_small: B_small: 1 for the per-example estimator, the (harmonic mean
            of the) ranks' batch sizes for the rank-level one.
        stderr: the jackknife standard errors ``{"grad_sq", "trace_cov", "b_simple"}``
            behind :meth:`interval`, or None (``stderr_missing`` says why).
        excluded: for ``"preconditioned"``, the number of coordinates with P_j = 0,
            which weigh nothing in either sum: with an Adam optimizer, those it has
            no second-moment estimate for yet (v̂_j = 0, see :func:`adam_preconditioner`);
            0 for the other estimators.
    """

    n: float  # an int but for the two-batch estimator with a non-integer B_big (two_batch_noise_scale)
    grad_sq: float
    trace_cov: float
    b_simple: float
    mean_sq_norm: float
    mean_example_sq_norm: float
    estimator: str = "per-example"
    b_small: float = 1.0
    stderr: Mapping[str, float] | None = None
    stderr_missing: str = ""
    excluded: int = 0

    def interval(self, level: float = 0.9, of: str = "b_simple") -> tuple[float, float]:
        """A ``level`` confidence interval for ``of`` (``"b_simple"``, ``"grad_sq"`` or ``"trace_cov"``):
        the estimate ± z·stderr, with the delete-one jackknife standard error over the batch's examples
        (:func:`jackknife_noise_scale`, a normal approximation).

        Coverage (simulated, Gaussian per-example gradients, 1000 trials, nominal 90%): 89–92% for
        B ∈ {16, 64, 256} at B_simple = 16; it falls (84% at B_simple = 4B) when the batch is much
        smaller than B_simple, where a single step says little: read the EMA's interval
        (:meth:`NoiseScaleEMA.interval`) there.

        Raises:
            ValueError: no standard error (``stderr`` is None): the statistics had no inner
                products relative to their own mean (``inner_products=True``), fewer than 3
                examples, or another estimator; the message says which.
        """
        if self.stderr is None:
            raise ValueError(f"NoiseScale.interval: {self.stderr_missing or 'no standard error for this estimator'}")
        if of not in self.stderr:
            raise ValueError(f"NoiseScale.interval: of must be one of {sorted(self.stderr)}, got {of!r}")
        z = _normal_quantile(level)
        value = getattr(self, of)
        return value - z * self.stderr[of], value + z * self.stderr[of]


def _noise_scale(mo: _Moments, jackknife: Mapping[str, float] | None = None, why: str = "") -> NoiseScale:
    b = mo.n
    if mo.trace is not None:
        # tr Σ from the per-element variance: no cancellation (m − ‖ḡ‖² loses every digit in float32 once
        # |ḡ|/σ ≳ 1e3); |G|² = ‖ḡ‖² − tr Σ/B is the same unbiased estimator, (B‖ḡ‖² − m)/(B − 1).
        trace_cov = max(mo.trace, 0.0)
        grad_sq = mo.mean_sq - trace_cov / b
    else:
        grad_sq = (b * mo.mean_sq - mo.m) / (b - 1)
        trace_cov = max((mo.m - mo.mean_sq) * b / (b - 1), 0.0)
    return NoiseScale(
        b, grad_sq, trace_cov, _div(trace_cov, grad_sq), mo.mean_sq, mo.m, stderr=jackknife, stderr_missing=why
    )


def jackknife_noise_scale(
    n: int, sq_norms: Tensor, inner_products: Tensor, mean_sq_norm: Tensor | float
) -> dict[str, Tensor]:
    """Delete-one jackknife standard errors of |G|², tr Σ and B_simple, in closed form (no second pass).

    Leaving example i out of a batch of B (g_i, ḡ, s_i = ‖g_i‖², p_i = ⟨g_i, ḡ⟩):

    - ‖ḡ_(−i)‖² = (B²‖ḡ‖² − 2B p_i + s_i)/(B − 1)²
    - m_(−i) = (B m − s_i)/(B − 1)

    and the estimators of :func:`gradient_noise_scale` on the B − 1 remaining
    examples give θ_(−i); the jackknife standard error is
    sqrt((B − 1)/B · Σ_i (θ_(−i) − mean θ_(−·))²) (Efron & Stein 1981).

    Vectorised: ``sq_norms`` and ``inner_products`` are ``[..., B]`` and
    ``mean_sq_norm`` ``[...]`` (any leading shape: trials in a simulation).
    Returns ``{"grad_sq", "trace_cov", "b_simple"}`` standard errors, float64, of shape ``[...]``.

    >>> import torch
    >>> g = torch.tensor([[1., 0.], [3., 2.], [2., 1.], [2., 3.]], dtype=torch.float64)
    >>> se = jackknife_noise_scale(4, (g * g).sum(1), g @ g.mean(0), g.mean(0).pow(2).sum())
    >>> round(float(se["trace_cov"]), 6)   # = the spread of tr Σ of the 4 leave-one-out batches, by a loop
    1.290994
    """
    b = int(n)
    if b < 3:
        raise ValueError(f"the jackknife needs at least 3 examples (got {b}): leaving one out must leave 2")
    s = sq_norms.detach().double()
    p = inner_products.detach().double()
    a = torch.as_tensor(mean_sq_norm, dtype=torch.float64, device=s.device)
    m = s.mean(-1, keepdim=True)
    a_loo = (b * b * a.unsqueeze(-1) - 2 * b * p + s) / (b - 1) ** 2
    m_loo = (b * m - s) / (b - 1)
    k = b - 1
    grad_sq = (k * a_loo - m_loo) / (k - 1)
    trace = (m_loo - a_loo) * k / (k - 1)
    ratio = trace / grad_sq

    def se(theta: Tensor) -> Tensor:
        return ((theta - theta.mean(-1, keepdim=True)).pow(2).sum(-1) * (b - 1) / b).sqrt()

    return {"grad_sq": se(grad_sq), "trace_cov": se(trace), "b_simple": se(ratio)}


def _normal_quantile(level: float) -> float:
    if not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def _t_quantile(level: float, dof: int) -> float:
    """Student-t two-sided quantile by the Cornish–Fisher expansion around the normal (error < 1e-3 for dof ≥ 4)."""
    z = _normal_quantile(level)
    v = float(dof)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
    )


def _stats_jackknife(stats: GradStats, names: Sequence[str] | None = None) -> tuple[dict[str, float] | None, str]:
    """The jackknife standard errors of ``stats`` (all parameters), or None and why not."""
    if stats.inner_products is None:
        return None, (
            "no standard error: these statistics have no inner products <g_i, mean gradient>; compute "
            "them with inner_products=True (grad_stats / Tracker) to get the jackknife interval"
        )
    if names is not None and list(names) != stats.names:
        return None, "no standard error per layer: the inner products are over all parameters"
    if not _reference_is_mean(stats):
        return None, (
            "no standard error: the inner products are relative to a shared reference, not this batch's "
            "mean gradient (records merged from micro-batches or ranks); the jackknife needs <g_i, mean>"
        )
    if stats.n < 3:
        return None, "no standard error: the jackknife needs at least 3 examples"
    mean_sq = _mean_sq(stats)
    se = jackknife_noise_scale(stats.n, stats.sq_norms, stats.inner_products, mean_sq)
    return {k: float(v) for k, v in se.items()}, ""


def gradient_noise_scale(stats: GradStats) -> NoiseScale:
    """The simple noise scale of one batch, with its unbiased numerator and denominator.

    With B = ``stats.n``, ḡ the mean gradient and m = (1/B) Σ_i ‖g_i‖²
    (McCandlish et al. 2018, arXiv:1812.06162, App. A, B_small = 1, B_big = B):

    - |G|² ≈ (B‖ḡ‖² − m)/(B − 1)        (``grad_sq``)
    - tr Σ ≈ (m − ‖ḡ‖²)·B/(B − 1)       (``trace_cov``)
    - B_simple = tr Σ / |G|²             (``b_simple``)

    Both estimates are unbiased when the batch is drawn with replacement from
    the data distribution. Their ratio is not: over training, use
    :class:`NoiseScaleEMA`. Needs only ``mean`` and ``param_sq_norms``.

    Numerics. Where the per-element variance was kept (``var=True``, the
    default), tr Σ = Σ_j Var_j (the sum of ``stats.m2 / (B − 1)``) and
    |G|² = ‖ḡ‖² − tr Σ / B: the same estimators, without the cancellation of
    m − ‖ḡ‖². In float32, B_simple then stays within 1% of float64 up to
    |ḡ|/sqrt(tr Σ) = 1e4 at least (tested on Linear(256, 1) + MSE, B = 64).
    With norms only (``var=False``), m − ‖ḡ‖² is a difference of two numbers
    that agree to about log10(‖ḡ‖²/tr Σ) ≈ log10(1/B_simple) digits, so in
    float32 tr Σ and B_simple carry a relative error of roughly 1e-8/B_simple
    to 1e-7/B_simple (measured on that model with both engines: 1e-4 at
    B_simple ≈ 2e-4, 0.1–2% at 2e-6, 70–170% at 2e-8). Compute in float64,
    or keep the variance, when B_simple is that small.

    Uncertainty. With inner products relative to the batch's own mean
    (``inner_products=True``), ``stderr`` holds the delete-one jackknife
    standard errors of ``grad_sq``, ``trace_cov`` and ``b_simple``
    (:func:`jackknife_noise_scale`) and :meth:`NoiseScale.interval` gives an
    interval; otherwise ``stderr`` is None and ``stderr_missing`` says why.

    Returns:
        a :class:`NoiseScale`. An all-zero gradient gives ``grad_sq = trace_cov = 0``
        and ``b_simple = NaN``.

    Raises:
        ValueError: B = 1, or non-finite statistics.
    """
    _require_two("gradient_noise_scale", stats)
    _require_finite("gradient_noise_scale", stats, "mean", "param_sq_norms", "m2", "inner_products")
    return _noise_scale(_moments(stats), *_stats_jackknife(stats))


def two_batch_noise_scale(b_small: float, small_sq_norm: float, b_big: float, big_sq_norm: float) -> NoiseScale:
    """|G|², tr Σ and B_simple from the squared gradient norms at two batch sizes.

    McCandlish et al. 2018 (arXiv:1812.06162), App. A.1: E‖G_B‖² = |G|² + tr Σ / B, so

    - |G|² ≈ (B_big‖G_big‖² − B_small‖G_small‖²)/(B_big − B_small)
    - tr Σ ≈ (‖G_small‖² − ‖G_big‖²)/(1/B_small − 1/B_big)
    - B_simple = tr Σ / |G|²

    Both are unbiased; unlike the per-example estimator, tr Σ here may come out
    negative (it is not clamped: clamping would bias it). Arithmetic in float64.

    Returns:
        a :class:`NoiseScale` with ``estimator="rank"``, ``n = b_big`` and
        ``mean_example_sq_norm = small_sq_norm``.

    Raises:
        ValueError: unless 0 < b_small < b_big, or non-finite norms.
    """
    b_small, b_big = float(b_small), float(b_big)
    small_sq_norm, big_sq_norm = float(small_sq_norm), float(big_sq_norm)
    if not 0 < b_small < b_big:
        raise ValueError(
            f"two_batch_noise_scale needs 0 < b_small < b_big, got b_small={b_small}, b_big={b_big} "
            "(with one rank, or no smaller batch, there is nothing to compare)"
        )
    if not (math.isfinite(small_sq_norm) and math.isfinite(big_sq_norm)):
        raise ValueError(f"two_batch_noise_scale: non-finite squared norms ({small_sq_norm}, {big_sq_norm})")
    grad_sq = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace_cov = (small_sq_norm - big_sq_norm) / (1 / b_small - 1 / b_big)
    return NoiseScale(
        int(b_big) if b_big.is_integer() else b_big,
        grad_sq,
        trace_cov,
        _div(trace_cov, grad_sq),
        big_sq_norm,
        small_sq_norm,
        estimator="rank",
        b_small=b_small,
    )


def rank_noise_scale(stats: GradStats) -> NoiseScale:
    """The rank-level noise estimator of an all-reduced GradStats (McCandlish et al. 2018, App. A.1).

    B_small is each rank's batch and B_big = N the global one; ‖G_small‖² is
    the mean over the W ranks of ‖ḡ_r‖² (``stats.part_mean_sq_norms``) and
    ‖G_big‖² = ‖ḡ‖² of the global mean. With unequal batches n_r, B_small is
    their harmonic mean, W / Σ_r (1/n_r): E‖ḡ_r‖² = |G|² + tr Σ/n_r, so the
    mean over ranks is |G|² + tr Σ/B_small and the estimator stays unbiased.
    This is what nanoGNS and gpt-neox compute under DDP; it needs no
    per-example norms. :func:`gradient_noise_scale` of the same record is the
    per-example estimator (B_small = 1), with lower variance.

    Raises:
        ValueError: a record that was not all-reduced (no ``part_sizes``: use
            :meth:`GradStats.all_reduce`), fewer than 2 ranks, or non-finite statistics.
    """
    if not isinstance(stats, GradStats):
        raise TypeError(f"rank_noise_scale takes a GradStats, not {type(stats).__name__}")
    if stats.part_sizes is None:
        raise ValueError(
            "rank_noise_scale needs the per-rank batch sizes and mean-gradient norms of an "
            "all-reduced record: call persample.distributed.all_reduce_stats(stats) first; "
            "Tracker does this under torch.distributed"
        )
    if len(stats.part_sizes) < 2:
        raise ValueError(f"rank_noise_scale needs at least 2 ranks, got {len(stats.part_sizes)}")
    _require_finite("rank_noise_scale", stats, "mean")
    world = len(stats.part_sizes)
    b_small = world / sum(1.0 / n for n in stats.part_sizes)
    small_sq_norm = math.fsum(stats.part_mean_sq_norms) / world  # type: ignore[arg-type]  # set with part_sizes
    return two_batch_noise_scale(b_small, small_sq_norm, stats.n, _mean_sq(stats))


# ------------------------------------------------------- preconditioned noise scale


def adam_preconditioner(
    optimizer: torch.optim.Optimizer,
    names: Sequence[str] | None = None,
    *,
    model: torch.nn.Module | Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Adam's diagonal preconditioner as it stands now, ``{name: P}``: P_j = 1/(sqrt(v̂_j) + ε) where
    Adam has a second-moment estimate (v̂_j > 0), and P_j = 0 (the coordinate is left out) where it has none.

    v̂ = ``exp_avg_sq`` / (1 − β₂^t) is the bias-corrected second moment after the t
    steps the optimizer has taken (``max_exp_avg_sq`` with ``amsgrad=True``): read it
    **before** ``optimizer.step()``, and it is the P that step divides by (up to this
    step's own update of v, which the noise scale leaves out by design: P must not
    depend on the gradient it weighs). Works for ``torch.optim.Adam`` and ``AdamW``.

    **Uninformed coordinates.** v̂_j = 0 means every gradient coordinate j has had so far
    was exactly 0: a ReLU unit or an input feature that has been silent, an embedding
    row not yet seen, a parameter that has had no gradient at all (Adam then holds no
    state for it). Adam has no scale for such a coordinate. Its next update is not a
    step along P·g for any P fixed in advance: with m and v both 0 before it, the update
    is lr·(1−β₁)/(1−β₁^t)·sqrt((1−β₂^t)/(1−β₂))·sign(g_j), whatever |g_j| is. Read
    before the step, the formula would give it the weight 1/ε (1e8 for the default ε),
    so a coordinate's first nonzero gradient would swamp both sums of the noise scale
    (in ``persample demo --optimizer adam`` it made GᵀPG −34857 on one step against ~60
    on the others, and left the B^P EMA negative for 80 steps). Such coordinates get
    P_j = 0: the noise scale is then the one over the coordinates Adam has a scale for,
    P stays a function of the past only (so the estimates stay unbiased given P), and
    :attr:`NoiseScale.excluded` counts the coordinates left out. Why not v̂ after the
    step instead: P would then depend on this batch's gradient, the quantity it weighs
    (E ḡ_j² = G_j² + Σ_jj/B needs P fixed); and a floor on v̂ would be an arbitrary scale.

    Parameters are matched to names through ``model.named_parameters()`` (or a
    ``{name: parameter}`` dict), or through the optimizer's own ``param_names``
    when it was built from ``model.named_parameters()``.

    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.Adam(model.parameters(), eps=1e-8)
    >>> model(torch.tensor([[1., 0.]])).sum().backward(); opt.step()
    >>> P = adam_preconditioner(opt, model=model)
    >>> sorted(P), round(float(P["bias"]), 3)   # v̂ = g² after one step: P = 1/(|g| + ε)
    (['bias', 'weight'], 1.0)
    >>> (P["weight"] > 0).tolist()   # the second input was 0: no gradient yet, so no scale: left out
    [[True, False]]

    Raises:
        ValueError: another optimizer, a parameter the optimizer does not hold, no
            way to name the parameters, or an optimizer with no state yet (before
            its first step P is undefined: use B_simple for that step).
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(
            f"the preconditioned noise scale reads Adam's second moments from torch.optim.Adam / "
            f"AdamW; {type(optimizer).__name__} is neither: pass preconditioner={{name: P}} "
            f"(the diagonal of its preconditioner per parameter) instead"
        )
    by_name: dict[str, tuple[Tensor, dict]] = {}
    if model is not None:
        named = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else dict(model)
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for name, p in named.items():
            if id(p) in group_of:
                by_name[name] = (p, group_of[id(p)])
    else:
        for group in optimizer.param_groups:
            if "param_names" not in group:
                raise ValueError(
                    "adam_preconditioner: cannot tell which parameter is which: pass model= (the "
                    "model whose named_parameters() the statistics are keyed by), or build the "
                    "optimizer from model.named_parameters()"
                )
            by_name.update({n: (p, group) for n, p in zip(group["param_names"], group["params"])})
    wanted = list(by_name) if names is None else list(names)
    for name in wanted:
        if name not in by_name:
            raise ValueError(
                f"adam_preconditioner: the optimizer holds no parameter named {name!r}; the "
                f"statistics and the optimizer must cover the same parameters"
            )
    if not _optimizer_stepped(optimizer):
        raise ValueError(
            f"adam_preconditioner: {type(optimizer).__name__} has no state yet (it has not taken a "
            f"step): Adam's preconditioner is undefined before its first step; use B_simple there "
            f"(diagnostics reports NaN for that step)"
        )
    out: dict[str, Tensor] = {}
    for name in wanted:
        p, group = by_name[name]
        state = optimizer.state.get(p, {})
        if float(state.get("step", 0)) == 0:  # no gradient yet, so no state: every coordinate is uninformed
            out[name] = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
            continue
        key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        if key not in state:
            raise ValueError(
                f"adam_preconditioner: the state of {name!r} has no {key!r} (amsgrad={bool(group.get('amsgrad'))} "
                f"was changed after the optimizer stepped?); Adam's preconditioner cannot be read from it"
            )
        t = float(state["step"])
        beta2 = float(group["betas"][1])
        v_hat = state[key].detach().double() / (1 - beta2**t)
        informed = v_hat > 0
        # where(informed, ...) also keeps ε = 0 finite: 1/sqrt(0) never reaches P
        out[name] = torch.where(informed, 1.0 / (v_hat.sqrt() + float(group["eps"])), torch.zeros_like(v_hat))
    return out


def _preconditioned(stats: GradStats, names: Sequence[str], P: Mapping[str, Tensor]) -> NoiseScale:
    assert stats.m2 is not None  # callers check var=True
    _refuse_sharded("preconditioned_noise_scale", stats)
    b = stats.n
    trace, signal, mean_sq, excluded = 0.0, 0.0, 0.0, 0
    for k in names:
        w = torch.broadcast_to(P[k].detach().to(stats.mean[k].device).double(), stats.mean[k].shape)
        var = stats.m2[k].detach().double() / (b - 1)
        mu2 = stats.mean[k].detach().double().pow(2)
        trace += float((w * var).sum())
        mean_sq += float((w * mu2).sum())
        excluded += int((w == 0).sum())
    signal = mean_sq - trace / b
    return NoiseScale(
        b,
        signal,
        trace,
        _div(trace, signal),
        mean_sq,
        mean_sq + trace * (b - 1) / b,
        estimator="preconditioned",
        excluded=excluded,
    )


def _resolve_preconditioner(fn: str, stats: GradStats, optimizer, preconditioner, model) -> dict[str, Tensor]:
    _require_two(fn, stats)
    _refuse_sharded(fn, stats)
    if stats.m2 is None:
        raise ValueError(
            f"{fn} needs the per-element variance (tr(PΣ) = Σ_j P_j Var_j weighs each element), but "
            f"these statistics have none: compute them with var=True (the default) in grad_stats / "
            f"Tracker"
        )
    if (optimizer is None) == (preconditioner is None):
        raise ValueError(
            f"{fn}: pass exactly one of optimizer= (torch.optim.Adam / AdamW) and "
            f"preconditioner= ({{name: P}}, the diagonal of the preconditioner)"
        )
    _require_finite(fn, stats, "mean", "m2")
    if optimizer is not None:
        return adam_preconditioner(optimizer, stats.names, model=model)
    P = dict(preconditioner)
    for k in stats.names:
        if k not in P:
            raise ValueError(
                f"{fn}: preconditioner has no entry for {k!r} (it needs one per parameter of the "
                f"statistics, a tensor of the parameter's shape or a scalar)"
            )
        w = torch.as_tensor(P[k]).detach().double()
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"{fn}: preconditioner[{k!r}] must be finite and ≥ 0")
        P[k] = torch.broadcast_to(w.to(stats.mean[k].device), stats.mean[k].shape)
    return P


def preconditioned_noise_scale(
    stats: GradStats,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    preconditioner: Mapping[str, Tensor | float] | None = None,
    model: torch.nn.Module | Mapping[str, Tensor] | None = None,
) -> NoiseScale:
    """The noise scale an Adam-type optimizer sees: B^P = tr(PΣ) / GᵀPG, for a diagonal preconditioner P.

    A step of a preconditioned optimizer moves along P·ḡ, so its loss decrease
    is governed by the gradient and the noise measured in P's metric: McCandlish
    et al.'s (2018) argument for B_simple, applied to the step −εPḡ, with P
    treated as fixed during the step. With Var_j the unbiased per-element
    variance of the per-example gradients (``stats.m2 / (B − 1)``):

    - tr(PΣ) ≈ Σ_j P_j Var_j                 (``trace_cov``, unbiased)
    - GᵀPG  ≈ Σ_j P_j (ḡ_j² − Var_j / B)     (``grad_sq``, unbiased: E ḡ_j² = G_j² + Σ_jj/B)
    - B^P = tr(PΣ) / GᵀPG                   (``b_simple``)

    P comes from ``optimizer`` (Adam / AdamW: P_j = 1/(sqrt(v̂_j) + ε) where v̂_j > 0
    and 0 where v̂_j = 0, v̂ the bias-corrected ``exp_avg_sq`` as it stands before
    this step's update, see :func:`adam_preconditioner` and ``docs/noise.md``) or
    from ``preconditioner={name: P}``. With P = 1 it is :func:`gradient_noise_scale`'s
    B_simple.

    Coordinates with P_j = 0 weigh nothing in either sum, and ``excluded`` counts
    them. From an optimizer, they are the coordinates Adam has no second-moment
    estimate for yet (v̂_j = 0: every gradient they had so far was 0); Adam has no
    scale for them, and 1/ε would swamp both sums, so B^P is the noise scale over
    the coordinates Adam has a scale for (see :func:`adam_preconditioner` for why).

    When it differs from B_simple: Adam divides each coordinate by its typical
    gradient size, so coordinates with large gradients (and, usually, large noise:
    embeddings of rare tokens, the last layer) count for less, and small, quiet
    ones for more. B^P and B_simple differ when the noise-to-signal ratio is not
    the same across coordinates of different scale; since the critical batch size
    of an Adam run is set by B^P (an SGD run's by B_simple), read B^P for Adam.

    Returns:
        a :class:`NoiseScale` with ``estimator="preconditioned"``,
        ``mean_sq_norm = Σ_j P_j ḡ_j²``, ``mean_example_sq_norm`` = (1/B)Σ_i‖g_i‖²_P
        and ``excluded`` = #{j: P_j = 0}.

    >>> import torch, persample
    >>> g = {"w": torch.tensor([[1., 0.], [3., 2.], [2., 1.]], dtype=torch.float64)}   # B = 3 examples
    >>> stats = persample.GradStats.from_per_example(g, torch.zeros(3, dtype=torch.float64))
    >>> est = preconditioned_noise_scale(stats, preconditioner={"w": torch.tensor([1., 4.])})
    >>> est.trace_cov, est.grad_sq   # Var = (1, 1): tr = 1 + 4; ḡ = (2, 1): GᵀPG = (4 − 1/3) + 4(1 − 1/3)
    (5.0, 6.333333333333333)
    >>> est = preconditioned_noise_scale(stats, preconditioner={"w": torch.tensor([1., 0.])})
    >>> est.trace_cov, est.grad_sq, est.excluded   # the second coordinate left out: the first one's alone
    (1.0, 3.6666666666666665, 1)

    Raises:
        ValueError: no variance (``var=False``), B = 1, neither or both of
            ``optimizer`` and ``preconditioner``, an optimizer with no state yet
            or of another kind (see :func:`adam_preconditioner`), a missing or
            negative entry, or non-finite statistics.
    """
    P = _resolve_preconditioner("preconditioned_noise_scale", stats, optimizer, preconditioner, model)
    return _preconditioned(stats, stats.names, P)


def layer_preconditioned_noise_scale(
    stats: GradStats,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    preconditioner: Mapping[str, Tensor | float] | None = None,
    model: torch.nn.Module | Mapping[str, Tensor] | None = None,
) -> dict[str, NoiseScale]:
    """:func:`preconditioned_noise_scale` for each layer (module prefix, see :func:`group_by_layer`);
    the layers' ``grad_sq`` and ``trace_cov`` add up to the whole model's. Raises as it does."""
    P = _resolve_preconditioner("layer_preconditioned_noise_scale", stats, optimizer, preconditioner, model)
    return {layer: _preconditioned(stats, names, P) for layer, names in group_by_layer(stats.names).items()}


class NoiseScaleEMA:
    """B_simple over training: the ratio of bias-corrected EMAs of tr Σ and |G|².

    McCandlish et al. (2018, App. A.1) smooth the numerator and the denominator
    **separately** and divide only then; the mean of per-step ratios is badly
    biased (the ratio of two noisy estimates). After updates with estimates
    (s_1, G_1), …, (s_t, G_t)::

        S_t = β S_{t−1} + (1 − β) s_t,   Ŝ_t = S_t / (1 − β^t)   (same for G)
        value = Ŝ_t / Ĝ_t

    The object is also a :class:`persample.Tracker` hook: ``tracker.register_hook(ema)``
    calls :meth:`update` on every statistics step.

    :meth:`interval` gives a confidence interval that reflects the step-to-step
    variation of the estimates (batch means over the last ``window`` updates).

    Args:
        beta: the EMA's decay, 0 ≤ beta < 1; the default 0.95 averages over about 20 updates.
        window: how many recent (tr Σ, |G|²) pairs :meth:`interval` uses; default
            max(10, round(2/(1 − beta))) (40 for beta = 0.95, about the EMA's
            effective number of steps).
    """

    def __init__(self, beta: float = DEFAULT_EMA_BETA, window: int | None = None):
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 <= beta < 1:
            raise ValueError(f"beta must be a number with 0 <= beta < 1, got {beta!r}")
        self.beta = float(beta)
        if window is None:
            window = max(10, round(2 / (1 - self.beta)))
        if not isinstance(window, int) or isinstance(window, bool) or window < 4:
            raise ValueError(f"window must be an integer ≥ 4, got {window!r}")
        self.window = window
        self.steps = 0
        self._trace_cov = 0.0
        self._grad_sq = 0.0
        self._history: list[tuple[float, float]] = []

    def update(self, stats: GradStats | NoiseScale) -> float:
        """Fold in one batch (a GradStats or its :class:`NoiseScale`) and return :attr:`value`."""
        est = stats if isinstance(stats, NoiseScale) else gradient_noise_scale(stats)
        b = self.beta
        self._trace_cov = b * self._trace_cov + (1 - b) * est.trace_cov
        self._grad_sq = b * self._grad_sq + (1 - b) * est.grad_sq
        self.steps += 1
        self._history.append((float(est.trace_cov), float(est.grad_sq)))
        del self._history[: -self.window]
        return self.value

    def interval(self, level: float = 0.9, batches: int = 10) -> tuple[float, float]:
        """A ``level`` interval around :attr:`value` from the step-to-step variation of the estimates.

        Batch means over the last ``window`` updates: they are cut into K = min(``batches``,
        updates) consecutive batches with sums (T_k, G_k) of tr Σ and |G|²; the window's
        ratio r = ΣT_k / ΣG_k has the delta-method standard error
        se = sd_k((T_k − r·G_k) / Ḡ) / sqrt(K), and the interval is value ± t_{K−1}·se.
        Consecutive batches are treated as independent, and drift over the window counts
        as variation: the interval is wider while B_simple is changing.

        Returns ``(nan, nan)`` with fewer than 4 updates, or when the window's mean |G|² ≤ 0
        (no signal: B_simple is not resolved).

        >>> ema = NoiseScaleEMA(0.9)
        >>> for k in range(20):
        ...     _ = ema.update(NoiseScale(8, 1.0 + 0.1 * (k % 3), 10.0 + (k % 5), 0.0, 0.0, 0.0))
        >>> lo, hi = ema.interval(0.9); lo < ema.value < hi
        True
        """
        h = self._history
        k = min(int(batches), len(h))
        if k < 4:
            return math.nan, math.nan
        size = len(h) // k
        h = h[len(h) - k * size :]
        t = [math.fsum(x[0] for x in h[i * size : (i + 1) * size]) / size for i in range(k)]
        g = [math.fsum(x[1] for x in h[i * size : (i + 1) * size]) / size for i in range(k)]
        g_bar = math.fsum(g) / k
        if not g_bar > 0:
            return math.nan, math.nan
        r = math.fsum(t) / math.fsum(g)
        d = [(ti - r * gi) / g_bar for ti, gi in zip(t, g)]
        d_bar = math.fsum(d) / k
        se = math.sqrt(math.fsum((x - d_bar) ** 2 for x in d) / (k - 1) / k)
        q = _t_quantile(level, k - 1)
        return self.value - q * se, self.value + q * se

    def __call__(self, tracker, stats: GradStats) -> None:
        self.update(stats)

    @property
    def trace_cov(self) -> float:
        """Bias-corrected EMA of tr Σ (NaN before the first update)."""
        return self._trace_cov / (1 - self.beta**self.steps) if self.steps else math.nan

    @property
    def grad_sq(self) -> float:
        """Bias-corrected EMA of |G|² (NaN before the first update)."""
        return self._grad_sq / (1 - self.beta**self.steps) if self.steps else math.nan

    @property
    def value(self) -> float:
        """Smoothed B_simple = EMA(tr Σ) / EMA(|G|²); NaN before the first update or when both are 0."""
        if not self.steps:
            return math.nan
        return _div(self.trace_cov, self.grad_sq)

    def reset(self) -> None:
        self.steps, self._trace_cov, self._grad_sq = 0, 0.0, 0.0
        self._history = []

    def state_dict(self) -> dict:
        """``{"beta", "steps", "trace_cov", "grad_sq", "window", "history"}`` (the raw, uncorrected EMAs and
        the window behind :meth:`interval`): plain floats, JSON-safe.

        >>> ema = NoiseScaleEMA(0.5)
        >>> ema.update(NoiseScale(8, 2.0, 30.0, 15.0, 0.0, 0.0))
        15.0
        >>> again = NoiseScaleEMA(0.5); again.load_state_dict(ema.state_dict()); again.value
        15.0
        """
        return {
            "beta": self.beta,
            "steps": self.steps,
            "trace_cov": self._trace_cov,
            "grad_sq": self._grad_sq,
            "window": self.window,
            "history": [list(x) for x in self._history],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; a resumed run's values then match an uninterrupted run's exactly."""
        beta = float(state["beta"])
        if beta != self.beta:
            raise ValueError(
                f"NoiseScaleEMA.load_state_dict: the saved EMA has beta={beta}, this one "
                f"beta={self.beta}; construct it with beta={beta} to resume it"
            )
        self.steps = int(state["steps"])
        self._trace_cov = float(state["trace_cov"])
        self._grad_sq = float(state["grad_sq"])
        self.window = int(state.get("window", self.window))
        self._history = [(float(a), float(b)) for a, b in state.get("history", [])][-self.window :]

    def __repr__(self) -> str:
        return f"NoiseScaleEMA(beta={self.beta}, steps={self.steps}, value={self.value:.4g})"


# ------------------------------------------------------------------------- GSNR


def gsnr(stats: GradStats) -> dict[str, Tensor]:
    """Gradient signal-to-noise ratio per element: ḡ_j² / Var_unbiased(g_ij) (Liu et al. 2020).

    Returns ``{name: Tensor[param.shape]}`` in the statistics' dtype (computed in
    float64). An element whose gradient is the same for every example
    (variance 0) gets NaN when that gradient is 0 (for example a dead ReLU unit,
    or an all-zero gradient) and inf otherwise.

    Raises:
        ValueError: B = 1, no variance (``var=False``), or non-finite statistics.
    """
    _require_two("gsnr", stats)
    _require_var("gsnr", stats)
    _require_finite("gsnr", stats, "mean", "m2")
    assert stats.m2 is not None  # _require_var
    out = {}
    for name, mu in stats.mean.items():
        var = stats.m2[name].detach().double() / (stats.n - 1)
        out[name] = (mu.detach().double().pow(2) / var).to(mu.dtype)
    return out


def _mean_gsnr(stats: GradStats, names: Sequence[str]) -> float:
    assert stats.m2 is not None  # callers check var=True
    if stats.shard is not None:  # the global sums over every shard (stats.shard.sums)
        count = stats.shard.total("gsnr_count", names)
        return stats.shard.total("gsnr", names) / count if count else math.nan
    total, count = 0.0, 0
    for name in names:
        var = stats.m2[name].detach().double() / (stats.n - 1)
        keep = var > 0
        count += int(keep.sum())
        total += float((stats.mean[name].detach().double()[keep].pow(2) / var[keep]).sum())
    return total / count if count else math.nan


def mean_gsnr(stats: GradStats) -> float:
    """Mean of :func:`gsnr` over all elements whose variance is positive.

    Elements with zero variance (GSNR NaN or inf, see :func:`gsnr`) are left
    out; NaN when no element has a positive variance (e.g. an all-zero gradient).

    Raises:
        ValueError: B = 1, no variance, or non-finite statistics.
    """
    _require_two("mean_gsnr", stats)
    _require_var("mean_gsnr", stats)
    _require_finite("mean_gsnr", stats, "mean", "m2")
    return _mean_gsnr(stats, stats.names)


# ---------------------------------------------------------------- batch-size tests


@dataclass(frozen=True)
class BatchSizeTest:
    """The result of an adaptive batch-size test on one batch.

    Attributes:
        name: ``"norm"``, ``"inner_product"`` or ``"orthogonality"``.
        statistic: θ (or ν) estimated from the batch; the test passes when it is
            at most ``threshold``.
        threshold: the θ / ν the test was run with.
        passed: ``statistic <= threshold`` (False when the statistic is NaN).
        variance: the estimated variance the statistic is built from (its
            numerator times B).
        n: the batch size B.
        suggested_batch_size: the smallest batch size for which the statistic,
            with the same variance estimate, would meet the threshold:
            max(1, ⌈B·(statistic/threshold)²⌉), as a float; inf or NaN when the
            statistic is.
    """

    name: str
    statistic: float
    threshold: float
    passed: bool
    variance: float
    n: int
    suggested_batch_size: float


def _check_threshold(fn: str, threshold: float) -> float:
    if (
        not isinstance(threshold, (int, float))
        or isinstance(threshold, bool)
        or not threshold > 0
        or not math.isfinite(threshold)
    ):
        raise ValueError(f"{fn}: threshold must be a positive finite number, got {threshold!r}")
    return float(threshold)


def _make_test(name: str, variance: float, scale: float, n: int, threshold: float) -> BatchSizeTest:
    """statistic = sqrt(variance / (B·scale)); suggested B = variance / (threshold²·scale)."""
    stat = _sqrt(_div(variance, n * scale))
    b_star = _div(variance, threshold**2 * scale)
    if math.isfinite(b_star):
        # Roundoff guard: B·(θ/η)² = 31.999999999 must suggest 32, not 33.
        suggested = float(max(1, math.ceil(b_star * (1 - 1e-12))))
    else:
        suggested = b_star
    return BatchSizeTest(name, stat, threshold, bool(stat <= threshold), variance, n, suggested)


def norm_test(stats: GradStats, threshold: float = DEFAULT_NORM_THRESHOLD) -> BatchSizeTest:
    """The norm test of Byrd, Chin, Nocedal & Wu (2012).

    θ = sqrt( tr Σ̂ / (B‖ḡ‖²) ), with tr Σ̂ the unbiased trace of the per-example
    covariance (see :func:`gradient_noise_scale`): the estimated relative error
    ‖ḡ − ∇F‖/‖ḡ‖ of the batch gradient. The test passes when θ ≤ ``threshold``
    (Byrd et al. need θ < 1); the suggested batch size is
    B* = tr Σ̂ / (threshold²·‖ḡ‖²). With threshold 1 this is tr Σ̂ / ‖ḡ‖², the
    simple noise scale of McCandlish et al. with the biased ‖ḡ‖² in place of |G|².

    ḡ = 0 gives θ = inf (and B* = inf) when the examples disagree, NaN when every
    gradient is zero.

    Raises:
        ValueError: B = 1, non-finite statistics, or a non-positive threshold.
    """
    _require_two("norm_test", stats)
    threshold = _check_threshold("norm_test", threshold)
    _require_finite("norm_test", stats, "mean", "param_sq_norms")
    est = _noise_scale(_moments(stats))
    return _make_test("norm", est.trace_cov, est.mean_sq_norm, stats.n, threshold)


def _inner_products(fn: str, stats: GradStats) -> tuple[Tensor, bool]:
    """(p_i = ⟨g_i, r⟩ as float64, whether the reference r is this batch's own mean ḡ)."""
    if stats.inner_products is None:
        raise ValueError(
            f"{fn} needs the inner products p_i = <g_i, mean gradient>, but these statistics have none: "
            f"pass inner_products=True to persample.grad_stats / persample.Tracker (records merged "
            f"from batches with different references lose them)"
        )
    if stats.reference is None or stats.reference.keys() != stats.mean.keys():
        raise ValueError(
            f"{fn}: stats.inner_products has no reference over the same parameters; recompute with inner_products=True"
        )
    return stats.inner_products.detach().double(), _reference_is_mean(stats)


def _reference_is_mean(stats: GradStats) -> bool:
    """Whether ``stats.reference`` is the batch's own mean ḡ, within the rounding of its dtype."""
    assert stats.reference is not None  # called with inner products, which come with their reference
    dtype = next(iter(stats.mean.values())).dtype
    rtol = 1e-6 if dtype == torch.float64 else (1e-3 if dtype == torch.float32 else 1e-2)
    if stats.shard is not None:
        diff = _sqrt(stats.shard.total("ref_diff_sq", stats.names))
        scale = max(_sqrt(_mean_sq(stats)), math.sqrt(_f64_sum_sq(stats.reference.values())))
        return diff <= rtol * scale
    diff = math.sqrt(_f64_sum_sq(stats.reference[k].to(stats.mean[k].device) - stats.mean[k] for k in stats.names))
    scale = max(math.sqrt(_mean_sq(stats)), math.sqrt(_f64_sum_sq(stats.reference.values())))
    return diff <= rtol * scale


def _mean_dot_reference(stats: GradStats) -> float:
    """⟨ḡ, r⟩ summed in float64."""
    assert stats.reference is not None  # called with inner products, which come with their reference
    if stats.shard is not None:
        return stats.shard.total("ref_dot", stats.names)
    return sum(
        float((stats.mean[k].detach().double() * stats.reference[k].detach().to(stats.mean[k].device).double()).sum())
        for k in stats.names
    )


def inner_product_test(stats: GradStats, threshold: float = DEFAULT_INNER_THRESHOLD) -> BatchSizeTest:
    """The inner-product test of Bollapragada, Byrd & Nocedal (2018).

    With p_i = ⟨g_i, ḡ⟩ (``stats.inner_products``, relative to the batch mean):
    θ = sqrt( Var_unbiased(p_i) / (B‖ḡ‖⁴) ). It asks that −ḡ be a descent
    direction with high probability, and is looser than the norm test. Passes
    when θ ≤ ``threshold``; suggests B* = Var(p_i) / (threshold²·‖ḡ‖⁴).

    Against another reference r (``stats.reference``: a direction shared by
    micro-batches or ranks, such as the previous step's mean, see
    ``Tracker.accumulate(reference=...)``), p_i = ⟨g_i, r⟩ and r stands in for
    the direction of the true gradient:
    θ = sqrt( Var_unbiased(p_i) / (B⟨ḡ, r⟩²) ), the relative standard error of
    the batch's directional derivative ⟨ḡ, r⟩ along r. It does not depend on
    r's length, and for r = ḡ (or any c·ḡ, c > 0) it is the test above.

    ḡ = 0 (or ⟨ḡ, r⟩ = 0) gives NaN or inf.

    Raises:
        ValueError: no inner products (pass ``inner_products=True`` to
            ``grad_stats`` / ``Tracker``), B = 1, non-finite statistics, or a
            non-positive threshold.
    """
    _require_two("inner_product_test", stats)
    threshold = _check_threshold("inner_product_test", threshold)
    _require_finite("inner_product_test", stats, "mean", "param_sq_norms", "inner_products")
    p, along_mean = _inner_products("inner_product_test", stats)
    var_p = float(((p - p.mean()) ** 2).sum()) / (stats.n - 1)
    signal = _mean_sq(stats) if along_mean else _mean_dot_reference(stats)
    return _make_test("inner_product", var_p, signal**2, stats.n, threshold)


def orthogonality_test(stats: GradStats, threshold: float = DEFAULT_ORTHO_THRESHOLD) -> BatchSizeTest:
    """The orthogonality test of Bollapragada, Byrd & Nocedal (2018).

    With p_i = ⟨g_i, ḡ⟩, the component of g_i orthogonal to ḡ has squared norm
    ‖g_i‖² − p_i²/‖ḡ‖², and
    ν = sqrt( [Σ_i (‖g_i‖² − p_i²/‖ḡ‖²)/(B − 1)] / (B‖ḡ‖²) ).
    It bounds how far the batch gradient may turn away from ḡ's direction, and
    is used together with :func:`inner_product_test`. Passes when ν ≤ ``threshold``;
    suggests B* = [Σ_i (‖g_i‖² − p_i²/‖ḡ‖²)/(B − 1)] / (threshold²·‖ḡ‖²).
    The variance is ≥ 0 by Cauchy–Schwarz; it is clamped at 0 against roundoff.

    Needs inner products relative to the batch's own mean: against another
    reference r the orthogonal components g_i − (p_i/‖r‖²) r no longer have
    mean zero, and whether to centre them is a choice the paper does not
    make, so such records are refused (``diagnostics`` reports NaN).

    ḡ = 0 gives NaN.

    Raises:
        ValueError: as :func:`inner_product_test`, and inner products relative
            to a reference other than this batch's mean.
    """
    _require_two("orthogonality_test", stats)
    threshold = _check_threshold("orthogonality_test", threshold)
    _require_finite("orthogonality_test", stats, "mean", "param_sq_norms", "inner_products")
    p, along_mean = _inner_products("orthogonality_test", stats)
    if not along_mean:
        raise ValueError(
            "orthogonality_test needs inner products relative to this batch's mean gradient, but "
            "stats.reference is another direction (a reference shared by micro-batches or ranks, or records "
            "merged from other batches). Compute the statistics of the whole batch in one call with "
            "inner_products=True"
        )
    mean_sq = _mean_sq(stats)
    sq = stats.sq_norms.detach().double()
    if mean_sq == 0:
        var_o = math.nan
    else:
        var_o = max(float((sq - p.pow(2) / mean_sq).sum()) / (stats.n - 1), 0.0)
    return _make_test("orthogonality", var_o, mean_sq, stats.n, threshold)


# -------------------------------------------------------------------- diversity


def gradient_diversity(stats: GradStats) -> float:
    """Gradient diversity Σ_i‖g_i‖² / ‖Σ_i g_i‖² = m / (B‖ḡ‖²) (Yin et al. 2018).

    Between 1/B (all g_i equal) and large values (the g_i cancel out); mini-batch
    SGD scales well up to batch sizes of about B·diversity. Defined for B = 1
    (it is 1 then). NaN for an all-zero gradient (0/0), inf when the g_i sum to
    0 but are not all 0.

    Raises:
        ValueError: non-finite statistics.
    """
    if not isinstance(stats, GradStats):
        raise TypeError(f"gradient_diversity takes a GradStats, not {type(stats).__name__}")
    _require_finite("gradient_diversity", stats, "mean", "param_sq_norms")
    mo = _moments(stats)
    return _div(mo.m, stats.n * mo.mean_sq)


# ---------------------------------------------------------------------- per layer


def group_by_layer(names: Iterable[str]) -> dict[str, list[str]]:
    """Parameter names grouped by module prefix: ``"net.0.weight"`` → ``"net.0"``.

    A root-level parameter (no dot) is its own group. Groups keep the order in
    which their first parameter appears.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    return groups


def layer_noise_scale(stats: GradStats) -> dict[str, NoiseScale]:
    """:func:`gradient_noise_scale` for each layer (module prefix, see :func:`group_by_layer`).

    Each layer's |G|², tr Σ and B_simple use that layer's parameters only, so
    the layers' ``grad_sq`` and ``trace_cov`` add up to the whole model's.

    Raises:
        ValueError: B = 1, or non-finite statistics.
    """
    _require_two("layer_noise_scale", stats)
    _require_finite("layer_noise_scale", stats, "mean", "param_sq_norms")
    return {layer: _noise_scale(_moments(stats, names)) for layer, names in group_by_layer(stats.names).items()}


def layer_gsnr(stats: GradStats) -> dict[str, float]:
    """:func:`mean_gsnr` for each layer (module prefix, see :func:`group_by_layer`).

    NaN for a layer in which no element has positive variance.

    Raises:
        ValueError: B = 1, no variance, or non-finite statistics.
    """
    _require_two("layer_gsnr", stats)
    _require_var("layer_gsnr", stats)
    _require_finite("layer_gsnr", stats, "mean", "m2")
    return {layer: _mean_gsnr(stats, names) for layer, names in group_by_layer(stats.names).items()}


# -------------------------------------------------------------------- one row


#: The batch-size tests :func:`diagnostics` can run, by name.
TESTS = ("norm", "inner_product", "orthogonality")


def _check_tests(tests: Iterable[str]) -> tuple[str, ...]:
    tests = tuple(tests)
    unknown = [t for t in tests if t not in TESTS]
    if unknown:
        raise ValueError(f"unknown batch-size test(s) {unknown}: choose from {list(TESTS)}")
    return tests


def _optimizer_stepped(optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None = None) -> bool:
    """Whether some parameter of ``optimizer`` (or of ``params``) has a state from a step: then Adam's P is
    defined (a parameter without state is uninformed, P = 0 there: see :func:`adam_preconditioner`)."""
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    return any(float(optimizer.state.get(p, {}).get("step", 0)) > 0 for p in params)


def diagnostics(
    stats: GradStats,
    *,
    per_layer: bool = True,
    norm_threshold: float = DEFAULT_NORM_THRESHOLD,
    inner_threshold: float = DEFAULT_INNER_THRESHOLD,
    ortho_threshold: float = DEFAULT_ORTHO_THRESHOLD,
    quantiles: Sequence[float] = (0.1, 0.5, 0.9),
    tests: Iterable[str] = TESTS,
    optimizer: torch.optim.Optimizer | None = None,
    preconditioner: Mapping[str, Tensor | float] | None = None,
    model: torch.nn.Module | Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """Every diagnostic of one batch as a flat ``{name: float}`` row (for loggers and plots).

    Keys: ``n``, ``loss`` (mean of the per-example losses), ``grad_norm`` (‖ḡ‖),
    ``norm_p10``/``norm_p50``/``norm_p90`` (quantiles of the per-example norms
    ‖g_i‖), ``grad_sq``, ``trace_cov``, ``b_simple``, ``gsnr_mean``,
    ``diversity``, and for each test ``norm_test``, ``inner_test``,
    ``ortho_test`` the statistic, its ``…_batch`` (suggested batch size) and
    ``…_threshold``. With inner products relative to the batch's mean, also
    ``b_simple_stderr`` (jackknife) and the 90% interval ``b_simple_lo``, ``b_simple_hi``
    (:meth:`NoiseScale.interval`). On an all-reduced record (2 ranks or more), also
    ``rank_grad_sq``, ``rank_trace_cov`` and ``rank_b_simple``, the rank-level
    estimator (:func:`rank_noise_scale`). With ``per_layer``, also ``layer/<prefix>/grad_sq``,
    ``…/trace_cov``, ``…/b_simple`` and ``…/gsnr`` for each module prefix.

    Values that these statistics cannot give are NaN: ``gsnr*`` without
    variance (``var=False``), the inner-product and orthogonality tests without
    ``inner_products=True``, the orthogonality test when the inner products are
    relative to a reference other than the batch's mean (``inner_test`` is then
    the test along that reference, see :func:`inner_product_test`). Everything else follows the functions above
    (including their ValueError for B = 1 and non-finite statistics).

    ``tests`` names the batch-size tests to run (of :data:`TESTS`); the columns of
    the others are left out, not computed.

    With ``optimizer`` (Adam / AdamW, and ``model`` unless the optimizer was built
    from named parameters) or ``preconditioner``, also ``b_precond``,
    ``grad_sq_precond``, ``trace_cov_precond`` and ``precond_excluded`` (the number
    of coordinates left out, P_j = 0: :func:`preconditioned_noise_scale`)
    and, per layer, ``layer/<prefix>/b_precond``. They are NaN without variance
    and, for an optimizer, before its first step (P undefined).
    """
    _require_two("diagnostics", stats)
    tests = _check_tests(tests)
    _require_finite("diagnostics", stats, "mean", "param_sq_norms", "m2", "inner_products")
    nan = math.nan
    norms = stats.norms.detach().double()
    qs = torch.quantile(norms, torch.tensor(list(quantiles), dtype=torch.float64, device=norms.device))
    est = _noise_scale(_moments(stats), *_stats_jackknife(stats))
    row: dict[str, float] = {
        "n": float(stats.n),
        "loss": float(stats.losses.detach().double().mean()),
        "grad_norm": math.sqrt(est.mean_sq_norm),
    }
    for q, v in zip(quantiles, qs.tolist()):
        row[f"norm_p{round(q * 100):d}"] = v
    row.update(
        grad_sq=est.grad_sq,
        trace_cov=est.trace_cov,
        b_simple=est.b_simple,
        gsnr_mean=_mean_gsnr(stats, stats.names) if stats.m2 is not None else nan,
        diversity=_div(est.mean_example_sq_norm, stats.n * est.mean_sq_norm),
    )
    if est.stderr is not None:
        lo, hi = est.interval(0.9)
        row.update(b_simple_stderr=est.stderr["b_simple"], b_simple_lo=lo, b_simple_hi=hi)
    if stats.part_sizes is not None and len(stats.part_sizes) >= 2:
        rank = rank_noise_scale(stats)
        row.update(rank_grad_sq=rank.grad_sq, rank_trace_cov=rank.trace_cov, rank_b_simple=rank.b_simple)
    precond = None
    if optimizer is not None or preconditioner is not None:
        if stats.m2 is not None and stats.shard is None and (optimizer is None or _optimizer_stepped(optimizer)):
            P = _resolve_preconditioner("diagnostics", stats, optimizer, preconditioner, model)
            precond = _preconditioned(stats, stats.names, P)
            row.update(
                b_precond=precond.b_simple,
                grad_sq_precond=precond.grad_sq,
                trace_cov_precond=precond.trace_cov,
                precond_excluded=float(precond.excluded),
            )
        else:
            row.update(b_precond=nan, grad_sq_precond=nan, trace_cov_precond=nan, precond_excluded=nan)
    runs = [
        ("norm_test", norm_test, norm_threshold),
        ("inner_test", inner_product_test, inner_threshold),
        ("ortho_test", orthogonality_test, ortho_threshold),
    ]
    runs = [run for run, name in zip(runs, TESTS) if name in tests]
    ortho_refused = "orthogonality" in tests and stats.inner_products is not None and not _reference_is_mean(stats)
    for key, fn, threshold in runs:
        if (key != "norm_test" and stats.inner_products is None) or (key == "ortho_test" and ortho_refused):
            row.update({key: nan, f"{key}_batch": nan, f"{key}_threshold": float(threshold)})
            continue
        result = fn(stats, threshold)
        row.update(
            {key: result.statistic, f"{key}_batch": result.suggested_batch_size, f"{key}_threshold": result.threshold}
        )
    if per_layer:
        groups = group_by_layer(stats.names)
        for layer, names in groups.items():
            lest = _noise_scale(_moments(stats, names))
            row[f"layer/{layer}/grad_sq"] = lest.grad_sq
            row[f"layer/{layer}/trace_cov"] = lest.trace_cov
            row[f"layer/{layer}/b_simple"] = lest.b_simple
            row[f"layer/{layer}/gsnr"] = _mean_gsnr(stats, names) if stats.m2 is not None else nan
            if "b_precond" in row:
                row[f"layer/{layer}/b_precond"] = _preconditioned(stats, names, P).b_simple if precond else nan
    return row
