"""Statistics and gradients across the ranks of a ``torch.distributed`` process group.

Rank r holds the statistics of its own n_r examples (a :class:`GradStats` from
:func:`persample.grad_stats`, a Tracker step or ``Tracker.observe``).
:func:`all_reduce_stats` turns them, on every rank, into the statistics of the
concatenated batch of N = Σ_r n_r examples, exactly (up to float rounding): the
result equals :func:`persample.grad_stats` on one process over the
concatenation of the ranks' batches, in rank order. Each field follows its
declared :class:`~persample.stats.Reduction`:

- n = Σ_r n_r (from a small all-gather of per-rank headers);
- mean and clipped mean: ḡ = Σ_r (n_r/N) ḡ_r, one all-reduce of P-sized sums;
- M2 = Σ_r [M2_r + n_r (ḡ_r − ḡ)²] (Chan et al.'s update for W parts), a
  second all-reduce of P-sized sums after ḡ is known. Never an all-gather of
  P-sized tensors (that would be W × P memory);
- per-example vectors (losses, whole-model and per-parameter squared norms):
  all-gathered as B-sized vectors, padded to the largest rank's batch;
- inner products p_i = ⟨g_i, ḡ⟩ relative to the GLOBAL mean: they cannot be
  derived from ⟨g_i, ḡ_r⟩, so they take a second B-sized pass. Pass
  ``inner_products=`` a function that returns this rank's ⟨g_i, v⟩ for a
  direction v (:func:`inner_products_with` makes one from a model and a batch:
  one forward-mode pass, no per-example gradients). Without it, inner products
  survive only when every rank's are relative to the same reference (compared
  by value); otherwise the result has none.
- ``part_sizes`` / ``part_mean_sq_norms``: n_r and ‖ḡ_r‖² of every rank, what
  the rank-level noise estimator needs (:func:`persample.noise.rank_noise_scale`).

Scaling conventions are those of the library: per-example gradients are
unscaled (g_i is the gradient of example i's own loss), variance is unbiased
(M2 / (N − 1)).

:func:`all_reduce_gradients` is the other half of data parallelism: it leaves
``p.grad`` = (1/W) Σ_r p.grad_r on every rank, as DDP's backward does.

Every function here is a collective: every rank of the group must call it, in
the same order, with statistics over the same parameters.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Callable, Iterable, Mapping, Sequence, cast

import torch
from torch import Tensor, nn

from .errors import OtherRankFailed
from .stats import SHARD_SUMS, GradStats, Reduction, Shard, field_reductions, shard_rows

__all__ = [
    "all_reduce_stats",
    "reduce_scatter_stats",
    "refresh_shard_sums",
    "all_reduce_gradients",
    "inner_products_with",
    "is_distributed",
    "agree",
    "OtherRankFailed",
    "DEFAULT_BUCKET_BYTES",
    "sums_by_all_reduce",
]

#: Gradient buckets of :func:`all_reduce_gradients`: DDP's default ``bucket_cap_mb=25``.
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024

InnerProducts = Callable[[Mapping[str, Tensor]], Tensor]


def is_distributed(group=None) -> bool:
    """Whether ``torch.distributed`` is available and its default process group is initialized."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _require_group(fn: str) -> None:
    if not is_distributed():
        raise RuntimeError(
            f"{fn} needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment)"
        )


