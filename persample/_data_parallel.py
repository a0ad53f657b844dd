"""What :class:`persample.Tracker` does under data parallelism (DDP, or replicas in a process group).

The engines always run on this rank's own module and batch; this module adds
the two cross-rank steps around them:

- **p.grad**: after the Tracker has added this rank's update (ḡ_r, or the
  clipped mean) to ``p.grad`` as ``loss.backward()`` would, :meth:`Replicas.sync_gradients`
  leaves ``p.grad`` = (1/W) Σ_r p.grad_r on every rank, which is what DDP's
  backward leaves. Inside ``ddp.no_sync()`` it does nothing, as DDP does; the
  first synchronised step then averages the accumulated gradients.
  With ``Tracker(ddp.module)`` (no wrapper to ask about ``no_sync``) every step
  synchronises. The average is linear, so accumulating synchronised gradients
  gives the same ``p.grad`` (up to rounding) as accumulating local ones and
  synchronising once; only the traffic differs.
- **statistics**: :meth:`Replicas.reduce_stats` all-reduces the rank's
  GradStats into those of the global batch (:func:`persample.distributed.all_reduce_stats`).

Plain steps (no statistics, no clipping, no check) with a DDP wrapper run
DDP's own forward and backward instead (:meth:`Replicas.ddp_backward`), so
they cost what DDP's backward costs, overlap included, plus two all-reduces of a
few integers (the agreements below).

The statistics engines call ``ddp.module`` directly, not DDP's forward, so DDP's
per-forward buffer broadcast (``broadcast_buffers``) does not run in
``Tracker.step``. persample refuses the modules whose buffers change in a
forward (train-mode BatchNorm), so replicas' buffers stay as they were.

DDP features that change the all-reduce itself (communication hooks such as
fp16 compression, DDP's mixed precision) are refused: persample reduces the
gradients itself, and would silently not apply them.

One outcome on every rank (docs/ranks.md): each step agrees on its batch before any collective
(:meth:`Replicas.agreed_batch`: a bad batch raises on every rank, a rank with no examples makes every
rank raise ``EMPTY_RANK``), plain steps agree between DDP's forward and its backward
(:func:`loss_on_every_rank`), and ``Tracker.observe`` agrees when the backward reaches the module's
output (:class:`BackwardGate`), before DDP's reducer sends anything.

For ``Tracker.observe``, where the user's own DDP backward runs,
:class:`LocalGradients` records the gradient that enters each parameter (this
rank's, before DDP averages it) so that the observed statistics and their sum
check use this rank's gradient, not the average.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from ._batch import Batch
from ._sharding import check_fsdp2, refuse_sharded, sharding_of, unsharded
from ._torch_compat import ddp_comm_hooks
from .distributed import (
    DEFAULT_BUCKET_BYTES,
    agree,
    all_reduce_gradients,
    all_reduce_stats,
    is_distributed,
    reduce_scatter_stats,
    refresh_shard_sums,
)
from .errors import UnsupportedModelError
from .stats import GradStats

__all__ = ["Replicas", "resolve_replicas", "LocalGradients", "BackwardGate"]


def _ddp_class():
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel


@dataclass
class Replicas:
    """The model's replication across a process group, as the Tracker sees it."""

    wrapper: nn.Module | None  # the DistributedDataParallel wrapper, if the Tracker got one
    group: object = None  # the process group (None: the default group)
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    sharded: bool = False  # an FSDP2 model (fully_shard): steps run FSDP2's own backward

    def synchronizes(self) -> bool:
        """False inside the wrapper's ``no_sync()``."""
        return self.wrapper is None or bool(getattr(self.wrapper, "require_backward_grad_sync", True))

    def ddp_backward(self, batch: Batch, loss_fn, params: dict[str, nn.Parameter], scale: float = 1.0) -> None:
        """A plain step through DDP itself: ``(scale * loss_fn(ddp(x), y)).backward()``.

        DDP's reducer then averages the gradients, bucketed and overlapped with
        the backward, honouring ``no_sync()``, communication hooks and the
        rest of its configuration. Existing gradients are replaced by copies
        first, so that the Tracker can still restore the originals if the step
        raises (the backward accumulates into ``p.grad`` in place).

        Between the forward and the backward the ranks agree (one all-reduce of W
        integers): a forward or a loss that raised on one rank raises on every rank,
        before DDP's reducer would wait for that rank's gradients.
        """
        for p in params.values():
            if p.grad is not None:
                p.grad = p.grad.clone()
        with torch.enable_grad():
            loss = loss_on_every_rank(
                lambda: batch.call(self.wrapper, loss_fn), self.group, "persample.Tracker.step (DDP's forward)"
            )
            (loss * scale if scale != 1.0 else loss).backward()

    def agreed_batch(self, inputs, targets, where: str) -> Batch:
        """This rank's batch, once every rank has one (one all-reduce of 2W integers, before any other
        collective of the step): a bad batch on one rank raises on every rank (the others:
        ``OtherRankFailed``), and a rank with no examples makes every rank raise ``EMPTY_RANK``."""
        from ._batch import as_batch

        failure, batch = None, None
        empty = _empty_batch(inputs)
        try:
            batch = None if empty else as_batch(inputs, targets)
        except Exception as err:  # re-raised by agree_on_examples, on every rank
            failure = err
        agree_on_examples(self.group, failure, empty, where, sharded=False)
        assert batch is not None  # (agree_on_examples raised otherwise)
        return batch

    def sync_gradients(self, params: dict[str, nn.Parameter]) -> None:
        if self.wrapper is not None:
            _refuse_custom_reduction(self.wrapper)
        if self.synchronizes():
            all_reduce_gradients(params, self.group, bucket_bytes=self.bucket_bytes)

    def agree(self, failure: BaseException | None, where: str, *flags: bool) -> list[bool]:
        """One outcome on every rank (:func:`persample.distributed.agree`): if any rank failed, every
        rank raises (its own error, or OtherRankFailed); else whether each flag holds on every rank."""
        return agree(failure, self.group, where=where, flags=flags)

    def reduce_stats(
        self,
        stats: GradStats,
        model: nn.Module | None = None,
        loss_fn=None,
        batch: Batch | None = None,
        *,
        reduced: tuple[float, dict[str, Tensor]] | None = None,
    ) -> GradStats:
        """Global statistics; with ``model``, ``loss_fn`` and ``batch``, also inner products
        relative to the global mean (one forward-mode pass of the local batch). Under FSDP2
        (``sharded``) the mean and M2 are reduce-scattered: each rank keeps its shard
        (:func:`persample.distributed.reduce_scatter_stats`)."""
        if self.sharded:  # (``reduced``: S1 known already, reduce_scatter_stats)
            return reduce_scatter_stats(stats, self.group, reduced=reduced)
        inner = None
        if batch is not None:
            from .engines.directional import per_example_directional_derivatives

            def inner(direction):
                return per_example_directional_derivatives(model, loss_fn, batch, direction)

        return all_reduce_stats(stats, self.group, inner_products=inner)

    def after_merge(self, stats: GradStats) -> GradStats:
        """Merged sharded statistics with their global sums recomputed (a small all-reduce)."""
        return refresh_shard_sums(stats, self.group) if self.sharded else stats


