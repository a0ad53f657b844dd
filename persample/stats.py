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
- ``clipped_mean``: (1/n) Σ_i min(1, C/‖g_i‖) g_i for ``clip_norm`` C; optional;
- ``shard``: None, or (under FSDP2, see :class:`Shard`) where this rank's rows of ``mean`` and ``m2``
  sit in each parameter, with the global per-parameter sums every scalar is computed from.

``merge`` is exact (Chan, Golub & LeVeque's pairwise update), so statistics of
chunks, micro-batches or processes combine into the statistics of the
concatenated batch.

Every field declares its reduction once, in its dataclass metadata
(:class:`Reduction`, read with :func:`field_reductions`); ``merge``, ``to`` and
:func:`persample.distributed.all_reduce_stats` are derived from that
declaration instead of listing the fields by hand.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, cast

import torch
from torch import Tensor

__all__ = [
    "GradStats",
    "Reduction",
    "FieldReduction",
    "field_reductions",
    "clip_factors",
    "sum_of_squares",
    "same_value",
    "Shard",
    "shard_rows",
    "SHARD_SUMS",
]


def float64_square_sum(t: Tensor) -> Tensor:
    """Σ t², summed in float64 (a 0-d tensor): the same numbers as ``t.double().pow(2).sum()``, squaring in
    place where ``double()`` made a copy (one P-sized float64 temporary, not two)."""
    wide = t.detach().double()
    return (wide.pow_(2) if wide.data_ptr() != t.data_ptr() else wide.pow(2)).sum()


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
    scratch = None if center is None else torch.empty_like(acc)  # g_i − c, one buffer for every row
    for row in g:
        d = row if center is None else torch.sub(row, center, out=scratch)
        acc.addcmul_(d, d)
    return acc


def clip_factors(sq_norms: Tensor, clip_norm: float) -> Tensor:
    """Per-example clipping factors min(1, C/‖g_i‖); 1 for a zero gradient."""
    return (clip_norm / sq_norms.sqrt()).clamp(max=1.0)


class Reduction(enum.Enum):
    """How one :class:`GradStats` field combines across chunks, micro-batches and ranks.

    With parts k = 1…K of sizes n_k (n = Σ_k n_k):

    - ``SUM``: n = Σ_k n_k.
    - ``WEIGHTED_MEAN``: μ = Σ_k (n_k/n) μ_k (``mean``, ``clipped_mean``).
    - ``CHAN_M2``: M2 = Σ_k [M2_k + n_k (μ_k − μ)²], per element (Chan, Golub &
      LeVeque); for two parts, M2_a + M2_b + δ²·n_a·n_b/n with δ = μ_b − μ_a.
    - ``CONCAT``: per-example vectors of length n_k, concatenated in order.
    - ``SHARED``: a value every part must hold equally (compared by value, see
      :func:`same_value`); when the parts disagree it is dropped, and so is
      every field that ``requires`` it.
    - ``PARTS``: one entry per part, concatenated; set by
      :func:`persample.distributed.all_reduce_stats` (one entry per rank) and
      kept by ``merge`` only when both records have it.
    - ``SHARD``: the :class:`Shard` layout of a sharded record (FSDP2). ``merge`` needs both
      records sharded alike, merges ``mean`` and ``m2`` row by row (exact: Chan's update is per
      element) and drops the global sums, which a merge cannot know without the other ranks
      (:func:`persample.distributed.refresh_shard_sums` recomputes them, a collective).
    """

    SUM = "sum"
    WEIGHTED_MEAN = "weighted_mean"
    CHAN_M2 = "chan_m2"
    CONCAT = "concat"
    SHARED = "shared"
    PARTS = "parts"
    SHARD = "shard"


@dataclass(frozen=True)
class FieldReduction:
    """A field's declared reduction, and the SHARED field it is only valid with (if any)."""

    reduction: Reduction
    requires: str | None = None


def _declare(reduction: Reduction, requires: str | None = None, **kwargs) -> Any:
    return field(metadata={"reduction": FieldReduction(reduction, requires)}, **kwargs)


def field_reductions() -> dict[str, FieldReduction]:
    """``{field name: FieldReduction}`` for every field of :class:`GradStats`, in declaration order."""
    return {f.name: f.metadata["reduction"] for f in fields(GradStats)}


def same_value(a: Any, b: Any) -> bool:
    """Whether two SHARED values are equal by value: the same object, equal numbers, or
    dicts of tensors with the same keys, shapes, dtypes and elements (NaN ≠ NaN)."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if a.keys() != b.keys():
            return False
        return all(_same_tensor(a[k], b[k]) for k in a)
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return _same_tensor(a, b)
    return a == b


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a, b.to(a.device)))


#: The global per-parameter sums a sharded record carries (float64, all-reduced over the shards):
#: ``mean_sq`` = Σ_j ḡ_j², ``m2`` = Σ_j M2_j, ``gsnr`` = Σ_{j: Var_j>0} ḡ_j²/Var_j and ``gsnr_count``
#: its number of terms, ``ref_dot`` = Σ_j ḡ_j r_j and ``ref_diff_sq`` = Σ_j (r_j − ḡ_j)² (r: the
#: record's reference; 0 without one, and the m2/gsnr columns 0 without M2).
SHARD_SUMS = ("mean_sq", "m2", "gsnr", "gsnr_count", "ref_dot", "ref_diff_sq")


def shard_rows(shape: tuple[int, ...], rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of dim 0 that rank ``rank`` of ``world`` holds of a parameter of ``shape``
    under FSDP2's ``Shard(0)``: chunks of ⌈d₀/W⌉ rows (``torch.chunk``), the last ranks' shorter or
    empty — the rows of ``p.to_local()`` without FSDP2's padding.

    >>> shard_rows((5, 3), 3, 4), shard_rows((5, 3), 2, 4)
    ((5, 5), (4, 5))
    """
    if not shape:
        raise ValueError("shard_rows: a 0-d parameter has no dim 0 to shard")
    d0 = shape[0]
    chunk = -(-d0 // world)
    start = min(rank * chunk, d0)
    return start, min(start + chunk, d0)


@dataclass(frozen=True)
class Shard:
    """Where a sharded :class:`GradStats`' ``mean`` and ``m2`` sit (FSDP2, Shard(0)).

    ``mean[name]`` and ``m2[name]`` hold rows ``rows[name]`` = [start, stop) of dim 0 of the
    parameter of full shape ``shapes[name]`` (:func:`shard_rows`: this rank's rows of FSDP2's
    ``p.grad.to_local()``, without padding). ``sums[name]`` holds the global float64 sums of
    :data:`SHARD_SUMS` over all shards, from which every scalar (‖ḡ‖², tr Σ, noise scales, GSNR) is
    computed without any further communication; None after a :meth:`GradStats.merge` (stale).
    """

    rank: int
    world: int
    rows: Mapping[str, tuple[int, int]]
    shapes: Mapping[str, tuple[int, ...]]
    sums: Mapping[str, tuple[float, ...]] | None = None

    def same_layout(self, other: "Shard") -> bool:
        return (self.rank, self.world, dict(self.rows), dict(self.shapes)) == (
            other.rank,
            other.world,
            dict(other.rows),
            dict(other.shapes),
        )

    def total(self, column: str, names) -> float:
        """Σ over ``names`` of the global sum ``column`` (one of :data:`SHARD_SUMS`)."""
        if self.sums is None:
            raise ValueError(
                "GradStats: these sharded statistics were merged, and their global sums are stale; "
                "persample.distributed.refresh_shard_sums(stats) recomputes them (a collective: every rank)"
            )
        i = SHARD_SUMS.index(column)
        return math.fsum(self.sums[k][i] for k in names)

    def reference_rows(self, name: str, reference: Tensor) -> Tensor:
        """This rank's rows of a full-size tensor (a reference direction) of parameter ``name``."""
        start, stop = self.rows[name]
        return reference[start:stop]


@dataclass(frozen=True, eq=False, repr=False)
class GradStats:
    """Sufficient statistics of one batch of per-example gradients.

    Per-example gradients are unscaled (g_i is the gradient of example i's own
    loss). Variance is unbiased: ``var = m2 / (n - 1)``; with ``n == 1`` it is
    NaN by definition. Norms are L2, and ``sq_norms`` is the sum over
    parameters of ``param_sq_norms``.

    Build one with :func:`persample.grad_stats` (or :meth:`from_per_example`),
    combine several with :meth:`merge`, and combine the records of all ranks
    of a process group with :meth:`all_reduce`.

    ``part_sizes`` and ``part_mean_sq_norms`` are set by :meth:`all_reduce`:
    the batch size n_r and ‖ḡ_r‖² of each rank's own record, what the
    rank-level noise estimator (:func:`persample.noise.rank_noise_scale`)
    needs. Records that were not all-reduced have None there.
    """

    n: int = _declare(Reduction.SUM)
    mean: dict[str, Tensor] = _declare(Reduction.WEIGHTED_MEAN)
    m2: dict[str, Tensor] | None = _declare(Reduction.CHAN_M2)
    param_sq_norms: dict[str, Tensor] = _declare(Reduction.CONCAT)
    losses: Tensor = _declare(Reduction.CONCAT)
    inner_products: Tensor | None = _declare(Reduction.CONCAT, requires="reference", default=None)
    reference: Mapping[str, Tensor] | None = _declare(Reduction.SHARED, default=None)
    clip_norm: float | None = _declare(Reduction.SHARED, default=None)
    clipped_mean: dict[str, Tensor] | None = _declare(Reduction.WEIGHTED_MEAN, requires="clip_norm", default=None)
    part_sizes: tuple[int, ...] | None = _declare(Reduction.PARTS, default=None)
    part_mean_sq_norms: tuple[float, ...] | None = _declare(Reduction.PARTS, default=None)
    shard: Shard | None = _declare(Reduction.SHARD, default=None)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"GradStats needs at least one example, got n={self.n}")
        if self.m2 is not None and self.m2.keys() != self.mean.keys():
            raise ValueError("GradStats: 'm2' and 'mean' must have the same parameter names")
        if self.param_sq_norms.keys() != self.mean.keys():
            raise ValueError("GradStats: 'param_sq_norms' and 'mean' must have the same parameter names")
        for name, sq in self.param_sq_norms.items():
            if sq.shape != (self.n,):
                raise ValueError(
                    f"GradStats: param_sq_norms[{name!r}] has shape {tuple(sq.shape)}, expected ({self.n},)"
                )
        if self.losses.shape != (self.n,):
            raise ValueError(f"GradStats: losses has shape {tuple(self.losses.shape)}, expected ({self.n},)")
        if self.inner_products is not None and self.inner_products.shape != (self.n,):
            raise ValueError("GradStats: inner_products must have shape (n,)")
        if (self.clip_norm is None) != (self.clipped_mean is None):
            raise ValueError("GradStats: clip_norm and clipped_mean go together")
        if (self.part_sizes is None) != (self.part_mean_sq_norms is None):
            raise ValueError("GradStats: part_sizes and part_mean_sq_norms go together")
        if self.part_sizes is not None and (
            sum(self.part_sizes) != self.n or len(self.part_sizes) != len(self.part_mean_sq_norms)  # type: ignore[arg-type]  # both set (checked above)
        ):
            raise ValueError(
                f"GradStats: part_sizes {self.part_sizes} must add up to n={self.n}, one "
                "per entry of part_mean_sq_norms"
            )
        if self.shard is not None:
            for name, mean in self.mean.items():
                start, stop = self.shard.rows[name]
                expected = (stop - start, *self.shard.shapes[name][1:])
                for what, t in (("mean", mean), ("m2", None if self.m2 is None else self.m2[name])):
                    if t is not None and tuple(t.shape) != expected:
                        raise ValueError(
                            f"GradStats: sharded {what}[{name!r}] has shape {tuple(t.shape)}, expected rows "
                            f"[{start}, {stop}) of {self.shard.shapes[name]}"
                        )
        _refuse_dtensors(self)

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
        """‖ḡ‖², the squared norm of the mean gradient (a 0-d float64 tensor, summed in float64); of the
        whole mean also when this record holds a shard of it (from ``shard.sums``)."""
        if self.shard is not None:
            device = next(iter(self.mean.values())).device
            return torch.tensor(self.shard.total("mean_sq", self.names), dtype=torch.float64, device=device)
        return cast(Tensor, sum(float64_square_sum(m) for m in self.mean.values()))  # mean is never empty

    def param_mean_sq(self, names=None) -> float:
        """Σ over ``names`` (default: all) of ‖ḡ[name]‖², in float64; global for a sharded record."""
        names = self.names if names is None else list(names)
        if self.shard is not None:
            return self.shard.total("mean_sq", names)
        return float(sum(self.mean[k].detach().double().pow(2).sum() for k in names))

    def param_m2_sum(self, names=None) -> float:
        """Σ over ``names`` (default: all) of Σ_j M2_j, in float64; global for a sharded record."""
        if self.m2 is None:
            raise ValueError("GradStats: no M2 (statistics computed with var=False)")
        names = self.names if names is None else list(names)
        if self.shard is not None:
            return self.shard.total("m2", names)
        return math.fsum(float(self.m2[k].detach().double().sum()) for k in names)

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
        m2: dict[str, Tensor] | None
        mean, m2, sq = {}, {} if var else None, {}
        grads = {
            name: g.float() if g.is_floating_point() and g.element_size() < 4 else g  # float32 or better:
            for name, g in grads.items()
        }  # half-precision squares overflow (‖g_i‖² > 65504 in float16)
        for name, g in grads.items():
            if g.shape[0] != n:
                raise ValueError(f"grads[{name!r}] has {g.shape[0]} rows but there are {n} losses")
            mean[name] = g.mean(0)
            if m2 is not None:
                m2[name] = sum_of_squares(g, mean[name])
            sq[name] = torch.linalg.vector_norm(g.reshape(n, -1), dim=1).square()
        inner = None
        if reference is not None:
            inner = cast(Tensor, sum(_inner(grads[k].reshape(n, -1), reference[k].reshape(-1)) for k in grads))
        clipped = None
        if clip_norm is not None:
            factors = clip_factors(torch.stack(list(sq.values())).sum(0), clip_norm)
            clipped = {k: torch.tensordot(factors, g, dims=1) / n for k, g in grads.items()}
        return cls(
            n=n,
            mean=mean,
            m2=m2,
            param_sq_norms=sq,
            losses=losses,
            inner_products=inner,
            reference=reference,
            clip_norm=clip_norm,
            clipped_mean=clipped,
        )

    # ---------------------------------------------------------------- merging
    def merge(self, other: "GradStats") -> "GradStats":
        """Exact statistics of the concatenation (``self``'s examples first).

        >>> import torch, persample
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> loss = torch.nn.functional.mse_loss
        >>> whole = persample.grad_stats(model, loss, x, y)
        >>> first = persample.grad_stats(model, loss, x[:3], y[:3])
        >>> parts = first.merge(persample.grad_stats(model, loss, x[3:], y[3:]))
        >>> torch.allclose(parts.var["weight"], whole.var["weight"])
        True

        Each field follows its declared :class:`Reduction`. With counts n_a,
        n_b, means μ_a, μ_b and δ = μ_b − μ_a: μ = μ_a + δ·n_b/n and
        M2 = M2_a + M2_b + δ²·n_a·n_b/n. Per-example vectors are concatenated.

        SHARED fields are compared **by value** (:func:`same_value`): inner
        products survive when both records' references are equal tensors (two
        clones of one reference will do), and clipped means when both used the
        same ``clip_norm``; otherwise the merged record has none. ``m2`` and the
        ``part_*`` fields are kept only when both records have them.
        """
        if not isinstance(other, GradStats):
            raise TypeError(f"can only merge GradStats with GradStats, not {type(other).__name__}")
        if self.mean.keys() != other.mean.keys():
            missing = sorted(set(self.mean) ^ set(other.mean))
            raise ValueError(f"cannot merge GradStats over different parameters: {missing}")
        a_shard, b_shard = self.shard, other.shard
        if (a_shard is None) != (b_shard is None) or (
            a_shard is not None and b_shard is not None and not a_shard.same_layout(b_shard)
        ):
            raise ValueError("cannot merge GradStats sharded differently (or sharded with unsharded)")
        declared = field_reductions()
        shared = {
            name: getattr(self, name) if same_value(getattr(self, name), getattr(other, name)) else None
            for name, fr in declared.items()
            if fr.reduction is Reduction.SHARED
        }
        na, nb = self.n, other.n
        n = na + nb
        values: dict[str, Any] = dict(shared)
        for name, fr in declared.items():
            if fr.reduction is Reduction.SHARED:
                continue
            a, b = getattr(self, name), getattr(other, name)
            if fr.reduction is Reduction.SUM:
                values[name] = a + b
            elif fr.reduction is not Reduction.SHARD and (
                a is None or b is None or (fr.requires is not None and shared[fr.requires] is None)
            ):
                values[name] = None
            elif fr.reduction is Reduction.WEIGHTED_MEAN:
                values[name] = _map_pair(a, b, lambda x, y: x + (y - x) * (nb / n))
            elif fr.reduction is Reduction.CHAN_M2:
                values[name] = {k: a[k] + b[k] + (other.mean[k] - self.mean[k]).pow(2) * (na * nb / n) for k in a}
            elif fr.reduction in (Reduction.CONCAT, Reduction.PARTS):
                values[name] = _map_pair(a, b, _concat)
            elif fr.reduction is Reduction.SHARD:  # the same layout (checked above); the sums are stale
                values[name] = None if a is None else dataclasses.replace(a, sums=None)
            else:  # pragma: no cover - a new Reduction without a merge rule
                raise NotImplementedError(f"GradStats.merge has no rule for {fr.reduction}")
        return GradStats(**values)

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
        """A copy with every tensor field (and tensor of a dict field) moved to ``device`` / cast to
        ``dtype``; scalar and tuple fields are kept as they are."""

        def move(value):
            return _map_one(value, lambda t: t.to(device=device, dtype=dtype))

        return GradStats(**{name: move(getattr(self, name)) for name in field_reductions()})

    def is_finite(self) -> bool:
        """Whether the mean and every per-example squared norm are finite (no inf/NaN from a diverged step);
        for a sharded record, the whole mean's (its global ‖ḡ‖², the same on every rank)."""
        if self.shard is not None and self.shard.sums is not None:
            return math.isfinite(self.shard.total("mean_sq", self.names)) and all(
                bool(torch.isfinite(t).all()) for t in self.param_sq_norms.values()
            )
        flag = self.finite_flag()
        return True if flag is None else bool(flag)  # one host read (a device sync) for all of them

    def finite_flag(self) -> Tensor | None:
        """:meth:`is_finite` of an unsharded record as a 0-d bool tensor on the device, unread (None where
        there is nothing to check, or for a sharded record, whose check needs its global sums)."""
        if self.shard is not None and self.shard.sums is not None:
            return None
        tensors = [*self.mean.values(), *self.param_sq_norms.values()]
        if not tensors:
            return None
        device = tensors[0].device
        # A floating tensor is finite iff its min and max are (aminmax propagates NaN and keeps ±inf at its
        # ends): one read per tensor instead of isfinite's bool copy and its all (10x less on CPU). The ends
        # are stacked per dtype (never cast, which could overflow) and checked once per dtype.
        ends: dict[tuple, list[Tensor]] = {}
        flags = []
        for t in tensors:
            if t.is_floating_point() and t.numel():
                ends.setdefault((t.dtype, t.device), []).extend(torch.aminmax(t))
            elif t.numel():
                flags.append(torch.isfinite(t).all().to(device))
        flags += [torch.isfinite(torch.stack(found)).all().to(device) for found in ends.values()]
        return flags[0] if len(flags) == 1 else torch.stack(flags).all()

    def __repr__(self) -> str:
        numel = sum(v.numel() for v in self.mean.values())
        norms = self.norms
        return (
            f"GradStats(n={self.n}, params={len(self.mean)} ({numel} elements), "
            f"var={'yes' if self.m2 is not None else 'no'}, "
            f"mean_loss={self.losses.mean().item():.4g}, "
            f"median_norm={norms.median().item():.4g}, |mean|={self.mean_sq_norm.sqrt().item():.4g})"
        )


def _inner(rows: Tensor, ref: Tensor) -> Tensor:
    """``rows @ ref`` in the wider of the two dtypes (at least float32), on ``rows``' device."""
    dtype = torch.promote_types(torch.promote_types(rows.dtype, ref.dtype), torch.float32)
    return rows.to(dtype) @ ref.to(device=rows.device, dtype=dtype)


def _map_one(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` on a tensor or on every tensor of a dict; anything else is returned as it is."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: fn(v) for k, v in value.items()}
    return value


def _map_pair(a: Any, b: Any, fn: Callable[[Any, Any], Any]) -> Any:
    """``fn(a, b)``, or ``{k: fn(a[k], b[k])}`` for dicts."""
    if isinstance(a, Mapping):
        return {k: fn(a[k], b[k]) for k in a}
    return fn(a, b)


def _concat(a: Any, b: Any) -> Any:
    return a + b if isinstance(a, tuple) else torch.cat([a, b])


def _refuse_dtensors(stats: GradStats) -> None:
    """DTensors (FSDP2 shards) would run collectives when printed or reduced: never keep one."""
    from ._sharding import dtensor_class

    dtensor = dtensor_class()
    if dtensor is None:
        return
    for name in ("mean", "m2", "param_sq_norms", "clipped_mean", "reference"):
        value = getattr(stats, name)
        if value is not None and any(isinstance(t, dtensor) for t in value.values()):
            raise TypeError(
                f"GradStats.{name} holds DTensors (FSDP2 shards); GradStats keeps plain local "
                "tensors only: convert with DTensor.to_local() (or full_tensor()) first"
            )