def _comm_device(group, like: torch.device) -> torch.device:
    """Where collectives of ``group`` take their tensors: CUDA for NCCL, CPU for gloo."""
    backend = str(torch.distributed.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if like.type == "cuda" and "gloo" not in backend:
        return like
    return torch.device("cpu")


# ------------------------------------------------------------------ one outcome


def agree(
    failure: BaseException | None, group=None, *, where: str = "persample", flags: Sequence[bool] = ()
) -> list[bool]:
    """One outcome on every rank: raise everywhere if any rank failed, else return the ranks' flags.

    A collective (one all-reduce of W + len(flags) integers): every rank of ``group`` must call it
    at the same point, with its own ``failure`` (the exception it caught there, or None) — also
    the ranks that failed, which is what keeps the others from waiting in a later collective.

    If some rank failed, every rank raises: a failed rank re-raises its own ``failure``, every
    other rank raises :class:`OtherRankFailed` naming the failed ranks and the refusal code each
    raised, if it had one (the vote carries it, no extra traffic). Otherwise returns, for
    each of ``flags``, whether it is True on every rank (so that a choice such as "this step has
    statistics" is the same everywhere).
    """
    dist = torch.distributed
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    codes = _vote_codes()
    votes = torch.zeros(world + len(flags), dtype=torch.int64, device=_comm_device(group, torch.device("cpu")))
    if failure is not None:  # 1: no known code; 2 + k: the k-th code of the registry
        code = getattr(failure, "code", None)
        votes[rank] = 2 + codes.index(code) if code in codes else 1
    for k, flag in enumerate(flags):
        votes[world + k] = int(not flag)
    dist.all_reduce(votes, group=group)
    counts: list[int] = votes.tolist()
    failed = [r for r in range(world) if counts[r]]
    if failed:
        if failure is not None:
            raise failure
        named = [f"rank {r}: {codes[counts[r] - 2]}" for r in failed if counts[r] >= 2]
        raise OtherRankFailed(
            f"{where}: rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of "
            f"{world} raised{' (' + '; '.join(named) + ')' if named else ''} (see that rank's error); this rank "
            "raises too and undoes the same work, so that every rank has the same outcome",
            failed,
        )
    return [counts[world + k] == 0 for k in range(len(flags))]


def _vote_codes() -> list[str]:
    """The refusal codes in a fixed order (the same on every rank), for :func:`agree`'s votes."""
    from .contract import PRECONDITIONS

    return sorted(PRECONDITIONS)


# ------------------------------------------------------------------ small collectives


def _all_gather_rows(tensor: Tensor, group, world: int) -> list[Tensor]:
    out = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(out, tensor, group=group)
    return out


def _all_reduce_sums(
    tensors: Sequence[Tensor],
    group,
    device: torch.device,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    prepare: Callable[[Tensor, list[int]], object] | None = None,
) -> list[Tensor]:
    """Σ over ranks of each tensor (same shapes and dtypes on every rank), through flat buckets
    of at most ``bucket_bytes`` per dtype, all launched before any is waited for.
    ``prepare(flat, indices)`` may transform a bucket in place before it is sent."""
    results: list[Tensor | None] = [None] * len(tensors)
    pending = []
    for indices in _buckets(tensors, bucket_bytes):
        flat = torch.cat([tensors[i].detach().reshape(-1).to(device) for i in indices])
        if prepare is not None:
            prepare(flat, indices)
        pending.append((indices, flat, torch.distributed.all_reduce(flat, group=group, async_op=True)))
    for indices, flat, work in pending:
        work.wait()
        offset = 0
        for i in indices:
            t = tensors[i]
            results[i] = flat[offset : offset + t.numel()].view(t.shape).to(t.device)
            offset += t.numel()
    return cast("list[Tensor]", results)  # every slot is filled above


def _buckets(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices grouped by dtype, in order, each group cut at ``bucket_bytes``."""
    by_dtype: dict[torch.dtype, list[list[int]]] = {}
    sizes: dict[torch.dtype, int] = {}
    for i, t in enumerate(tensors):
        groups = by_dtype.setdefault(t.dtype, [[]])
        nbytes = t.numel() * t.element_size()
        if groups[-1] and sizes[t.dtype] + nbytes > bucket_bytes:
            groups.append([])
            sizes[t.dtype] = 0
        groups[-1].append(i)
        sizes[t.dtype] = sizes.get(t.dtype, 0) + nbytes
    return [g for groups in by_dtype.values() for g in groups if g]


def _gather_vectors(rows: Sequence[Tensor], sizes: list[int], group, device: torch.device) -> list[Tensor]:
    """Per-example vectors of every rank, concatenated in rank order: one all-gather of a
    [len(rows), max n_r] float64 matrix (zero-padded), cast back to each row's dtype."""
    if not rows:
        return []
    width = max(sizes)
    mine = torch.zeros(len(rows), width, dtype=torch.float64, device=device)
    for k, row in enumerate(rows):
        mine[k, : row.shape[0]] = row.detach().to(device=device, dtype=torch.float64)
    gathered = _all_gather_rows(mine, group, len(sizes))
    whole = torch.cat([part[:, :n] for part, n in zip(gathered, sizes)], dim=1)
    return [whole[k].to(device=row.device, dtype=row.dtype) for k, row in enumerate(rows)]


# ------------------------------------------------------------------------ the header

_HEADER = (
    "n",
    "mean_sq_norm",
    "has_m2",
    "clip_norm",
    "has_inner",
    "has_reference",
    "reference_sum",
    "reference_sq_sum",
    "layout",
    "num_params",
    "narrow",
    "sums_factor",  # reduce_scatter_stats(reduced=(f, R)): f, where S1 = f·R is known already (else NaN)
)

#: Dtypes whose every value a float32 holds exactly (the statistics' sums may then travel in float32).
_NARROW = (torch.float32, torch.bfloat16, torch.float16)


def _layout_fingerprint(stats: GradStats) -> float:
    """A CRC of the parameter names, shapes and dtypes: ranks must agree on it before P-sized collectives."""
    text = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in stats.mean.items())
    return float(zlib.crc32(text.encode()))


def _header(stats: GradStats, device: torch.device, sums_factor: float = float("nan")) -> Tensor:
    ref = stats.reference
    ref_sum = ref_sq = 0.0
    if ref is not None:
        ref_sum = float(sum(v.detach().double().sum() for v in ref.values()))
        ref_sq = float(sum(v.detach().double().pow(2).sum() for v in ref.values()))
    values = dict(
        n=stats.n,
        mean_sq_norm=float(stats.mean_sq_norm),
        has_m2=stats.m2 is not None,
        clip_norm=float("nan") if stats.clip_norm is None else float(stats.clip_norm),
        has_inner=stats.inner_products is not None,
        has_reference=ref is not None,
        reference_sum=ref_sum,
        reference_sq_sum=ref_sq,
        layout=_layout_fingerprint(stats),
        num_params=len(stats.mean),
        narrow=all(t.dtype in _NARROW for t in _sent_tensors(stats)),
        sums_factor=sums_factor,
    )
    return torch.tensor([float(values[k]) for k in _HEADER], dtype=torch.float64, device=device)


def _sent_tensors(stats: GradStats) -> list[Tensor]:
    """The tensors of ``stats`` that :func:`reduce_scatter_stats` sends."""
    out = list(stats.mean.values()) + list(stats.param_sq_norms.values()) + [stats.losses]
    if stats.m2 is not None:
        out += list(stats.m2.values())
    if stats.inner_products is not None:
        out.append(stats.inner_products)
    return out


def _agreed_headers(
    stats: GradStats, group, world: int, device: torch.device, where: str, sums_factor: float = float("nan")
) -> Tensor:
    """Every rank's :func:`_header` row (gathered, on the CPU); raises ``ValueError`` on every rank alike
    where the ranks' statistics cover different parameters."""
    headers = torch.stack(_all_gather_rows(_header(stats, device, sums_factor), group, world)).cpu()
    if not (_all_equal(_column(headers, "layout")) and _all_equal(_column(headers, "num_params"))):
        raise ValueError(
            f"{where}: the ranks' statistics cover different parameters (names, shapes "
            "or dtypes differ); every rank must compute statistics of the same model"
        )
    return headers


def _column(headers: Tensor, name: str) -> list[float]:
    return headers[:, _HEADER.index(name)].tolist()


def _all_equal(values: Iterable[float]) -> bool:
    values = list(values)
    return all(v == values[0] for v in values)  # NaN ≠ NaN: a None clip_norm never agrees


# ------------------------------------------------------------------------ all-reduce


def all_reduce_stats(stats: GradStats, group=None, *, inner_products: InnerProducts | None = None) -> GradStats:
    """The statistics of the batch concatenated over all ranks of ``group``, on every rank.

    Args:
        stats: this rank's statistics (any batch size n_r ≥ 1; ranks may differ).
        group: the process group (default: the default group).
        inner_products: optional ``fn(v) -> Tensor[n_r]`` returning this rank's
            per-example inner products ⟨g_i, v⟩ with a direction
            ``v = {name: Tensor}``. It is called with the global mean ḡ, and the
            result's ``inner_products`` are then ⟨g_i, ḡ⟩ over all N examples
            (what the inner-product and orthogonality tests need). See
            :func:`inner_products_with`.

    Returns:
        a :class:`GradStats` with n = N, the global mean, M2 and clipped mean,
        the per-example vectors of all ranks in rank order, and ``part_sizes`` /
        ``part_mean_sq_norms`` = (n_r), (‖ḡ_r‖²) per rank. Fields follow their
        declared reductions (see the module docstring); a field some rank lacks
        (``m2`` with ``var=False``, ``clipped_mean`` with another ``clip_norm``)
        is None, as in :meth:`GradStats.merge`.

    Raises:
        RuntimeError: no initialized process group.
        ValueError: the ranks' statistics cover different parameters (names,
            shapes or dtypes) — checked before any P-sized collective.
    """
    _require_group("all_reduce_stats")
    if not isinstance(stats, GradStats):
        raise TypeError(f"all_reduce_stats takes a GradStats, not {type(stats).__name__}")
    if stats.shard is not None:
        raise ValueError(
            "all_reduce_stats: these statistics are already those of the global batch, sharded across the "
            "ranks (stats.shard, from an FSDP2 Tracker or reduce_scatter_stats); use them as they are"
        )
    dist = torch.distributed
    world = dist.get_world_size(group)
    first = next(iter(stats.mean.values()))
    device = _comm_device(group, first.device)

    headers = _agreed_headers(stats, group, world, device, "all_reduce_stats")
    sizes = [int(n) for n in _column(headers, "n")]
    total = sum(sizes)
    declared = field_reductions()
    shared = {
        "clip_norm": stats.clip_norm if _all_equal(_column(headers, "clip_norm")) else None,
        "reference": _shared_reference(stats, headers, group, device),
    }
    assert set(shared) == {n for n, fr in declared.items() if fr.reduction is Reduction.SHARED}
    everywhere = {"m2": all(_column(headers, "has_m2")), "inner_products": all(_column(headers, "has_inner"))}

    def present(name: str) -> bool:
        fr = declared[name]
        if getattr(stats, name) is None or not everywhere.get(name, True):
            return False
        return fr.requires is None or shared[fr.requires] is not None

    names = stats.names
    # Round 1: weighted means (P-sized sums of n_r·μ_r) and per-example vectors (B-sized gathers).
    weighted = [f for f, fr in declared.items() if fr.reduction is Reduction.WEIGHTED_MEAN and present(f)]
    sums = _all_reduce_sums(
        [getattr(stats, f)[k] for f in weighted for k in names],
        group,
        device,
        prepare=lambda flat, _: flat.mul_(stats.n),
    )
    values: dict = dict(shared)
    for i, f in enumerate(weighted):
        values[f] = {k: s.div_(total) for k, s in zip(names, sums[i * len(names) : (i + 1) * len(names)])}
    concat = [
        f
        for f, fr in declared.items()
        if fr.reduction is Reduction.CONCAT and (inner_products is None or f != "inner_products") and present(f)
    ]
    rows = [r for f in concat for r in _as_rows(getattr(stats, f))]
    gathered = iter(_gather_vectors(rows, sizes, group, device))
    for f in concat:
        value = getattr(stats, f)
        values[f] = {k: next(gathered) for k in value} if isinstance(value, Mapping) else next(gathered)

    # Round 2: M2 = Σ_r [M2_r + n_r (μ_r − μ)²], once μ is known.
    chan = [f for f, fr in declared.items() if fr.reduction is Reduction.CHAN_M2 and present(f)]
    mean = values["mean"]
    local_means = [stats.mean[k] for _ in chan for k in names]
    global_means = [mean[k] for _ in chan for k in names]

    def add_spread(flat: Tensor, indices: list[int]) -> None:  # M2_r + n_r (μ_r − μ)², in place
        d = torch.cat([local_means[i].detach().reshape(-1).to(device) for i in indices])
        d.sub_(torch.cat([global_means[i].reshape(-1).to(device) for i in indices]))
        flat.addcmul_(d, d, value=stats.n)

    reduced = _all_reduce_sums([getattr(stats, f)[k] for f in chan for k in names], group, device, prepare=add_spread)
    for i, f in enumerate(chan):
        values[f] = dict(zip(names, reduced[i * len(names) : (i + 1) * len(names)]))

    # Inner products relative to the global mean: a second B-sized pass.
    if inner_products is not None:
        failure = None
        try:  # this rank's own code between collectives: if it raises here, every rank raises
            local = inner_products(mean)
            if not isinstance(local, Tensor) or local.shape != (stats.n,):
                raise ValueError(
                    f"all_reduce_stats: inner_products(direction) must return a tensor of shape "
                    f"({stats.n},), one value per local example; got "
                    f"{tuple(local.shape) if isinstance(local, Tensor) else type(local).__name__}"
                )
        except Exception as err:  # re-raised by agree, on every rank
            failure = err
        agree(failure, group, where="all_reduce_stats(inner_products=...)")
        values["inner_products"] = _gather_vectors([local], sizes, group, device)[0]
        values["reference"] = mean

    for f, fr in declared.items():
        if fr.reduction is Reduction.SUM:
            values[f] = total
        elif fr.reduction in (Reduction.PARTS, Reduction.SHARD):
            values[f] = None
        values.setdefault(f, None)
    values["part_sizes"] = tuple(sizes)
    values["part_mean_sq_norms"] = tuple(_column(headers, "mean_sq_norm"))
    return GradStats(**values)


# ------------------------------------------------------------------------ reduce-scatter


def reduce_scatter_stats(
    stats: GradStats, group=None, *, reduced: tuple[float, Mapping[str, Tensor]] | None = None
) -> GradStats:
    """The statistics of the batch concatenated over all ranks, with ``mean`` and ``m2`` SHARDED: rank r
    keeps only its rows of each parameter (FSDP2's ``Shard(0)`` layout, :func:`persample.stats.shard_rows`),
    and every scalar is exact for the whole model (:class:`persample.stats.Shard`).

    What it sends: ONE P-sized collective of a fused buffer holding, for every destination rank, the sums
    S1 and S2 below over that rank's rows (and, on gloo, the per-example rows too); then one all-reduce
    of 7 float64 sums per parameter tensor, and a small header all-gather before (which checks that the
    ranks' statistics cover the same parameters before anything P-sized is sent). Never a P-sized
    all-gather, and no second P-sized round: the mean and M2 travel together.

    **Which collective** (a fixed rule per backend, no timing at run time): on gloo, an all-reduce of
    the whole buffer, of which each rank keeps its slot, with the B-sized per-example rows folded in
    (each rank writes its own rows, zeros elsewhere: the sum is the gather, exactly); gloo's
    reduce-scatter costs more than its all-reduce of the same buffer (measured: 64 ms against 51 ms for
    55 MB, 2 ranks on a quiet CPU; 270 ms against 147 ms under load). On NCCL (and any other backend),
    a reduce-scatter, which sends half the bytes of a ring all-reduce, then an all-gather of the rows.

    **The numerical choice.** Chan's update for W parts is M2 = Σ_r [M2_r + n_r (μ_r − μ)²], which needs
    the global μ on every element before the reduction (a second P-sized round, or a P-sized all-gather
    of μ). Expanding the square, Σ_r n_r (μ_r − μ)² = Σ_r n_r μ_r² − N μ², so

        S1 = Σ_r n_r μ_r,   S2 = Σ_r (M2_r + n_r μ_r²),   μ = S1 / N,   M2 = S2 − S1·μ

    needs only the sums S1 and S2. The subtraction cancels: its rounding error is about ε·S2, i.e.
    ε·S2/M2 relative to M2. Each M2_r is this rank's own sum of squared deviations, so the cancellation
    is only between ranks. M2 is clamped at 0 (a negative value is rounding); μ is formed from S1 alone,
    so it has no cancellation. The sums travel in the statistics' own precision:

    - float64 statistics (or any rank's tensors not exactly float32-representable): float64, ε = 1.1e-16;
    - float32 statistics (what the single-process fast engine accumulates in for a float32 model, and
      what it returns): float32, with the single-process engine's own bound on a one-pass M2
      (``persample.engines.fast.pieces.cancellation_limit``: ε·S2/M2 ≤ 1e-4). Each rank counts its
      elements with S2 > limit · M2 (their count travels with the global sums, no extra round); where
      any rank has some, the S1 and S2 of just those elements are formed and summed again in float64
      (an all-gather of their positions and an all-reduce of 2 float64 numbers per element, whose
      result every rank holds, so that each adds those elements' share of the global sums itself),
      so that no element is less accurate than that bound;
    - ``var=False``: S1 alone (no cancellation), in the same precision.

    **S1 known already** (``reduced=(f, R)``): ``R[name]`` is this rank's rows (the layout above) of a
    tensor with S1 = f · R, already reduced over the ranks; under FSDP2, the sharded ``p.grad`` that a
    step's reduce-scatter left from nothing, when every rank backwarded c · Σ_{i∈r} g_i with the same c
    and FSDP2 divided the sum by D: f = D / c (:func:`persample._data_parallel.fsdp2_step`). Then S1
    does not travel: the buffer holds S2 alone (``var=False``: only the per-example rows), which saves
    P · s of the P-sized collective (half of it with the variance, all of it without). The factor
    travels in the header: where any rank passes none, or the ranks' factors differ, S1 travels as
    above on every rank. R must hold the sums to the statistics' own precision (FSDP2's product in the
    statistics' dtype, no casting ``MixedPrecisionPolicy``). With the variance, M2 = S2 − S1·μ cancels,
    and a float32 R carries a few ε more rounding than the buffer's S1 (a reduce-scatter, a division, a
    product): the float32 cancellation flags' limit is then divided by :data:`R_ROUNDING`, so that the
    elements that could exceed the same bound are summed again in float64 (more of them are flagged).

    A collective: every rank calls it, with statistics over the same parameters (names, shapes,
    dtypes), in the same order as its other collectives. ``clipped_mean`` is not supported (FSDP2
    refuses clipping); inner products (per-example rows) are gathered when every rank holds the same
    reference.
    """
    _require_group("reduce_scatter_stats")
    if not isinstance(stats, GradStats):
        raise TypeError(f"reduce_scatter_stats takes a GradStats, not {type(stats).__name__}")
    if stats.shard is not None:
        raise ValueError("reduce_scatter_stats: these statistics are already sharded (stats.shard)")
    if stats.clip_norm is not None:
        raise ValueError("reduce_scatter_stats: clipped means are not supported (FSDP2 refuses clip_norm)")
    return _reduce_scatter_stats(stats, group, float64=False, reduced=reduced)


#: How many times the rounding of the buffer's float32 sums S1 = f·R may carry, at most: FSDP2's
#: reduce-scatter of the ranks' c·n_r·μ_r (its sum and its division by D), the product by f, and μ_r's own
#: rounding from the gradient it was read from. M2 = S2 − S1²/N then errs by about 2·R_ROUNDING·ε·S2 at
#: most, against about 3ε·S2 from the buffer: the cancellation flags' limit is divided by this, so that
#: every element past the same bound is summed again in float64 (:func:`_float64_sums_at`).
R_ROUNDING = 4.0


def sums_by_all_reduce(group=None) -> bool:
    """The rule for :func:`reduce_scatter_stats`' one P-sized collective: True (an all-reduce of the
    fused buffer, each rank keeping its slot, the per-example rows folded in) on a gloo group, False
    (a reduce-scatter, then an all-gather of the rows) on NCCL and any other backend."""
    backend = str(torch.distributed.get_backend(group)).lower()
    return "gloo" in backend and "nccl" not in backend


def _reduce_scatter_stats(
    stats: GradStats, group, *, float64: bool, reduced: tuple[float, Mapping[str, Tensor]] | None = None
) -> GradStats:
    """:func:`reduce_scatter_stats`; ``float64``: the sums in float64 whatever the statistics' dtype."""
    dist = torch.distributed
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    first = next(iter(stats.mean.values()))
    device = _comm_device(group, first.device)

    # S1 = f·R where its rounding is bounded: without the variance (no subtraction), with R in float64, or
    # with R and the statistics in float32, where the cancellation flags below then bound R's rounding too
    factor = float("nan")
    if reduced is not None and not float64:
        dtypes = {reduced[1][k].dtype for k in stats.mean} | {v.dtype for v in stats.mean.values()}
        if (
            stats.m2 is None
            or {reduced[1][k].dtype for k in stats.mean} == {torch.float64}
            or dtypes == {torch.float32}
        ):
            factor = float(reduced[0])
    headers = _agreed_headers(stats, group, world, device, "reduce_scatter_stats", factor)
    factors = _column(headers, "sums_factor")
    known = not any(math.isnan(f) for f in factors) and _all_equal(factors)  # S1 = f·R on every rank
    sizes = [int(n) for n in _column(headers, "n")]
    total = sum(sizes)
    names = stats.names
    with_m2 = all(_column(headers, "has_m2"))
    reference = _shared_reference(stats, headers, group, device)
    shapes = {k: tuple(stats.mean[k].shape) for k in names}
    for k, shape in shapes.items():
        if not shape:
            raise ValueError(f"reduce_scatter_stats: parameter {k!r} is 0-d; FSDP2's Shard(0) needs dim 0")
    rows = {d: {k: shard_rows(shapes[k], d, world) for k in names} for d in range(world)}
    concat = ["param_sq_norms", "losses"]
    if stats.inner_products is not None and all(_column(headers, "has_inner")) and reference is not None:
        concat.append("inner_products")
    vectors = [r for f in concat for r in _as_rows(getattr(stats, f))]

    # The fused buffer: for each destination d a slot [S1 of every parameter | S2 of every parameter]
    # over d's rows (so that the received mean and M2 are each one contiguous block), then, when the
    # collective is an all-reduce, a [W, len(vectors), max n_r] block of per-example rows.
    wire = torch.float32 if not float64 and all(_column(headers, "narrow")) else torch.float64
    by_all_reduce = sums_by_all_reduce(group)
    if known and with_m2 and wire != torch.float32:  # no flags in float64: R must be float64 (as on every rank)
        assert reduced is not None  # (a factor in this rank's header)
        known = all(reduced[1][k].dtype == torch.float64 for k in names)
    n_r = float(stats.n)
    per_row = {k: math.prod(shapes[k][1:]) for k in names}  # elements per row of dim 0
    fields = (1 if with_m2 else 0) if known else (2 if with_m2 else 1)  # S1 and S2, or S2 alone
    sizes_of = [sum((rows[d][k][1] - rows[d][k][0]) * per_row[k] for k in names) for d in range(world)]
    slot, width = fields * max(sizes_of), max(sizes)
    folded = world * len(vectors) * width if by_all_reduce else 0
    send = torch.empty(world * slot + folded, dtype=wire, device=device)
    slots = send[: world * slot].view(world, slot)
    for d in range(world):  # only the padding needs zeros: every other element is written below
        slots[d, fields * sizes_of[d] :].zero_()
    offsets = [0] * world
    for k in names:  # written in place into each destination's slot: no temporaries of size P
        mu = stats.mean[k].detach().to(device).reshape(shapes[k][0], -1)
        m2_k = stats.m2[k].detach().to(device).reshape(shapes[k][0], -1) if with_m2 else None  # type: ignore[index]
        for d in range(world):
            start, stop = rows[d][k]
            count, o = (stop - start) * per_row[k], offsets[d]
            if known:  # S2 alone: M2_r + n_r μ_r², in the wire's dtype
                if m2_k is not None:
                    s2 = slots[d, o : o + count].view(stop - start, per_row[k])
                    if mu.dtype == wire and m2_k.dtype == wire:
                        torch.addcmul(m2_k[start:stop], mu[start:stop], mu[start:stop], value=n_r, out=s2)
                    else:
                        s2.copy_(m2_k[start:stop]).addcmul_(mu[start:stop].to(wire), mu[start:stop].to(wire), value=n_r)
                offsets[d] = o + count
                continue
            s1 = slots[d, o : o + count].view(stop - start, per_row[k])
            fused = mu.dtype == wire  # one pass each, computed in the wire's dtype (else: cast first)
            if fused:
                torch.mul(mu[start:stop], n_r, out=s1)
            else:
                s1.copy_(mu[start:stop]).mul_(n_r)
            if m2_k is not None:  # M2_r + n_r μ_r²: (n_r μ_r)·μ_r
                o2 = sizes_of[d] + o
                s2 = slots[d, o2 : o2 + count].view(stop - start, per_row[k])
                if fused and m2_k.dtype == wire:
                    torch.addcmul(m2_k[start:stop], s1, mu[start:stop], out=s2)
                else:
                    s2.copy_(m2_k[start:stop]).addcmul_(s1, mu[start:stop])
            offsets[d] = o + count
    if by_all_reduce:
        block = send[world * slot :].view(world, len(vectors), width)
        block.zero_()
        for j, row in enumerate(vectors):
            block[rank, j, : stats.n] = row.detach().to(device)
        dist.all_reduce(send, group=group)
        mine = slots[rank].clone()  # only this rank's slot outlives the buffer
        whole = [torch.cat([block[r, j, :n] for r, n in enumerate(sizes)]) for j in range(len(vectors))]
        del block
        gathered = iter([w.to(device=row.device, dtype=row.dtype) for w, row in zip(whole, vectors)])
    else:
        mine = torch.empty(slot, dtype=wire, device=device)
        if slot:  # (S1 known and no variance: nothing P-sized to send)
            dist.reduce_scatter(mine, list(slots.unbind(0)), group=group)
        gathered = iter(_gather_vectors(vectors, sizes, group, device))
    del send, slots

    length = sizes_of[rank]
    if known:  # S1 = f·R, this rank's rows of every parameter in the slot's order
        assert reduced is not None  # (a factor in this rank's header)
        flat_s1 = torch.empty(length, dtype=wire, device=device)
        o = 0
        for k in names:
            start, stop = rows[rank][k]
            count = (stop - start) * per_row[k]
            r_k = reduced[1][k].detach().to(device=device).reshape(-1)
            if r_k.numel() != count:
                raise ValueError(
                    f"reduce_scatter_stats: reduced[{k!r}] holds {r_k.numel()} elements, not this rank's "
                    f"{count} (rows {start}:{stop} of {shapes[k]})"
                )
            torch.mul(r_k.to(wire), factor, out=flat_s1[o : o + count])
            o += count
        mine = torch.cat([flat_s1, mine[:length]]) if with_m2 else flat_s1
    flat_s1 = mine[:length]
    flat_m2 = None
    risky = None  # positions in this rank's slot where float32 sums may have cancelled
    if with_m2:  # M2 = S2 − S1·μ = S2 − S1²/N, in place in the received buffer (before μ overwrites S1)
        flat_s2 = mine[length : 2 * length]
        if wire != torch.float64:  # S2 > limit·M2 ⟺ (limit/N)·S1² > (limit − 1)·S2, where S2 > 0
            from .engines.fast.pieces import cancellation_limit

            # S1 = f·R carries R's rounding besides the sums' (FSDP2's reduce-scatter, its division and the
            # product by f: a few ε against the buffer's one), so the bound is kept with a lower limit
            limit = cancellation_limit(wire) / (R_ROUNDING if known else 1.0)
            flags = flat_s1.square().mul_(limit / total).gt_(flat_s2 * (limit - 1.0)).logical_and_(flat_s2 > 0)
            risky = flags.nonzero().squeeze(1)
        flat_m2 = flat_s2.addcmul_(flat_s1, flat_s1, value=-1.0 / total).clamp_(min=0.0)
    flat_mean = flat_s1.div_(total)
    layout = Shard(rank=rank, world=world, rows=dict(rows[rank]), shapes=shapes)
    values: dict = {}
    for f in concat:
        value = getattr(stats, f)
        values[f] = {k: next(gathered) for k in value} if isinstance(value, Mapping) else next(gathered)
    if "inner_products" not in values:
        reference = None

    def shards() -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        mean: dict[str, Tensor] = {}
        m2: dict[str, Tensor] | None = {} if with_m2 else None
        offset = 0
        for k in names:
            start, stop = rows[rank][k]
            shape = (stop - start, *shapes[k][1:])
            count = (stop - start) * per_row[k]
            out_device, dtype = stats.mean[k].device, stats.mean[k].dtype
            mean[k] = flat_mean[offset : offset + count].view(shape).to(device=out_device, dtype=dtype)
            if m2 is not None and flat_m2 is not None:
                m2[k] = flat_m2[offset : offset + count].view(shape).to(device=out_device, dtype=dtype)
            offset += count
        return mean, m2

    # The global sums of every parameter's shard (SHARD_SUMS), and every rank's count of flagged elements,
    # in one all-reduce of a [max(K, W), 7] float64 matrix. Flagged elements are left out of the sums
    # here (zeros contribute nothing) and added below once they are exact.
    lengths = [(rows[rank][k][1] - rows[rank][k][0]) * per_row[k] for k in names]
    flagged = risky is not None and risky.numel() > 0
    mu64 = flat_mean.to(torch.float64, copy=flagged)  # copies where flagged elements are zeroed below
    m2_64 = flat_m2.to(torch.float64, copy=flagged) if flat_m2 is not None else None
    r64 = None
    if reference is not None:
        r64 = _flat64((layout.reference_rows(k, reference[k]) for k in names), device)
    if flagged:
        for column in (mu64, m2_64, r64):
            if column is not None:
                column[risky] = 0.0
    table = torch.zeros(max(len(names), world), len(SHARD_SUMS) + 1, dtype=torch.float64, device=device)
    table[: len(names), : len(SHARD_SUMS)] = _local_shard_sums(
        mu64, m2_64, r64, total, _segment_sums(lengths), len(names)
    )
    table[rank, len(SHARD_SUMS)] = 0 if risky is None else risky.numel()
    dist.all_reduce(table, group=group)
    counts = [int(c) for c in table[:world, len(SHARD_SUMS)].tolist()]
    global_sums = table[: len(names), : len(SHARD_SUMS)]
    if any(counts):  # the float32 sums may have cancelled beyond the engine's bound there: float64 for those
        assert flat_m2 is not None and risky is not None  # flags come only with float32 M2
        slot_params = []  # per destination: (name, first element of its rows, offset in the slot)
        for d in range(world):
            o, here = 0, []
            for k in names:
                start, stop = rows[d][k]
                here.append((k, start * per_row[k], o))
                o += (stop - start) * per_row[k]
            slot_params.append(here)
        exact = _float64_sums_at(stats, risky, counts, slot_params, total, group, device)
        # Every rank now holds μ and M2 of every rank's flagged elements: their share of the global sums
        # is added on every rank alike, with no further collective (as stored: rounded to the sums' dtype).
        for d, (which, elements, mu_d, m2_d) in enumerate(exact):
            mu_d, m2_d = mu_d.to(wire).double(), m2_d.to(wire).double()
            if d == rank:
                flat_mean[risky] = mu_d.to(wire)
                flat_m2[risky] = m2_d.to(wire)
            r_d = None
            if reference is not None:
                r_d = torch.empty_like(mu_d)
                for j in which.unique().tolist():
                    picked = which == j
                    name = slot_params[d][j][0]
                    r_d[picked] = (
                        reference[name]
                        .detach()
                        .reshape(-1)[elements[picked].to(reference[name].device)]
                        .to(device=device, dtype=torch.float64)
                    )

            def by_index(column: Tensor, which: Tensor = which) -> Tensor:
                return torch.zeros(len(names), dtype=torch.float64, device=device).index_add_(0, which, column)

            global_sums = global_sums + _local_shard_sums(mu_d, m2_d, r_d, total, by_index, len(names))
    mean, m2 = shards()
    sums = {k: tuple(row) for k, row in zip(names, global_sums.tolist())}
    layout = dataclasses.replace(layout, sums=sums)
    return GradStats(
        n=total,
        mean=mean,
        m2=m2,
        param_sq_norms=values["param_sq_norms"],
        losses=values["losses"],
        inner_products=values.get("inner_products"),
        reference=reference,
        part_sizes=tuple(sizes),
        part_mean_sq_norms=tuple(_column(headers, "mean_sq_norm")),
        shard=layout,
    )


def _local_shard_sums(
    mu: Tensor, m2: Tensor | None, r: Tensor | None, n: int, per_param: Callable[[Tensor], Tensor], k: int
) -> Tensor:
    """This rank's part of the [k, 6] float64 :data:`persample.stats.SHARD_SUMS` of k parameter tensors:
    ``per_param`` sums an element-wise column (float64, flat, of ``mu``'s length) per parameter. ``mu``,
    ``m2``, ``r``: the flat float64 mean, M2 and reference rows (None: that column stays 0)."""
    local = torch.zeros(k, len(SHARD_SUMS), dtype=torch.float64, device=mu.device)
    sq = mu.square()
    local[:, 0] = per_param(sq)
    if m2 is not None:
        local[:, 1] = per_param(m2)
        if n > 1:  # ḡ_j² / Var_j over the elements with Var_j > 0, and their count
            # in place in sq (the same numbers as torch.where(keep, ratio, 0), without two more P-sized
            # tensors: freshly allocated memory is paid in page faults on CPU), then the count in that buffer
            keep = m2 > 0  # (NaN: not kept)
            ratio = sq.mul_(n - 1).div_(m2).masked_fill_(keep.logical_not(), 0.0)
            local[:, 2] = per_param(ratio)
            local[:, 3] = per_param(ratio.copy_(keep))
    if r is not None:
        local[:, 4] = per_param(mu * r)
        local[:, 5] = per_param((r - mu).square_())
    return local


def _segment_sums(lengths: Sequence[int]) -> Callable[[Tensor], Tensor]:
    """Σ over consecutive segments of these lengths (one per parameter; empty ones give 0)."""
    return lambda column: torch.stack([part.sum() for part in column.split(list(lengths))])


def _flat64(tensors: Iterable[Tensor], device: torch.device) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])


