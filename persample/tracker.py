"""``Tracker``: per-example statistics in an existing training loop, by changing one line.

Replace::

    loss_fn(model(inputs), targets).backward()

with::

    stats = tracker.step(inputs, targets)

``step`` adds the mean gradient ḡ = (1/B) Σ_i g_i into ``p.grad`` exactly as that
backward would (accumulating into an existing ``.grad``, leaving frozen
parameters' ``.grad`` as ``None``), so any optimizer, scheduler or gradient
accumulation works unchanged; and it calls the registered hooks with the
batch's :class:`GradStats`.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Iterator

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten
from torch.utils.hooks import RemovableHandle

from ._batch import Batch, as_batch
from ._data_parallel import LocalGradients, resolve_replicas
from ._model import check_clip_norm, trainable_parameters
from .api import compute_stats
from .check import batch_loss_grads, check_batch_mean
from .engines.observe import Observation, observing
from .stats import GradStats

__all__ = ["Tracker"]

Hook = Callable[["Tracker", GradStats], None]


class Tracker:
    """Drop-in replacement for ``loss.backward()`` that also yields per-example statistics.

    Args:
        model: the model being trained.
        loss_fn: per-example loss, ``loss_fn(output, target)`` on a batch of one
            (standard losses with ``reduction="mean"`` work as they are); on the
            whole batch it must give the mean loss.
        every: compute statistics (and call hooks) on steps 0, k, 2k, …; other
            steps are a plain forward+backward with no per-example work.
        clip_norm: per-example clipping C: ``p.grad += (1/B) Σ_i min(1, C/‖g_i‖) g_i``.
            Statistics still describe the raw gradients. Clipping needs
            per-example norms, so every step does per-example work.
        chunk_size, randomness, engine, var, inner_products: as in
            :func:`persample.grad_stats`. Random ops advance the global RNG as a
            normal training step would.
        check_every: every k-th step (k > 0) also asserts
            :func:`persample.check_mean` on that batch (per-example gradients from
            the vmap engine, each example in isolation, against autograd),
            raising :class:`persample.MeanMismatchError` on a mismatch.
        distributed: under ``torch.distributed`` (a ``DistributedDataParallel``
            wrapper, or any model once a process group is initialized; ``None``
            detects it): ``step`` leaves ``p.grad`` = (1/W) Σ_r p.grad_r as DDP's
            backward does (not inside ``ddp.no_sync()``), and the statistics
            passed to hooks are those of the global batch
            (:func:`persample.distributed.all_reduce_stats`). ``False`` opts out:
            each rank on its own. With a DDP wrapper, ``tracker.model`` is
            ``ddp.module``, on which the engines run, and steps without
            per-example work run DDP's own forward and backward. Every rank
            must step in lockstep (the reductions are collectives).

    A step is atomic: if it raises (bad input, the model, a hook, the check),
    every ``p.grad`` is exactly as it was before the step.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor], *, every: int = 1,
                 clip_norm: float | None = None, chunk_size: int | None = None,
                 randomness: str = "error", check_every: int = 0, engine: str = "auto",
                 var: bool = True, inner_products: bool = False, distributed: bool | None = None):
        _require_int("every", every, minimum=1)
        _require_int("check_every", check_every, minimum=0)
        check_clip_norm(clip_norm)
        model, self._replicas = resolve_replicas(model, distributed)
        trainable_parameters(model)  # fail early on a model with nothing to train
        self.model = model
        self.loss_fn = loss_fn
        self.every = every
        self.clip_norm = clip_norm
        self.check_every = check_every
        self.stats_options = dict(chunk_size=chunk_size, randomness=randomness, engine=engine, var=var,
                                  inner_products=inner_products)
        self.steps = 0
        self.last_stats: GradStats | None = None
        self._hooks: OrderedDict[int, Hook] = OrderedDict()  # weak-referenceable, as RemovableHandle needs

    # ---------------------------------------------------------------- hooks
    def register_hook(self, fn: Hook) -> RemovableHandle:
        """Call ``fn(tracker, stats)`` after every step that computed statistics.

        Hooks run in registration order, after ``p.grad`` has been written.
        Returns a handle whose ``.remove()`` detaches the hook.
        """
        if not callable(fn):
            raise TypeError(f"hook must be callable, got {type(fn).__name__}")
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = fn
        return handle

    # ----------------------------------------------------------------- step
    def wants_stats(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the next one) computes statistics."""
        step = self.steps if step is None else step
        return step % self.every == 0

    def step(self, inputs: Any, targets: Any = None) -> GradStats | None:
        """One training step's gradients; returns this batch's GradStats, or None on plain steps."""
        batch = as_batch(inputs, targets)
        params = trainable_parameters(self.model)
        saved = {name: p.grad for name, p in params.items()}
        step = self.steps
        with_stats = self.wants_stats(step)
        checking = self.check_every > 0 and step % self.check_every == 0
        try:
            if with_stats or checking or self.clip_norm is not None:
                options = dict(self.stats_options)
                if self._replicas is not None:  # relative to the global mean, after the reduction
                    options["inner_products"] = False
                stats = compute_stats(self.model, self.loss_fn, batch, clip_norm=self.clip_norm,
                                      fork_rng=False, **options)
                if checking:
                    check_batch_mean(self.model, self.loss_fn, batch,
                                     chunk_size=self.stats_options["chunk_size"],
                                     randomness=self.stats_options["randomness"])
                update = stats.mean if self.clip_norm is None else stats.clipped_mean
                _accumulate(params, update, copy=True)  # stats' tensors must not alias p.grad
                if self._replicas is not None:
                    self._replicas.sync_gradients(params)
            elif self._replicas is not None and self._replicas.wrapper is not None:
                stats = None
                self._replicas.ddp_backward(batch, self.loss_fn, params)  # DDP averages, overlapped
            else:
                stats = None
                _accumulate(params, self._plain_gradient(batch, params), copy=False)
                if self._replicas is not None:
                    self._replicas.sync_gradients(params)
            if self._replicas is not None:
                if with_stats:
                    stats = self._replicas.reduce_stats(
                        stats, self.model, self.loss_fn, batch if self.stats_options["inner_products"] else None)
            if with_stats:
                self._publish(stats)
        except BaseException as err:
            for name, p in params.items():
                p.grad = saved[name]
            if hasattr(err, "add_note"):
                err.add_note(f"(raised in persample.Tracker.step at step {step}; p.grad was restored)")
            raise
        self.steps += 1
        return stats if with_stats else None

    @contextlib.contextmanager
    def observe(self, targets: Any = None, *, reduction: str = "mean",
                batch_size: int | None = None) -> Iterator[Observation]:
        """Drop-in mode: statistics from your own ``loss.backward()``, with no second pass.

        ::

            with tracker.observe(targets, reduction="mean") as observed:
                loss = criterion(model(inputs), targets)
                loss.backward()
            observed.stats  # GradStats (None on steps without statistics)

        The statistics describe the unscaled per-example gradients
        g_i = ∇ loss_fn(output_i, target_i), whichever reduction the loss uses:
        ``reduction`` declares how the loss combines those per-example losses,
        ``"mean"`` (PyTorch's default) or ``"sum"``, so they can be unscaled. A declaration that does not match the loss, or a loss with
        other terms, raises :class:`persample.engines.observe.ObservationError`
        after the backward instead of returning wrong statistics. Uses the fast
        engine only (there is no second pass to fall back on); models it cannot
        handle exactly raise ``NotExact``, so use :meth:`step` for them.
        ``p.grad`` is whatever your backward made it. Not available with
        ``clip_norm`` (clipping must happen before the reduction: use :meth:`step`).

        Under DDP (run your DDP model's forward and backward in the block), the
        statistics are built from this rank's own gradient, recorded before
        DDP averages ``p.grad``, and then all-reduced into those of the global
        batch; ``p.grad`` stays DDP's average. Inner products relative to the
        global mean need the inputs for a second pass: use :meth:`step`.
        """
        if self.clip_norm is not None:
            raise ValueError("observe() cannot clip: the backward has already reduced the gradients. "
                             "Use tracker.step(inputs, targets) with clip_norm")
        if self._replicas is not None and self.stats_options["inner_products"]:
            raise ValueError("observe() under torch.distributed cannot give inner products relative to the "
                             "global mean gradient (they need a second pass over the inputs, which observe "
                             "does not see): use tracker.step(inputs, targets), or inner_products=False")
        if not self.wants_stats():
            observation = Observation()
            yield observation
            self.steps += 1
            return
        if batch_size is None:
            leaves = [t for t in (tree_flatten(targets)[0] if targets is not None else [])
                      if isinstance(t, Tensor) and t.dim() > 0]
            if not leaves:
                raise ValueError("observe() needs the batch size: pass targets batched on dim 0, or batch_size=")
            batch_size = int(leaves[0].shape[0])
        local = None if self._replicas is None else LocalGradients(trainable_parameters(self.model))
        try:
            with observing(self.model, self.loss_fn, targets, batch_size=batch_size, reduction=reduction,
                           var=self.stats_options["var"],
                           inner_products=self.stats_options["inner_products"]) as observation:
                with local.recording() if local is not None else contextlib.nullcontext():
                    yield observation
                if local is not None:
                    local.show_local()  # the sum check compares this rank's gradients with its own
        finally:
            if local is not None:
                local.restore()
        if self._replicas is not None:
            observation.stats = self._replicas.reduce_stats(observation.stats)
        self._publish(observation.stats)
        self.steps += 1

    def _publish(self, stats: GradStats) -> None:
        """Keep ``stats`` as ``last_stats`` and call the hooks with it, in registration order."""
        self.last_stats = stats
        for hook in list(self._hooks.values()):
            hook(self, stats)

    def _plain_gradient(self, batch: Batch, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        """∇ of the mean loss, as ``loss.backward()`` would compute it (but not yet accumulated)."""
        grads = batch_loss_grads(self.model, self.loss_fn, batch, params)
        return {name: g for name, g in grads.items() if g is not None}

    def __repr__(self) -> str:
        return (f"Tracker({type(self.model).__name__}, every={self.every}, clip_norm={self.clip_norm}, "
                f"check_every={self.check_every}, steps={self.steps}, hooks={len(self._hooks)})")


def _accumulate(params: dict[str, nn.Parameter], update: dict[str, Tensor], *, copy: bool) -> None:
    """``p.grad += update`` as autograd's AccumulateGrad does, but out of place (so it can be undone)."""
    for name, g in update.items():
        p = params[name]
        g = g.detach().to(p.dtype)
        if p.grad is not None:
            p.grad = p.grad + g
        else:
            p.grad = g.clone() if copy else g


def _require_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
