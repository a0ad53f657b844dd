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
they cost exactly what DDP's backward costs, overlap included.

The statistics engines call ``ddp.module`` directly, not DDP's forward, so DDP's
per-forward buffer broadcast (``broadcast_buffers``) does not run in
``Tracker.step``. persample refuses the modules whose buffers change in a
forward (train-mode BatchNorm), so replicas' buffers stay as they were.

DDP features that change the all-reduce itself (communication hooks such as
fp16 compression, DDP's mixed precision) are refused: persample reduces the
gradients itself, and would silently not apply them.

For ``Tracker.observe``, where the user's own DDP backward runs,
:class:`LocalGradients` records the gradient that enters each parameter (this
rank's, before DDP averages it) so that the observed statistics and their sum
check use this rank's gradient, not the average.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from ._batch import Batch
from ._sharding import refuse_sharded
from ._torch_compat import ddp_comm_hooks
from .distributed import DEFAULT_BUCKET_BYTES, all_reduce_gradients, all_reduce_stats, is_distributed
from .errors import UnsupportedModelError
from .stats import GradStats

__all__ = ["Replicas", "resolve_replicas", "LocalGradients"]


def _ddp_class():
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel


@dataclass
class Replicas:
    """The model's replication across a process group, as the Tracker sees it."""

    wrapper: nn.Module | None          # the DistributedDataParallel wrapper, if the Tracker got one
    group: object = None               # the process group (None: the default group)
    bucket_bytes: int = DEFAULT_BUCKET_BYTES

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
        """
        for p in params.values():
            if p.grad is not None:
                p.grad = p.grad.clone()
        with torch.enable_grad():
            loss = batch.call(self.wrapper, loss_fn)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError("loss_fn on the whole batch must return a scalar (the mean loss)")
            (loss * scale if scale != 1.0 else loss).backward()

    def sync_gradients(self, params: dict[str, nn.Parameter]) -> None:
        if self.wrapper is not None:
            _refuse_custom_reduction(self.wrapper)
        if self.synchronizes():
            all_reduce_gradients(params, self.group, bucket_bytes=self.bucket_bytes)

    def reduce_stats(self, stats: GradStats, model: nn.Module | None = None, loss_fn=None,
                     batch: Batch | None = None) -> GradStats:
        """Global statistics; with ``model``, ``loss_fn`` and ``batch``, also inner products
        relative to the global mean (one forward-mode pass of the local batch)."""
        inner = None
        if batch is not None:
            from .engines.directional import per_example_directional_derivatives

            def inner(direction):
                return per_example_directional_derivatives(model, loss_fn, batch, direction)
        return all_reduce_stats(stats, self.group, inner_products=inner)


def resolve_replicas(model: nn.Module, distributed: bool | None) -> tuple[nn.Module, Replicas | None]:
    """(the module the engines run on, its Replicas or None).

    ``distributed=None`` means: replicated when a process group is initialized
    (or the model is a DDP wrapper); ``False`` opts out (each rank on its own).
    """
    refuse_sharded(model, "persample.Tracker")
    ddp = _ddp_class()
    if ddp is not None and isinstance(model, ddp):
        if distributed is False:
            raise ValueError("Tracker(DistributedDataParallel(...), distributed=False) would write each rank's "
                             "own gradient and let the replicas drift apart: pass the wrapper without "
                             "distributed=False, or pass ddp.module if each rank should train on its own")
        return model.module, Replicas(model, model.process_group,
                                      getattr(model, "bucket_bytes_cap", DEFAULT_BUCKET_BYTES))
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
            code="DDP_MIXED_PRECISION")
    if ddp_comm_hooks(ddp):
        raise UnsupportedModelError(
            "persample.Tracker: this DistributedDataParallel model has a communication hook "
            "(register_comm_hook). Tracker.step averages gradients across ranks itself and would not apply "
            "the hook, so p.grad would differ from DDP's backward. Use Tracker.observe around your own "
            "DDP backward (which keeps DDP's reduction, hook included), or DDP without the hook",
            code="DDP_COMM_HOOK")


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