def _all_reduce_shard_sums(
    mean: Mapping[str, Tensor],
    m2: Mapping[str, Tensor] | None,
    reference: Mapping[str, Tensor] | None,
    layout: Shard,
    n: int,
    group,
    device: torch.device,
) -> dict[str, tuple[float, ...]]:
    """The global :data:`persample.stats.SHARD_SUMS` of every parameter: this rank's sums over its
    rows, then one all-reduce of a [K, 6] float64 matrix (K parameter tensors)."""
    names = list(mean)
    where = next(iter(mean.values())).device  # the shards' own device (CUDA stays on CUDA)
    mu = _flat64((mean[k] for k in names), where)
    m2_flat = _flat64((m2[k] for k in names), where) if m2 is not None else None
    r = _flat64((layout.reference_rows(k, reference[k]) for k in names), where) if reference is not None else None
    local = _local_shard_sums(mu, m2_flat, r, n, _segment_sums([mean[k].numel() for k in names]), len(names))
    summed = local.to(device)
    torch.distributed.all_reduce(summed, group=group)
    return {k: tuple(row) for k, row in zip(names, summed.tolist())}


def _float64_sums_at(
    stats: GradStats,
    positions: Tensor,
    counts: list[int],
    slot_params: list[list[tuple[str, int, int]]],
    total: int,
    group,
    device: torch.device,
) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """For every rank d, (parameter index, element index in that parameter, μ, M2) of d's flagged
    ``positions`` (this rank's are ``positions``), μ and M2 from S1 and S2 formed and summed in float64:
    one all-gather of the positions (padded to the largest count) and one all-reduce of
    [Σ counts, 2] float64 sums, whose result every rank holds. ``slot_params[d]``: for each parameter,
    (name, its first element in d's rows, its offset in d's slot)."""
    world = len(counts)
    mine = torch.full((max(counts),), -1, dtype=torch.int64, device=device)
    mine[: positions.numel()] = positions.to(device)
    everyone = _all_gather_rows(mine, group, world)
    n_r = float(stats.n)
    send = torch.zeros(sum(counts), 2, dtype=torch.float64, device=device)
    located = []
    at = 0
    for d in range(world):
        pos = everyone[d][: counts[d]]
        starts = torch.tensor([o for _, _, o in slot_params[d]], dtype=torch.int64, device=device)
        which = torch.searchsorted(starts, pos, right=True).sub_(1)  # the parameter of each position
        elements = torch.empty_like(pos)
        for j in which.unique().tolist():
            name, first, offset = slot_params[d][j]
            picked = (which == j).nonzero().squeeze(1)
            elements[picked] = pos[picked] - offset + first
            where = elements[picked].to(stats.mean[name].device)
            mu = stats.mean[name].detach().reshape(-1)[where].to(device=device, dtype=torch.float64)
            m2 = stats.m2[name].detach().reshape(-1)[where].to(device=device, dtype=torch.float64)  # type: ignore[index]
            send[at + picked, 0] = n_r * mu
            send[at + picked, 1] = m2 + n_r * mu * mu
        located.append((which, elements))
        at += counts[d]
    torch.distributed.all_reduce(send, group=group)
    out, at = [], 0
    for d, (which, elements) in enumerate(located):
        s1, s2 = send[at : at + counts[d], 0], send[at : at + counts[d], 1]
        out.append((which, elements, s1 / total, (s2 - s1 * s1 / total).clamp_(min=0.0)))
        at += counts[d]
    return out