def resolve_replicas(model: nn.Module, distributed: bool | None) -> tuple[nn.Module, Replicas | None]:
    """(the module the engines run on, its Replicas or None).

    ``distributed=None`` means: replicated when a process group is initialized
    (or the model is a DDP wrapper); ``False`` opts out (each rank on its own).
    """
    if sharding_of(model) == "FSDP2":
        check_fsdp2(model, "persample.Tracker")
        if distributed is False:
            raise ValueError(
                "Tracker(fully_shard(model), distributed=False): an FSDP2 model's parameters are "
                "sharded across the ranks, so each rank cannot train on its own; leave "
                "distributed unset"
            )
        return model, Replicas(None, sharded=True)
    refuse_sharded(model, "persample.Tracker")
    ddp = _ddp_class()
    if ddp is not None and isinstance(model, ddp):
        if distributed is False:
            raise ValueError(
                "Tracker(DistributedDataParallel(...), distributed=False) would write each rank's "
                "own gradient and let the replicas drift apart: pass the wrapper without "
                "distributed=False, or pass ddp.module if each rank should train on its own"
            )
        return model.module, Replicas(
            model, model.process_group, getattr(model, "bucket_bytes_cap", DEFAULT_BUCKET_BYTES)
        )
    if distributed is None:
        distributed = is_distributed()
    if distributed:
        if not is_distributed():
            raise RuntimeError("Tracker(distributed=True) needs an initialized torch.distributed process group")
        return model, Replicas(None)
    return model, None