def refresh_shard_sums(stats: GradStats, group=None) -> GradStats:
    """``stats`` with its :class:`~persample.stats.Shard` sums recomputed from its shards (one small
    all-reduce: a collective, every rank). A merge of sharded records (``accumulate``) drops them."""
    if stats.shard is None or stats.shard.sums is not None:
        return stats
    first = next(iter(stats.mean.values()))
    sums = _all_reduce_shard_sums(
        stats.mean,
        stats.m2,
        stats.reference if stats.inner_products is not None else None,
        stats.shard,
        stats.n,
        group,
        _comm_device(group, first.device),
    )
    return dataclasses.replace(stats, shard=dataclasses.replace(stats.shard, sums=sums))


def _as_rows(value) -> list[Tensor]:
    return list(value.values()) if isinstance(value, Mapping) else [value]


def _shared_reference(stats: GradStats, headers: Tensor, group, device) -> Mapping[str, Tensor] | None:
    """``stats.reference`` when every rank holds the same one, by value; None otherwise.

    Cheap fingerprints (Σ r, Σ r²) rule out most differences without P-sized traffic; when they
    agree, an exact check compares the element-wise max and min over ranks.
    """
    if stats.reference is None or not all(_column(headers, "has_reference")):
        return None
    if not (_all_equal(_column(headers, "reference_sum")) and _all_equal(_column(headers, "reference_sq_sum"))):
        return None
    names = list(stats.reference)
    flat = torch.cat([stats.reference[k].detach().reshape(-1).double().to(device) for k in names])
    high, low = flat.clone(), flat.clone()
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=group)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
    return stats.reference if bool(torch.equal(high, low)) else None