def _refuse_custom_reduction(ddp: nn.Module) -> None:
    # mixed_precision first: DDP implements it with a communication hook of its own, which the user did not register
    if getattr(ddp, "mixed_precision", None) is not None:
        raise UnsupportedModelError(
            "persample.Tracker: DistributedDataParallel(mixed_precision=...) is not supported by "
            "Tracker.step, which averages gradients itself, in the parameters' dtype. Use torch.autocast "
            "for mixed precision instead, or Tracker.observe around your own DDP backward",
            code="DDP_MIXED_PRECISION",
        )
    if ddp_comm_hooks(ddp):
        raise UnsupportedModelError(
            "persample.Tracker: this DistributedDataParallel model has a communication hook "
            "(register_comm_hook). Tracker.step averages gradients across ranks itself and would not apply "
            "the hook, so p.grad would differ from DDP's backward. Use Tracker.observe around your own "
            "DDP backward (which keeps DDP's reduction, hook included), or DDP without the hook",
            code="DDP_COMM_HOOK",
        )


class BackwardGate:
    """Under DDP, ``Tracker.observe``'s agreement before DDP's reducer runs: one all-reduce of 2W
    integers, made by every rank either when the gradient reaches the module's output (the start of
    the user's backward, before any parameter's gradient and so before DDP's reducer sends anything),
    or, on a rank whose block raised before that, when the block ends, or, on a rank with no examples,
    instead of running the block. So an error in one rank's forward or loss, or a rank without
    examples, raises on every rank (``OtherRankFailed``, or ``EMPTY_RANK`` on every rank) instead of
    leaving the others waiting in DDP's all-reduce. An error after the backward has started (in the
    backward itself, on one rank) cannot be agreed on here: DDP's reducer is already waiting."""

    def __init__(self, replicas: Replicas, where: str):
        self.replicas, self.where = replicas, where
        self.opened = False  # this rank has made the agreement
        self.failed = False  # and it raised (every rank raises there)

    def open(self, failure: BaseException | None = None, empty: bool = False) -> None:
        if self.opened:
            return
        self.opened = True
        try:
            agree_on_examples(self.replicas.group, failure, empty, self.where, sharded=False)
        except BaseException:
            self.failed = True
            raise

    @contextlib.contextmanager
    def watching(self, model: nn.Module) -> Iterator[None]:
        """Opens the gate when the backward reaches an output of ``model``'s forward."""
        from ._batch import tensors_in

        def on_output(module, args, output):
            with torch._C.DisableTorchFunction():  # the capture's watchers see the model's hooks, not ours
                for t in tensors_in(output):
                    if t.requires_grad:
                        t.register_hook(self._reached)

        handle = model.register_forward_hook(on_output)
        try:
            yield
        finally:
            handle.remove()

    def _reached(self, grad: Tensor) -> None:
        from .engines.fast.units import probe_running

        if not probe_running():  # (the graph audit's probe is not the user's backward)
            self.open()


class LocalGradients:
    """This rank's own gradient of a ``Tracker.observe`` block, whatever DDP does to ``p.grad``.

    A tensor hook on each parameter records the gradient that enters it (before
    accumulation, so before DDP's all-reduce touches ``p.grad``).
    :meth:`show_local` then sets ``p.grad`` to what a backward without DDP
    would have left (the value at entry plus that gradient), and
    :meth:`restore` puts DDP's averaged ``p.grad`` back.
    """

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self.before = {n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()}
        self.increments: dict[str, Tensor] = {}
        self.averaged: dict[str, Tensor | None] | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = [p.register_hook(self._recorder(n)) for n, p in self.params.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _recorder(self, name: str):
        def record(grad: Tensor) -> None:
            grad = grad.detach()
            self.increments[name] = grad.clone() if name not in self.increments else self.increments[name] + grad

        return record

    def show_local(self) -> None:
        self.averaged = {n: p.grad for n, p in self.params.items()}
        for n, p in self.params.items():
            before, inc = self.before[n], self.increments.get(n)
            if inc is None:
                p.grad = before
            else:
                p.grad = inc if before is None else before + inc

    def restore(self) -> None:
        if self.averaged is not None:
            for n, p in self.params.items():
                p.grad = self.averaged[n]
            self.averaged = None


# ------------------------------------------------------------------------------------ FSDP2


def refuse_fsdp2_options(tracker) -> None:
    """The Tracker options that need per-example work FSDP2's one backward cannot give, refused."""
    options = tracker.stats_options
    problems = []
    if tracker.clip_norm is not None:
        problems.append("clip_norm (clipping must weigh each example before FSDP2's reduce-scatter)")
    if tracker.check_every:
        problems.append("check_every (the independent engines cannot run an FSDP2 model)")
    if options["inner_products"]:
        problems.append(
            "inner_products=True (relative to the global mean they need a second pass; use "
            "tracker.accumulate(reference=...) for a shared reference)"
        )
    if options["engine"] not in ("auto", "fast"):
        problems.append(
            f"engine={options['engine']!r} (under FSDP2 the statistics come from the fast "
            "engine's capture of FSDP2's own backward)"
        )
    if problems:
        raise UnsupportedModelError(
            "persample.Tracker on an FSDP2 (fully_shard) model does not support "
            + "; ".join(problems)
            + ". Leave these options out, or train with DDP",
            code="FSDP2_OPTION",
        )


def fsdp2_step(tracker, inputs, targets, scale: float):
    """``Tracker.step`` on an FSDP2 model: FSDP2's own ``(scale * loss_fn(model(x), y)).backward()``,
    observed.

    ``p.grad`` is what that backward leaves (the sharded DTensor FSDP2 reduce-scatters, its
    ``MixedPrecisionPolicy`` included), because it is that backward. On statistics steps every
    FSDP2 module is unsharded first (:func:`._sharding.unsharded`), so the fast engine's capture
    sees the full parameters under their usual names; tensor hooks record the gradient that
    reaches each full parameter on this rank (before FSDP2 reduce-scatters it), which gives this
    rank's statistics (:func:`persample.engines.fast.observe.observing`); they are then all-reduced
    into the global batch's (:func:`persample.distributed.all_reduce_stats`: P-sized sums, never a
    P-sized all-gather). Every rank agrees before the forward, after the statistics and after the
    hooks, so a failure on one rank raises on every rank and undoes the step there
    (:func:`persample.distributed.agree`).
    """
    from ._batch import as_batch
    from ._model import trainable_parameters

    model, replicas = tracker.model, tracker._replicas
    step = tracker.steps
    accumulation = tracker._accumulation
    with_stats = accumulation.with_stats if accumulation is not None else tracker.wants_stats(step)
    params = trainable_parameters(model)
    saved = {name: p.grad for name, p in params.items()}
    previous = tracker.last_stats
    part_added = skip_added = refused_before = False
    try:
        for p in params.values():  # FSDP2 accumulates into p.grad in place: keep the originals to restore
            if p.grad is not None:
                p.grad = p.grad.clone()
        if not with_stats:  # a plain step is FSDP2's own forward and backward (of 0 examples too)
            batch = _any_batch(inputs, targets)
            loss = loss_on_every_rank(
                lambda: batch.call(model, tracker.batch_loss),
                replicas.group,
                "persample.Tracker.step (FSDP2's forward)",
            )
            (loss * scale if scale != 1.0 else loss).backward()
        else:
            failure, batch = None, None
            empty = _empty_batch(inputs)
            try:
                batch = None if empty else as_batch(inputs, targets)
            except Exception as err:  # before the forward's collectives: every rank raises here
                failure = err
            agree_on_examples(replicas.group, failure, empty, "persample.Tracker.step (FSDP2)")
            failure, stats = None, None
            settled: list[bool] = []  # the agreement's outcome, once observed_fsdp2_backward asked for it
            info: dict = {}  # what observed_fsdp2_backward did: the skipped products, the loss's weight, ...
            tracker._fsdp2_skipped = frozenset()

            def settle(failure: BaseException | None, has_stats: bool) -> bool:
                settled.append(False)  # (called: whatever it raises is every rank's outcome)
                settled[-1] = replicas.agree(failure, "persample.Tracker.step (FSDP2)", has_stats)[0]
                return settled[-1]

            try:
                reference = None
                if accumulation is not None and accumulation.shared and accumulation.reference is not None:
                    reference = accumulation.reference
                assert batch is not None  # (agree raised otherwise)
                stats = observed_fsdp2_backward(
                    model,
                    tracker.batch_loss,
                    tracker.per_example_loss,
                    batch,
                    group=replicas.group,
                    scale=scale,
                    var=tracker.stats_options["var"],
                    reference=reference,
                    settle=settle,
                    info=info,
                )
            except Exception as err:  # after FSDP2's collectives: agree makes every rank raise
                if settled:  # raised by the agreement itself, or after it: every rank raises already
                    tracker._fsdp2_skipped = frozenset(info.get("skipped", ()))
                    raise
                failure = err
            tracker._fsdp2_skipped = frozenset(info.get("skipped", ()))
            if settled:
                everyone = settled[-1]
            else:
                (everyone,) = replicas.agree(failure, "persample.Tracker.step (FSDP2)", stats is not None)
            fresh = all(g is None for g in saved.values())  # p.grad is then FSDP2's reduced sum of this step alone
            stats = (
                replicas.reduce_stats(stats, reduced=_reduced_sums(params, info) if fresh else None)
                if everyone
                else None
            )
            failure = None
            try:
                if stats is None or not stats.is_finite():
                    tracker.skipped.append(step)
                    skip_added, stats = True, None
                    if accumulation is not None:  # the block's batch has no statistics (not its other parts')
                        refused_before, accumulation.refused = accumulation.refused, True
                elif accumulation is not None:
                    tracker._add_part(stats)
                    part_added = True
                else:
                    tracker._publish(stats)
            except Exception as err:
                failure = err
            replicas.agree(failure, "persample.Tracker.step (FSDP2 hooks)")
    except BaseException as err:
        for name, p in params.items():
            p.grad = saved[name]
        tracker.last_stats = previous
        if skip_added:
            tracker.skipped.pop()
            if accumulation is not None:
                accumulation.refused = refused_before
        if part_added:
            accumulation.parts.pop()
        if hasattr(err, "add_note"):
            err.add_note(f"(raised in persample.Tracker.step at step {step} of an FSDP2 model; p.grad was restored)")
        raise
    if accumulation is None:
        tracker.steps += 1
    return stats if with_stats else None


def _reduced_sums(params: dict[str, nn.Parameter], info: dict) -> tuple[float, dict[str, Tensor]] | None:
    """``reduce_scatter_stats``' ``reduced`` after a statistics step that started without ``p.grad``: FSDP2's
    reduce-scatter left p.grad = (1/D) Σ_r c Σ_{i∈r} g_i, so S1 = Σ_r n_r μ_r = (D/c) · p.grad on every
    rank's rows, where the backwarded loss weighs every example by the same c = 1/m on every rank, m an
    integer (a mean over the same batch size, a sum, times a scale 1/k; checked across ranks by the
    reduction's header: where the factors differ, S1 travels as before). None where FSDP2's reduction
    is not one persample reads (a casting ``MixedPrecisionPolicy``: its bf16 product is not the sums)."""
    weight, divide = info.get("weight"), info.get("divide")
    if not weight or not divide or weight <= 0:
        return None
    inverse = 1.0 / weight
    if inverse != round(inverse):  # (common_weight snaps 1/B, 1/N and 1 exactly; anything else: S1 travels)
        return None
    shards = {}
    for name, p in params.items():
        grad = p.grad
        shards[name] = grad.to_local() if grad is not None else torch.zeros_like(p.to_local())  # type: ignore[attr-defined]
    return divide * round(inverse), shards


def loss_on_every_rank(compute, group, where: str) -> Tensor:
    """``compute()`` (a forward and the batch loss, a scalar), then one agreement (an all-reduce of W
    integers) before the backward: a forward or loss that raised on one rank raises on every rank (the
    others: ``OtherRankFailed``) before the backward's collectives (DDP's all-reduce, FSDP2's
    reduce-scatter) would wait for that rank."""
    failure, loss = None, None
    try:
        loss = compute()
        _require_scalar(loss)
    except Exception as err:  # re-raised by agree, on every rank
        failure = err
    agree(failure, group, where=where)
    assert loss is not None  # (agree raised otherwise)
    return loss


def _empty_batch(inputs) -> bool:
    """Whether ``inputs`` is a batch of 0 examples: tensors batched on dim 0, every one of length 0."""
    from ._batch import tensors_in

    leaves = [t for t in tensors_in(inputs) if t.dim() > 0]
    return bool(leaves) and all(int(t.shape[0]) == 0 for t in leaves)


def _any_batch(inputs, targets) -> Batch:
    """:func:`persample._batch.as_batch`, and also a batch of 0 examples, which FSDP2's own forward and
    backward take (a rank's share of an uneven global batch can be empty)."""
    from ._batch import as_batch

    if not _empty_batch(inputs):
        return as_batch(inputs, targets)
    if isinstance(inputs, Tensor):
        return Batch((inputs,), {}, targets, 0)
    if isinstance(inputs, Mapping):
        return Batch((), dict(inputs), targets, 0)
    return Batch(tuple(inputs), {}, targets, 0)


def agree_on_examples(
    group, failure: BaseException | None, empty: bool, where: str, *, sharded: bool = True, flags: tuple = ()
) -> list[bool]:
    """Before the first collective of a step, one outcome on every rank (a collective: one all-reduce of
    2W + len(flags) integers): if some rank failed, every rank raises (:func:`persample.distributed.agree`);
    if some rank has no examples, every rank raises the same refusal, naming those ranks:
    ``FSDP2_EMPTY_RANK`` under FSDP2 (``sharded``), ``EMPTY_RANK`` under DDP / replicas. Else returns,
    for each of ``flags``, whether it holds on every rank.

    Under FSDP2 the statistics come from the fast engine's capture of FSDP2's own backward on each
    rank, which needs at least one example there. Under DDP the step's ``p.grad`` is the average of
    the ranks' mean gradients, and the mean over 0 examples is not defined (NaN for a mean loss).
    Nothing has run yet where it is called, so ``p.grad`` is unchanged."""
    from .contract import refusal

    dist = torch.distributed
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    present = agree(
        None if empty else failure,
        group,
        where=where,
        flags=[not (empty and r == rank) for r in range(world)] + [bool(f) for f in flags],
    )
    missing = [r for r, here in enumerate(present[:world]) if not here]
    if missing:
        ranks = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {world}"
        have = "have" if len(missing) > 1 else "has"
        if sharded:
            raise refusal(
                "FSDP2_EMPTY_RANK",
                f"{where}: {ranks} {have} no examples in this statistics step. Under FSDP2 the statistics "
                "come from the fast engine's capture of FSDP2's own backward on every rank, which needs at "
                "least one example per rank. Every rank raises this, before any other collective, and p.grad "
                "is unchanged. Give every rank at least one example (torch's DistributedSampler pads the "
                "ranks to equal sizes; drop_last=True drops a short last batch), or take this step without "
                "statistics (Tracker(every=k); a step without statistics runs FSDP2's own forward and "
                "backward, also on 0 examples)",
            )
        raise refusal(
            "EMPTY_RANK",
            f"{where}: {ranks} {have} no examples in this step. Under DDP the step's p.grad is the average "
            "of every rank's mean gradient, which is not defined for 0 examples (a mean loss over them is "
            "NaN, and DDP's backward would average that into every rank's p.grad). Every rank raises this "
            "before any other collective (an observe block does not run), and p.grad is unchanged. Give "
            "every rank at least one example (torch's DistributedSampler pads the ranks to equal sizes; "
            "drop_last=True drops a short last batch)",
        )
    return present[world:]


def observed_fsdp2_backward(
    model: nn.Module,
    batch_loss,
    per_example_loss,
    batch: Batch,
    *,
    group=None,
    scale: float = 1.0,
    var: bool = True,
    inner_products: bool = False,
    reference=None,
    settle=None,
    info: dict | None = None,
) -> GradStats | None:
    """This rank's statistics (full-size mean and M2 of its own examples, their norms and losses) from
    FSDP2's own ``(scale * batch_loss(model(x), y)).backward()``, which leaves ``p.grad`` as FSDP2 does.

    Every FSDP2 module is unsharded first, so the fast engine's capture
    (:func:`persample.engines.fast.observe.observing`) sees the full parameters under their names;
    tensor hooks record the gradient that reaches each full parameter here, before FSDP2
    reduce-scatters it, and the observation's sum check compares the per-example gradients with
    that. A collective: every rank must call it (FSDP2's all-gathers and reduce-scatters).
    None when the output gradients are not finite (a skipped step).

    ``settle(failure, has_stats) -> bool``: the caller's agreement (a collective on every rank: raises on
    every rank if one failed, else whether every rank has statistics), called once the statistics are
    built or failed, while the modules are still unsharded. With it, the weight-gradient product is
    skipped where the statistics form Σ_i g_i anyway (:func:`_skipped_products`, the single-process fast
    engine's rule): FSDP2's reduction is deferred past the backward (``FSDP2Reduction``), the backward
    is asked only for the other leaves and the units' outputs, and once every rank agreed, Σ_i g_i (times
    the loss's weight) is written as each such parameter's unsharded gradient and FSDP2's own
    post-backward reduce-scatters them with the rest into ``p.grad``. A rank that failed makes every rank
    drop the deferred gradients (``p.grad`` as it was). ``info`` (a dict) gets ``skipped``, the names
    of the parameters whose product was skipped; ``weight``, the backwarded loss's weight w on this
    rank; and ``divide``, what FSDP2 divides the ranks' sum by (None where FSDP2's reduction is not
    one persample can read: a casting ``MixedPrecisionPolicy``, ...). Every rank takes the same path (agreed with the
    forward's outcome); where one cannot (a casting ``MixedPrecisionPolicy``, unfamiliar FSDP2 internals,
    re-entrant checkpointing, no parameter to skip), every rank runs FSDP2's own backward as before.
    """
    from ._model import trainable_parameters
    from .engines.fast.observe import observing

    from .errors import NotExact

    with unsharded(model):
        local = LocalGradients(trainable_parameters(model))
        reduction = _deferrable_reduction(model) if settle is not None else None
        if info is not None:
            info.update(skipped=set(), weight=None, divide=reduction.divide_factor() if reduction else None)
        hooked = _hooked(local.params) if reduction is not None else set()
        deferred: set[str] = set()
        failure: BaseException | None = None
        observation = None
        try:
            with observing(
                model,
                per_example_loss,
                batch.targets,
                batch_size=batch.size,
                var=var,
                inner_products=inner_products,
                reference=reference,
            ) as observation:
                with local.recording():  # (every module is unsharded: the forward has no collective)
                    forward_failure, loss = None, None
                    skip: set[str] = set()
                    leaves: list[Tensor] = []
                    try:
                        loss = batch.call(model, batch_loss)
                        _require_scalar(loss)
                        loss = loss * scale if scale != 1.0 else loss
                        if batch_loss is per_example_loss:  # this backward's loss is known: a standard one's
                            observation.loss_scale = scale  # weights are its form's, not derived at the output
                        if reduction is not None:
                            skip, leaves = _skipped_products(observation, loss, local.params, reduction, hooked, var)
                    except Exception as err:  # re-raised by agree, on every rank
                        forward_failure = err
                    (everyone_skips,) = agree(
                        forward_failure, group, where="persample (FSDP2's forward)", flags=[bool(skip)]
                    )
                    assert loss is not None  # (agree raised otherwise)
                    if everyone_skips:
                        assert reduction is not None  # (skip is empty without it)
                        observation.derived = frozenset(skip)
                        deferred = set(skip)
                        if info is not None:
                            info["skipped"] = set(skip)
                        reduction.defer()
                        loss.backward(inputs=_backward_inputs(leaves, observation, local.params, skip))
                    else:
                        loss.backward()
                local.show_local()
        except NotExact as err:
            if hasattr(err, "add_note"):
                err.add_note(
                    "(under FSDP2 the statistics come from the fast engine's capture of FSDP2's own "
                    "backward only: no other engine can run a sharded model. p.grad is FSDP2's; for "
                    "statistics of this model, train it with DDP)"
                )
            if settle is None:
                raise
            failure = err
        except Exception as err:
            if settle is None:
                raise
            failure = err
        finally:
            local.restore()
        if settle is None:
            return observation.stats if observation is not None else None
        stats = observation.stats if observation is not None and failure is None else None
        if info is not None and observation is not None:
            info["weight"] = observation.weight
        if deferred and failure is None:  # before the agreement: a rank that cannot write them fails it
            try:
                assert reduction is not None and observation is not None
                _write_formed_sums(observation, stats, local.params, deferred, reduction)
            except Exception as err:
                failure, stats = err, None
        try:
            settle(failure, stats is not None)  # raises on every rank if one failed
            if deferred:
                assert reduction is not None
                reduction.reduce()  # FSDP2's own post-backward: the reduce-scatter of every group
        except BaseException:
            if deferred:
                reduction.discard()  # type: ignore[union-attr]  # (deferred: there is one)
            raise
    return stats


def _deferrable_reduction(model: nn.Module):
    """FSDP2's reduction of ``model`` if it can be deferred past the backward (:func:`fsdp2_reduction`),
    else None (FSDP2's own backward, as before)."""
    from ._sharding import fsdp2_modules
    from ._torch_compat import fsdp2_reduction

    return fsdp2_reduction(model, fsdp2_modules(model))


def _hooked(params: dict[str, nn.Parameter]) -> set[str]:
    """The parameters with gradient or post-accumulate-grad hooks: they keep autograd's product (the
    hooks see what autograd accumulates)."""
    from ._torch_compat import post_accumulate_grad_hooks, tensor_gradient_hooks

    return {n for n, p in params.items() if tensor_gradient_hooks(p) or post_accumulate_grad_hooks(p)}


def _skipped_products(
    observation, loss: Tensor, params: dict, reduction, hooked: set[str], var: bool
) -> tuple[set[str], list[Tensor]]:
    """The parameters whose weight-gradient product the coming backward may skip: their statistics form
    every g_i anyway (:func:`persample.engines.fast.observe.formed_parameters`), so Σ_i g_i from that
    formation is their gradient; each is an unsharded FSDP2 parameter without hooks, reached by the
    loss (so FSDP2's own backward would give it a gradient), and only through the model's output (a
    loss term that reads the parameter itself, a regulariser, would be lost with the product). With them,
    the leaves of the loss's graph (:func:`graph_leaves`, walked once: :func:`_backward_inputs` reads them)."""
    from .engines._autograd import graph_leaves
    from .engines.fast.observe import formed_parameters

    names = formed_parameters(observation, var) - hooked
    if not names or not reduction.reaches_every_group():
        return set(), []
    leaves, hidden = graph_leaves([loss])
    if hidden:
        return set(), []
    reached = {id(t) for t in leaves}
    direct = _read_outside_the_output(loss, observation._roots or [])
    skipped = {
        n for n in names if id(params[n]) in reached and id(params[n]) not in direct and reduction.manages(params[n])
    }
    return skipped, leaves


def _read_outside_the_output(loss: Tensor, roots: list) -> set[int]:
    """ids of the leaves the loss's graph reaches without going through the model's output (``roots``)."""
    stop = {t.grad_fn for t in roots if t.grad_fn is not None}
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    seen: set = set()
    found: set[int] = set()
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        if (variable := getattr(node, "variable", None)) is not None:
            found.add(id(variable))
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return found


def _backward_inputs(leaves: list[Tensor], observation, params: dict, skipped: set[str]) -> list:
    """What the backward is asked for when it skips ``skipped``'s products: every leaf FSDP2's own
    backward would accumulate into but those, and the output edges of every captured call (their
    gradients are what the statistics are built from, and a unit whose parameters are all skipped
    would otherwise get none). ``leaves``: the loss's graph's, from :func:`_skipped_products`."""
    left_out = {id(params[n]) for n in skipped}
    inputs: list = []
    seen: set[int] = set()
    for t in leaves:
        if id(t) not in left_out and id(t) not in seen:
            seen.add(id(t))
            inputs.append(t)
    inputs.extend(edge for unit in observation._units for call in unit.calls for edge in call.edges.values())
    return inputs


def _write_formed_sums(observation, stats, params: dict, names: set[str], reduction) -> None:
    """Each skipped parameter's unsharded gradient: w · Σ_i g_i (w the backwarded loss's weight, so what
    the skipped product gives), from the statistics' mean; where this rank has none (output gradients
    that are not finite), from the captured calls in closed form (:func:`summed_gradients`)."""
    from .engines.fast.observe import summed_gradients

    if stats is not None and observation.weight is not None:
        factor = observation.weight * stats.n
        sums = {n: torch.mul(stats.mean[n], factor) for n in names}
    else:
        sums = summed_gradients(observation, names)
    for n in names:
        p = params[n]
        reduction.write(p, sums[n].detach().to(p.dtype))


def fsdp2_grad_stats(
    model: nn.Module,
    loss_fn,
    inputs,
    targets=None,
    *,
    var: bool = True,
    inner_products: bool = False,
    reference=None,
    engine: str = "auto",
    clip_norm: float | None = None,
) -> GradStats:
    """:func:`persample.grad_stats` on an FSDP2 model: this rank's statistics, from one FSDP2 forward
    and backward (:func:`observed_fsdp2_backward`), with every ``p.grad`` put back as it was.

    A collective (every rank calls it, in step). Each rank gets the statistics of its own batch
    with full-size ``mean`` and ``m2``; :func:`persample.distributed.all_reduce_stats` then gives
    the global batch's on every rank. A bad batch on one rank raises on every rank (the others:
    ``OtherRankFailed``), and a rank with 0 examples makes every rank raise ``FSDP2_EMPTY_RANK``
    (:func:`agree_on_examples`), before any of FSDP2's collectives.
    """
    from ._model import trainable_parameters
    from .batch_loss import loss_parts

    check_fsdp2(model, "persample.grad_stats")
    if engine not in ("auto", "fast") or clip_norm is not None:
        raise UnsupportedModelError(
            "persample.grad_stats on an FSDP2 (fully_shard) model observes FSDP2's own backward with the "
            "fast engine: engine must be 'auto' or 'fast', and clip_norm is not supported (leave them out)",
            code="FSDP2_OPTION",
        )
    from ._batch import as_batch

    failure, batch = None, None
    empty = _empty_batch(inputs)
    try:
        batch = None if empty else as_batch(inputs, targets)
    except Exception as err:  # before FSDP2's collectives: every rank raises here
        failure = err
    agree_on_examples(None, failure, empty, "persample.grad_stats (FSDP2)")
    assert batch is not None  # (agree_on_examples raised otherwise)
    params = trainable_parameters(model)
    saved = {name: p.grad for name, p in params.items()}
    for p in params.values():  # FSDP2 accumulates into p.grad in place
        p.grad = None
    batch_loss, per_example_loss = loss_parts(loss_fn)
    try:
        stats = observed_fsdp2_backward(
            model, batch_loss, per_example_loss, batch, var=var, inner_products=inner_products, reference=reference
        )
    finally:
        for name, p in params.items():
            p.grad = saved[name]
    failure = None
    if stats is None:
        failure = ValueError(
            "persample.grad_stats: the loss's gradients at the model output are not finite (inf/NaN) on this rank"
        )
    agree(failure, None, where="persample.grad_stats (FSDP2)")  # one outcome: the caller reduces next
    assert stats is not None  # (agree raised otherwise)
    return stats


def _require_scalar(loss) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn on the whole batch must return a scalar (the batch loss)")