# -------------------------------------------------------------------- inner products


def inner_products_with(model: nn.Module, loss_fn: Callable[..., Tensor], inputs, targets=None) -> InnerProducts:
    """``fn(v) -> Tensor[B]``: the batch's per-example inner products ⟨g_i, v⟩, for
    :func:`all_reduce_stats`'s ``inner_products=``.

    ⟨g_i, v⟩ is the directional derivative of L_i along v, so one forward-mode
    (``torch.func.jvp``) pass of the batch gives all of them, without any
    per-example gradient: see
    :func:`persample.engines.directional.per_example_directional_derivatives`.
    """
    from ._batch import as_batch
    from .engines.directional import per_example_directional_derivatives

    batch = as_batch(inputs, targets)
    return lambda direction: per_example_directional_derivatives(model, loss_fn, batch, direction)


# ------------------------------------------------------------------------- gradients


def all_reduce_gradients(
    params: Mapping[str, nn.Parameter] | Iterable[nn.Parameter], group=None, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> None:
    """``p.grad ← (1/W) Σ_r p.grad_r`` on every rank, as ``DistributedDataParallel``'s backward leaves it.

    Like DDP's reducer, each gradient is multiplied by 1/W and the products are
    summed over ranks, in flat buckets of at most ``bucket_bytes`` per dtype
    (all launched before the first is waited for). A gradient that is None on
    some ranks counts as zero there; it stays None only where it is None on
    every rank. New gradients are views into the buckets (written out of place,
    so a caller holding the old ``p.grad`` tensors can restore them).
    """
    _require_group("all_reduce_gradients")
    dist = torch.distributed
    params = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not params:
        return
    world = dist.get_world_size(group)
    device = _comm_device(group, params[0].device)
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=group)
    chosen = [p for p, flag in zip(params, has_grad.tolist()) if flag]
    scaled = [(p.grad.detach() if p.grad is not None else torch.zeros_like(p)) * (1.0 / world) for p in chosen]
    for p, g in zip(chosen, _all_reduce_sums(scaled, group, device, bucket_bytes)):
        p.grad = g.to(p.dtype)
