"""``Tracker``: per-example statistics in an existing training loop, by changing one line.

Replace::

    loss_fn(model(inputs), targets).backward()

with::

    stats = tracker.step(inputs, targets)

``step`` adds into ``p.grad`` exactly what that backward would (accumulating
into an existing ``.grad``, leaving ``.grad`` as ``None`` for frozen parameters
and for parameters the loss does not reach, filling ``x.grad`` for inputs that
require grad), on every step, so any optimizer, scheduler or gradient
accumulation works unchanged; and it calls the registered hooks with the
batch's :class:`GradStats`.

The statistics describe g_i = ∇ L_i for the per-example loss L_i (by default
``loss_fn`` on a batch of one; see :mod:`persample.batch_loss` for batch
losses that are not a mean, such as a token mean over a padded batch).
The batch loss is ℓ = Σ_i w_i L_i, ``p.grad`` = Σ_i w_i g_i, and when every
w_i = w, ``p.grad`` = (w·B)·``stats.mean``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterator, Mapping

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._accumulation import Accumulation, micro_batch_noise, micro_batch_part, refuse_with_micro_batches
from ._batch import as_batch, tensors_in
from ._data_parallel import (
    BackwardGate,
    LocalGradients,
    agree_on_examples,
    fsdp2_step,
    refuse_fsdp2_options,
    resolve_replicas,
)
from ._grad_writer import (
    GradSnapshot,
    accumulate_into_grads,
    add_input_gradients,
    leaf_inputs_requiring_grad,
    run_post_accumulate_grad_hooks,
    written_leaves,
)
from ._model import check_clip_norm, random_state, set_random_state, trainable_parameters
from ._sharding import restore_sharding, sharding_of, unshard_all
from ._step_plan import StepConfig, nonfinite_examples, plain_gradient, plan_step, statistics_step
from .api import compute_stats, prepare_reference
from .batch_loss import BatchLossMismatch, loss_parts
from .errors import MeanMismatchError, NotExact, ObservationError, SkippedStatisticsWarning, UnsupportedModelError
from .engines.fast.observe import Observation, observing
from .explain import Explanation, explain
from .stats import GradStats

__all__ = ["Tracker"]

Hook = Callable[["Tracker", GradStats], object]  # the return value is ignored (Diagnostics returns its row)

#: What ``Tracker(on_refusal=...)`` accepts (see :meth:`Tracker.observe`).
ON_REFUSAL = ("raise", "skip", "fallback")
#: The refusals ``on_refusal`` applies to: the statistics of a step cannot be shown exact.
REFUSALS = (NotExact, ObservationError, UnsupportedModelError, BatchLossMismatch)


class Tracker:
    """Drop-in replacement for ``loss.backward()`` that also yields per-example statistics.

    Args:
        model: the model being trained.
        loss_fn: the loss your loop backwards, ``loss_fn(output, targets)`` on the
            whole batch. Called on a batch of one it is the per-example loss L_i
            the statistics describe, unless ``loss_fn`` is a
            :class:`persample.BatchLoss` that names its per-example part (as
            :func:`persample.causal_lm_loss` does for token losses). The batch
            loss may weigh the examples in any way, ℓ = Σ_i w_i L_i (a mean, a
            sum, a token mean, class weights): the weights are derived from the
            loss at the model output and checked on every statistics step,
            raising :class:`persample.BatchLossMismatch` when the per-example
            losses do not describe the batch loss.
        every: compute statistics (and call hooks) on steps 0, k, 2k, …; other
            steps are a plain forward+backward with no per-example work.
        clip_norm: per-example clipping C: ``p.grad += w Σ_i min(1, C/‖g_i‖) g_i``
            (w = 1/B for a mean loss; needs equal weights w_i = w).
            Statistics still describe the raw gradients. Clipping needs
            per-example norms, so every step does per-example work.
        randomness: what the statistics of a model that draws random numbers
            in training mode (dropout) describe. The default ``"different"``:
            the draws of the training forward itself, an independent mask per
            example as in any batched forward, so Hugging Face models (dropout
            0.1) train with default arguments. With the default fast engine one
            forward gives both ``p.grad`` and the statistics, so ``p.grad`` is
            exactly the plain backward with the same draws (the same RNG state
            gives the same masks), and the statistics are those draws'
            per-example gradients: what :meth:`observe` describes too. Where
            the fast engine falls back to vmap or the loop, the statistics use
            their own per-example draws (from the same distribution), and so
            does ``p.grad`` (w·B·``stats.mean``) when the examples weigh
            equally and the fast engine's forward ran (it gives the weights);
            otherwise ``p.grad`` comes from one more forward with its own draws.
            ``"same"`` (one mask shared by the examples) or ``"error"`` (refuse
            random models, naming the module) as in :func:`persample.grad_stats`.
        chunk_size, engine, var, inner_products: as in
            :func:`persample.grad_stats`. Random ops advance the global RNG as a
            normal training step would. Inner products against a direction
            shared by micro-batches: :meth:`accumulate`'s ``reference``.
        check_every: every k-th step (k > 0) also checks that autograd's
            gradient of the batch loss equals Σ_i w_i g_i, with g_i from the
            independent engines (vmap, else the per-example loop: each example
            in isolation, never the fast engine) and w_i the loss's weights
            (equal or not: class weights, token means over padding), raising
            :class:`persample.MeanMismatchError` on a mismatch (a model that
            couples the examples of a batch).
        distributed: under ``torch.distributed`` (a ``DistributedDataParallel``
            wrapper, or any model once a process group is initialized; ``None``
            detects it): ``step`` leaves ``p.grad`` = (1/W) Σ_r p.grad_r as DDP's
            backward does (not inside ``ddp.no_sync()``), and the statistics
            passed to hooks are those of the global batch
            (:func:`persample.distributed.all_reduce_stats`). ``False`` opts out:
            each rank on its own. With a DDP wrapper, ``tracker.model`` is
            ``ddp.module``, on which the engines run, and steps without
            per-example work run DDP's own forward and backward. Every rank
            must step in lockstep (the reductions are collectives). An FSDP2
            model (``fully_shard``) runs FSDP2's own forward and backward on
            every step (``p.grad`` is FSDP2's sharded gradient) and observes it
            on statistics steps (see ``_data_parallel.fsdp2_step``).
        on_refusal: what :meth:`observe` does with a step whose statistics it
            cannot compute exactly (``NotExact``, ``ObservationError``, …,
            raised after your backward, which has run as without persample):
            ``"raise"`` (default) raises it; ``"skip"`` warns once per reason
            (:class:`persample.SkippedStatisticsWarning`), records the step in
            :attr:`refused` and :attr:`skipped`, and goes on with no statistics;
            ``"fallback"`` computes that step's statistics with the exact engines
            (``engine``, default ``"auto"``: the fast engine's full pass, then vmap,
            then the loop) on the same batch, which ``observe(inputs=...)`` must
            then be given, and skips as ``"skip"`` does if they fail too. The
            training step (``p.grad``, the optimiser, the schedule) is never
            changed either way. The framework integrations default to ``"skip"``.
            :meth:`step` already falls back to the exact engines (``engine="auto"``);
            with ``"skip"`` or ``"fallback"``, a step whose statistics they all refuse
            (a BatchNorm in training mode) is skipped the same way, its ``p.grad``
            the plain backward of the batch loss with the same random draws (not
            with ``clip_norm``, which needs the per-example gradients: raised).

    A step is atomic for the model: if it raises (bad input, the model, the
    loss, a hook, the check), every ``p.grad`` (and ``x.grad``), ``last_stats``
    and ``steps`` are as they were before the step. Hooks that ran before a
    failing hook are not undone (a logger may have written its row).

    Attributes:
        steps: steps taken (an :meth:`accumulate` block counts as one).
        last_stats: the statistics most recently passed to the hooks (None before).
        last_noise: the :class:`persample.noise.NoiseScale` of the last
            ``accumulate(estimator="micro-batch")`` block that had one (None before).
        skipped: steps whose statistics were not finite (inf/NaN, such as an
            fp16 overflow that ``GradScaler`` skips), or were refused under
            ``on_refusal="skip"`` / ``"fallback"``: no statistics were
            returned and no hook was called for them.
        refused: ``(step, reason)`` of every observed (micro-)batch whose
            statistics were refused under ``on_refusal="skip"`` or ``"fallback"``
            (with ``"fallback"``, also those the exact engines then computed:
            the reason says so).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        *,
        every: int = 1,
        clip_norm: float | None = None,
        chunk_size: int | None = None,
        randomness: str = "different",
        check_every: int = 0,
        engine: str = "auto",
        var: bool = True,
        inner_products: bool = False,
        distributed: bool | None = None,
        on_refusal: str = "raise",
    ):
        _require_int("every", every, minimum=1)
        if on_refusal not in ON_REFUSAL:
            raise ValueError(f"on_refusal must be one of {ON_REFUSAL}, got {on_refusal!r}")
        _require_int("check_every", check_every, minimum=0)
        check_clip_norm(clip_norm)
        model, self._replicas = resolve_replicas(model, distributed)
        trainable_parameters(model)  # fail early on a model with nothing to train
        self.model = model
        self.loss_fn = loss_fn
        self.batch_loss, self.per_example_loss = loss_parts(loss_fn)
        self.every = every
        self.clip_norm = clip_norm
        self.check_every = check_every
        self.stats_options: dict[str, Any] = dict(
            chunk_size=chunk_size, randomness=randomness, engine=engine, var=var, inner_products=inner_products
        )
        self.steps = 0
        self.last_stats: GradStats | None = None
        self.skipped: list[int] = []
        self.last_noise = None  # the last accumulate(estimator="micro-batch") block's NoiseScale
        self.on_refusal = on_refusal
        self.refused: list[tuple[int, str]] = []
        self._warned_reasons: set[str] = set()
        self._accumulation: Accumulation | None = None
        self._hooks: OrderedDict[int, Hook] = OrderedDict()  # weak-referenceable, as RemovableHandle needs
        # FSDP2: the parameters whose weight-gradient product the last statistics step skipped (Σ_i g_i
        # from the statistics written in its place before FSDP2's reduce-scatter; docs/fsdp.md)
        self._fsdp2_skipped: frozenset[str] = frozenset()
        if self._replicas is not None and self._replicas.sharded:
            refuse_fsdp2_options(self)

    def _adopt_late_sharding(self) -> None:
        """A model sharded with ``fully_shard`` after the Tracker was built (accelerate shards the HF
        Trainer's model in place inside ``train()``): from then on, steps are FSDP2 steps, as if the
        Tracker had been built on the sharded model; FSDP1 is refused. Checked until the first step."""
        if self.steps or self._replicas is not None and self._replicas.sharded:
            return
        if sharding_of(self.model) is not None:
            self.model, self._replicas = resolve_replicas(self.model, None)
            refuse_fsdp2_options(self)

    def explain(self, inputs: Any, targets: Any = None) -> Explanation:
        """:func:`persample.explain` for this Tracker's model, per-example loss and ``randomness``: per module
        its rule or fallback, every refusal with its code, and the engine a statistics step
        (``entry_points["grad_stats"]`` under the Tracker's ``engine="auto"``) and :meth:`observe`
        (``entry_points["Tracker.observe"]``) take on this batch. The model is left as found.

        >>> import torch, persample
        >>> tracker = persample.Tracker(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss)
        >>> tracker.explain(torch.randn(4, 3), torch.randn(4, 1)).entry_points["Tracker.observe"]
        'fast'
        """
        return explain(self.model, self.per_example_loss, inputs, targets, randomness=self.stats_options["randomness"])

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: ``{"steps": …, "skipped": […]}`` (plain Python, JSON-safe).

        Save it with the model and the optimizer; after :meth:`load_state_dict`,
        ``every=k`` keeps computing statistics on the same steps (0, k, 2k, …
        of the whole run) as a run that was never interrupted. Hooks keep their
        own state (:class:`persample.loggers.Diagnostics`, :class:`persample.noise.NoiseScaleEMA`
        have ``state_dict()`` too); ``last_stats`` is not saved.

        >>> import torch, persample
        >>> t = persample.Tracker(torch.nn.Linear(2, 1), torch.nn.functional.mse_loss)
        >>> _ = t.step(torch.randn(4, 2), torch.randn(4, 1))
        >>> t.state_dict()
        {'steps': 1, 'skipped': []}
        """
        return {"steps": int(self.steps), "skipped": [int(s) for s in self.skipped]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (outside an :meth:`accumulate` block)."""
        if self._accumulation is not None:
            raise RuntimeError(
                "Tracker.load_state_dict inside an accumulate() block: load the state before "
                "the block opens (or after it closes)"
            )
        steps, skipped = state["steps"], state.get("skipped", [])
        _require_int("state['steps']", steps, minimum=0)
        self.steps = int(steps)
        self.skipped = [int(s) for s in skipped]

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

    def step(self, inputs: Any, targets: Any = None, *, scale: Any = 1.0) -> GradStats | None:
        """One training step's gradients, as ``(scale * loss_fn(model(inputs), targets)).backward()``.

        >>> import torch, persample
        >>> model = torch.nn.Linear(3, 1)
        >>> tracker = persample.Tracker(model, torch.nn.functional.mse_loss)
        >>> stats = tracker.step(torch.randn(4, 3), torch.randn(4, 1))   # instead of loss.backward()
        >>> model.weight.grad.shape, stats.norms.shape                    # p.grad written, and the statistics
        (torch.Size([1, 3]), torch.Size([4]))

        Adds Σ_i w_i g_i · ``scale`` into ``p.grad`` (see :mod:`persample.batch_loss`:
        w_i are derived from the loss and checked on statistics steps), leaves
        ``p.grad`` as None for a parameter the loss does not reach, and fills
        ``x.grad`` for inputs that require grad, as that backward would.
        ``scale=1/k`` replaces ``(loss / k).backward()`` in a gradient-accumulation
        loop, ``scale=scaler`` (a ``torch.amp.GradScaler``) replaces
        ``scaler.scale(loss).backward()`` (the scaler's current scale, initialised as
        ``scaler.scale`` does, so that ``scaler.step`` works on the first step; a bare
        ``scaler.get_scale()`` leaves a fresh scaler uninitialised);
        the statistics never include it. Under fp16 autocast the per-example work
        runs its backward unscaled, so an overflow or underflow of the scaled fp16
        backward is not reproduced: for bit-for-bit ``GradScaler`` training wrap
        ``scaler.scale(loss).backward()`` in :meth:`observe` instead.

        As with that backward, the parameters' post-accumulate-grad hooks
        (``p.register_post_accumulate_grad_hook``: optimizer-in-backward, gradient
        scaling) run once each, after ``p.grad`` has been accumulated (and, under
        ``distributed``, averaged), for the parameters the loss reaches (last
        parameters first), then those of the inputs that got ``x.grad``; inside
        :meth:`accumulate`, once per micro-batch ``step``. The engines never run
        them. And the model's buffers end as one training forward of the batch
        leaves them (spectral norm's power iteration, counters, EMAs), whatever
        the engines ran.

        Returns:
            this batch's :class:`GradStats` (of the unscaled per-example
            gradients g_i = ∇ L_i) on statistics steps; None on plain steps, and
            on a statistics step whose statistics are not finite (reported in
            :attr:`skipped`, hooks not called). Inside :meth:`accumulate`, the
            micro-batch's statistics (hooks run once, with the merged ones, when
            the block ends).
        """
        scale = _scale_value(scale, self.model)
        self._adopt_late_sharding()
        if self._replicas is not None and self._replicas.sharded:  # FSDP2: its own backward, observed
            return fsdp2_step(self, inputs, targets, scale)
        params = trainable_parameters(self.model)
        snapshot = GradSnapshot(params)
        step = self.steps
        accumulation = self._accumulation
        plan = plan_step(
            step,
            every=self.every,
            check_every=self.check_every,
            clip_norm=self.clip_norm,
            accumulation=accumulation,
            ddp_wrapper=self._replicas is not None and self._replicas.wrapper is not None,
        )
        previous = self.last_stats
        refused_before = accumulation is not None and accumulation.refused
        replicas = self._replicas if not plan.ddp_backward else None  # DDP's own backward reduces by itself
        part_added = skip_added = False
        try:
            stats = part = failure = nonfinite_rows = finite = refusal = None
            # under DDP, before any collective: a bad or empty batch on one rank raises on every rank
            agreed = None if self._replicas is None else self._replicas.agreed_batch(inputs, targets, _STEP)
            try:
                batch = agreed if agreed is not None else as_batch(inputs, targets)
                inputs_with_grad = leaf_inputs_requiring_grad(batch)
                snapshot.add_inputs(inputs_with_grad)
                if plan.per_example_work:
                    # on_refusal "skip"/"fallback" (the exact engines have already been tried): a refused step
                    # is the plain backward of the batch loss, with the random draws it would have had
                    rng = random_state() if self.on_refusal != "raise" and self.clip_norm is None else None
                    try:
                        outcome = statistics_step(self._step_config, batch, params, inputs_with_grad, plan.checking)
                    except REFUSALS as err:
                        if rng is None or isinstance(err, MeanMismatchError):
                            raise
                        set_random_state(rng)
                        update, input_grads = plain_gradient(self._step_config, batch, params, inputs_with_grad)
                        refusal = err
                    else:
                        stats, update, input_grads = outcome.stats, outcome.update, outcome.input_grads
                        nonfinite_rows, finite = outcome.nonfinite_rows, outcome.finite
                elif plan.micro and plan.with_stats:
                    update, input_grads, weights, opaque = plain_gradient(
                        self._step_config, batch, params, inputs_with_grad, weigh=True
                    )
                    part = micro_batch_part(update, weights, opaque, batch.size)
                elif plan.ddp_backward:
                    update, input_grads = {}, []
                    # DDP averages, overlapped (ddp_backward: replicas are set)
                    self._replicas.ddp_backward(batch, self.batch_loss, params, scale)  # type: ignore[union-attr]
                else:
                    update, input_grads = plain_gradient(self._step_config, batch, params, inputs_with_grad)
                accumulate_into_grads(params, update, scale=scale)
                add_input_gradients(inputs_with_grad, input_grads, scale=scale)
            except Exception as err:  # under replicas, re-raised by agree on every rank
                if replicas is None:
                    raise
                failure = err
            if replicas is not None:
                # One outcome: if this step failed on any rank, every rank raises here, before any
                # collective that the failed rank would never join; and statistics are reduced only
                # where every rank has them (a diverged step on one rank is skipped on all).
                (everyone_has_stats,) = replicas.agree(failure, "persample.Tracker.step", stats is not None)
                if not everyone_has_stats:
                    stats = None
                replicas.sync_gradients(params)
                if plan.with_stats and stats is not None:
                    stats = replicas.reduce_stats(
                        stats, self.model, self.per_example_loss, batch if self._inner_request()[0] else None
                    )
            try:
                if not plan.ddp_backward:  # (DDP's own backward has run them)
                    run_post_accumulate_grad_hooks(written_leaves(params, update, inputs_with_grad, input_grads))
                if plan.with_stats and not plan.micro:
                    if replicas is not None or finite is None:  # (the reduced statistics, or not read yet)
                        finite = stats is not None and stats.is_finite()
                    if stats is None or not finite:
                        self.skipped.append(step)
                        skip_added = True
                        if accumulation is not None:  # the block's batch has no statistics (not its other parts')
                            accumulation.refused = True
                        if refusal is not None:  # refused under on_refusal "skip" / "fallback": warned once per reason
                            self._skip_refused_step(step, refusal)
                        else:
                            _warn_skipped(
                                step,
                                len(self.skipped),
                                batch.size,
                                nonfinite_examples(stats) if stats is not None else nonfinite_rows,
                            )
                        stats = None
                    elif accumulation is not None:
                        self._add_part(stats)
                        part_added = True
                    else:
                        self._publish(stats)
            except Exception as err:  # under replicas, re-raised by agree on every rank
                if replicas is None:
                    raise
                failure = err
            if replicas is not None:  # a hook that raised on one rank undoes the step on every rank
                replicas.agree(failure, "persample.Tracker.step (hooks)")
            if plan.micro and plan.with_stats:  # (after every check: the running sums cannot be undone)
                accumulation.add_micro_batch(part)  # type: ignore[union-attr]  # micro: accumulating
                if part is None:
                    self.skipped.append(step)
        except BaseException as err:
            snapshot.restore()
            self.last_stats = previous
            if skip_added:
                self.skipped.pop()
            if part_added:
                accumulation.parts.pop()  # type: ignore[union-attr]  # a part was added: accumulating
            if accumulation is not None:
                accumulation.refused = refused_before
            if hasattr(err, "add_note"):
                err.add_note(f"(raised in persample.Tracker.step at step {step}; p.grad was restored)")
            raise
        if accumulation is None:
            self.steps += 1
        return stats if plan.with_stats else None

    @property
    def _step_config(self) -> StepConfig:
        """The model, the losses and this process's engine options, for the step planner."""
        return StepConfig(self.model, self.batch_loss, self.per_example_loss, self.clip_norm, self._local_stats_options)

    @contextlib.contextmanager
    def accumulate(
        self, reference: str | Mapping[str, Tensor] | None = None, *, estimator: str = "per-example"
    ) -> Iterator["Accumulation"]:
        """Gradient accumulation: several ``step`` calls (micro-batches) make one training step.

        ::

            with tracker.accumulate(reference="last") as acc:
                for x, y in micro_batches:
                    tracker.step(x, y, scale=1 / len(micro_batches))
            optimizer.step(); optimizer.zero_grad()
            acc.stats  # the full batch's GradStats

        All micro-batches of a statistics step compute statistics; on exit they
        are merged exactly (:meth:`GradStats.merge`) into the statistics of the
        concatenated batch, the hooks run once with them, and ``tracker.steps``
        advances by one. A micro-batch without statistics (not finite, or refused
        under ``on_refusal``) leaves the block without any (``acc.stats`` None, the
        step in :attr:`skipped`, no hook call): the others' would describe part of
        the batch only. Works the same with :meth:`observe` blocks.

        Args:
            reference: the direction r of the inner products p_i = ⟨g_i, r⟩,
                shared by every micro-batch so that the merged record keeps them
                (p_i of every example of the whole batch, ``stats.reference`` = r):

                - ``None`` (default): no shared direction. With
                  ``inner_products=True`` each micro-batch's p_i are relative
                  to its own mean ḡ_m, and the merged record has none.
                - ``"last"``: the mean ḡ of the statistics last passed to the
                  hooks (``tracker.last_stats``: the previous statistics step).
                  Before any (or after the set of trainable parameters
                  changed), the block's merged record has no inner products.
                - ``"first"``: the first micro-batch's own mean ḡ_1 (whose p_i
                  are relative to it, as with ``inner_products=True``).
                - a dict ``{name: tensor}`` over every trainable parameter.

                r is not the merged batch's own mean ḡ: see
                :func:`persample.noise.inner_product_test` for what the tests
                compute against such an r (the orthogonality test refuses it).
                A reference implies inner products, whatever ``inner_products``.
            estimator: ``"per-example"`` (default: the statistics above) or
                ``"micro-batch"``, the noise scale from the micro-batches' own
                gradients, for models whose per-example gradients are undefined
                (train-mode BatchNorm: each micro-batch has its own batch
                statistics, so its gradient is well defined). Each ``step`` is
                then a plain forward and backward (``p.grad`` exactly as
                ``loss.backward()``; ``step`` returns None), and on a statistics
                step the block ends with ``acc.noise`` (also
                ``tracker.last_noise``), a :class:`persample.noise.NoiseScale`
                with ``estimator="micro-batch"``: McCandlish et al.'s two-batch
                estimator (arXiv:1812.06162, App. A.1) over the k micro-batches,
                with G_m the gradient of micro-batch m's loss per unit weight
                (the mean loss's gradient; for ℓ_m = Σ_i w_i L_i, ∇ℓ_m / Σ_i w_i),
                b_m its size, B = Σ_m b_m, G_B = Σ_m (b_m/B) G_m, and b the
                harmonic mean of the b_m (b_m = b for equal micro-batches):

                - |G|² ≈ (B‖G_B‖² − b·mean_m‖G_m‖²)/(B − b)
                - tr Σ ≈ (mean_m‖G_m‖² − ‖G_B‖²)/(1/b − 1/B)
                - B_simple = tr Σ / |G|²  (in examples, like the per-example one)

                Both are unbiased when E‖G_m‖² = |G|² + tr Σ/b_m; with
                BatchNorm, Σ is b times the covariance of size-b micro-batch
                gradients (there is no per-example one). Feed ``acc.noise`` to a
                :class:`persample.noise.NoiseScaleEMA` and smooth over steps: one
                block's estimate is noisy (k samples of the noise, not B). Needs
                k ≥ 2 micro-batches (with one, ``acc.noise`` is None and a
                warning says why); hooks are not called (they take GradStats).
                A micro-batch whose gradient is not finite makes the block's
                ``acc.noise`` None (the step is in ``skipped``). Not with
                ``reference``, ``clip_norm``, ``check_every`` (they need
                per-example gradients), ``observe`` or ``torch.distributed``.
                The loss must be computed from the model's output (its weights
                are read there): not ``lambda out: out.loss``.
        """
        if self._accumulation is not None:
            raise RuntimeError("tracker.accumulate() blocks cannot be nested")
        if estimator not in ("per-example", "micro-batch"):
            raise ValueError(f"accumulate(estimator=...) must be 'per-example' or 'micro-batch', got {estimator!r}")
        if estimator == "micro-batch":
            refuse_with_micro_batches(
                reference=reference is not None,
                clip_norm=self.clip_norm is not None,
                check_every=self.check_every > 0,
                distributed=self._replicas is not None,
            )
        if reference is not None and not isinstance(reference, Mapping) and reference not in ("last", "first"):
            raise ValueError(
                f"accumulate(reference=...) must be None, 'last', 'first' or a dict of tensors, got {reference!r}"
            )
        acc = Accumulation(with_stats=self.wants_stats(), shared=reference is not None, estimator=estimator)
        if isinstance(reference, Mapping):
            acc.reference = prepare_reference(self.model, reference)
        elif reference == "last" and self.last_stats is not None and self.last_stats.shard is not None:
            raise ValueError(
                "accumulate(reference='last') under FSDP2: the last statistics hold only this rank's shard "
                "of the mean; pass the reference as a dict of full tensors, the same on every rank"
            )
        elif (
            reference == "last"
            and self.last_stats is not None
            and self.last_stats.mean.keys() == trainable_parameters(self.model).keys()
        ):
            acc.reference = prepare_reference(self.model, self.last_stats.mean)
        acc.first = reference == "first"
        self._accumulation = acc
        try:
            yield acc
        finally:
            self._accumulation = None
        if acc.parts and not acc.refused and len({tuple(part.mean) for part in acc.parts}) > 1:
            # parameters frozen or unfrozen between micro-batches: no statistics of the whole batch for them
            acc.refused = True
            self.skipped.append(self.steps)
            self._skip_refused_step(
                self.steps,
                ValueError(
                    "the trainable parameters changed inside the accumulate() block (requires_grad set between "
                    "its micro-batches): freeze or unfreeze parameters between optimizer steps"
                ),
            )
        if acc.parts and not acc.refused:  # a refused micro-batch: the block has no statistics of its batch
            acc.stats = GradStats.merge_all(acc.parts)
            if self._replicas is not None:  # FSDP2: the merged shards' global sums (a small all-reduce)
                acc.stats = self._replicas.after_merge(acc.stats)
            failure = None
            try:
                self._publish(acc.stats)
            except Exception as err:  # under replicas, re-raised by agree on every rank
                if self._replicas is None:
                    raise
                failure = err
            if self._replicas is not None:  # a hook that raised on one rank raises on every rank
                self._replicas.agree(failure, "persample.Tracker.accumulate (hooks)")
        if acc.estimator == "micro-batch" and acc.with_stats:
            acc.noise = micro_batch_noise(acc.micro, acc.micro_sum)
            if acc.noise is not None:
                self.last_noise = acc.noise
        self.steps += 1

    def _add_part(self, stats: GradStats) -> None:
        """A micro-batch's statistics into the open ``accumulate`` block; with ``reference="first"``,
        the first one's mean becomes the shared reference (prepared once, and kept by value)."""
        acc = self._accumulation
        assert acc is not None  # called inside an accumulate block
        if acc.first and acc.reference is None and stats.reference is not None:
            acc.reference = prepare_reference(self.model, stats.reference)
            stats = dataclasses.replace(stats, reference=acc.reference)
        acc.parts.append(stats)

    def _inner_request(self) -> tuple[bool, dict | None]:
        """(inner products against the batch's own mean?, a fixed reference r) for the next statistics:
        inside ``accumulate(reference=...)``, r once it is known (``"first"``: the first micro-batch
        computes against its own mean, which becomes r)."""
        acc = self._accumulation
        if acc is not None and acc.shared:
            if acc.reference is not None:
                return False, acc.reference
            if acc.first:
                return True, None
        return self.stats_options["inner_products"], None

    @property
    def _local_stats_options(self) -> dict:
        """The engine options for this process's batch; under DDP, inner products against the mean
        are taken after the reduction, relative to the global mean."""
        against_mean, reference = self._inner_request()
        return {**self.stats_options, "inner_products": against_mean and self._replicas is None, "reference": reference}

    @contextlib.contextmanager
    def observe(
        self,
        targets: Any = None,
        *,
        reduction: str | None = None,
        batch_size: int | None = None,
        output_module: nn.Module | None = None,
        inputs: Any = None,
        wrapper: nn.Module | None = None,
    ) -> Iterator[Observation]:
        """Drop-in mode: statistics from your own ``loss.backward()``, with no second pass.

        ::

            with tracker.observe(targets) as observed:
                loss = criterion(model(inputs), targets)
                loss.backward()            # or scaler.scale(loss / k).backward()
            observed.stats  # GradStats (None on steps without statistics)

        The statistics describe the unscaled per-example gradients g_i = ∇ L_i
        for the Tracker's per-example loss L_i (``loss_fn`` on a batch of one,
        or a :class:`persample.BatchLoss`'s ``per_example``), whatever the
        backwarded loss ℓ = Σ_i w_i L_i is: a mean, a sum, a token mean, divided
        by the accumulation steps, multiplied by a ``GradScaler``'s scale. The
        weights are read from the gradient at the model output and checked; they
        must be equal (w_i = w), and ``reduction="mean"`` (w = 1/B) or ``"sum"``
        (w = 1) additionally asserts which. The loss must be computed from the
        model's output by ``loss_fn`` (not inside the model, as ``out.loss``,
        except a Hugging Face head's own loss from the ``labels=`` of its
        keyword inputs, recomputed per example from the logits: see
        :mod:`persample.engines.fast.model_loss`; a padded token mean weighs
        the examples unequally and is refused here),
        or from the output of ``output_module``, a submodule (a Hugging Face
        model's ``get_output_embeddings()``, whose logits its own loss uses).

        A per-example loss that does not describe the backwarded loss, or a
        loss with other terms, raises :class:`persample.ObservationError`
        after the backward instead of returning wrong statistics. A backward
        whose output gradients are not finite (inf/NaN: an fp16 step that
        ``GradScaler`` skips) gives ``observed.skipped = True``, no statistics,
        and no hook call. Uses the fast engine only (there is no second pass to
        fall back on); models it cannot handle exactly raise ``NotExact``, so
        use :meth:`step` for them. ``p.grad`` is whatever your backward made it.
        Not available with ``clip_norm`` (clipping must happen before the
        reduction: use :meth:`step`).

        Limits: one forward of the model and one backward inside the block;
        ``randomness`` does not apply (the forward is yours: its dropout masks
        are what the statistics describe, as with ``step``'s default
        ``randomness="different"``); inside :meth:`accumulate`, the
        observed micro-batches are merged like ``step``'s. Rule modules called
        on inputs without a batch dim (``self.pos(torch.arange(T))``) are
        exact; where their batch dim is ambiguous (T == B, or a sequence-first
        tensor with a dim of size B) ``NotExact`` is raised, and your forward
        and backward are left as they would be without ``observe``.

        Under DDP (run your DDP model's forward and backward in the block), the
        statistics are built from this rank's own gradient, recorded before
        DDP averages ``p.grad``, and then all-reduced into those of the global
        batch; ``p.grad`` stays DDP's average. Inner products relative to the
        global mean need the inputs for a second pass: use :meth:`step`, or a
        shared reference (``accumulate(reference="last")`` or a dict).

        ``wrapper``: the module your code calls, when it wraps the Tracker's
        model and passes its output on unchanged (the DDP wrapper that a
        framework made, Lightning's strategy wrapper): DDP with
        ``find_unused_parameters`` or ``static_graph`` passes the output (and a
        loss computed inside) through its ``_DDPSink``, and the loss then reads
        those tensors. A Tracker given the DDP wrapper itself needs no ``wrapper``.

        Refusals (the Tracker's ``on_refusal``): where the statistics of the
        observed backward cannot be shown exact, the refusal is raised after
        your backward has run (``"raise"``); or the step is counted as skipped
        with a warning (``"skip"``: ``observed.skipped``, :attr:`refused`); or
        its statistics come from the exact engines on ``inputs``, the model's
        inputs of the observed forward (``"fallback"``: one more pass, which
        describes the per-example gradients of that batch, with the engines'
        own random draws if the model has random ops; ``randomness`` applies).
        An error raised by your own code in the block is always raised.
        """
        if self.clip_norm is not None:
            raise ValueError(
                "observe() cannot clip: the backward has already reduced the gradients. "
                "Use tracker.step(inputs, targets) with clip_norm"
            )
        against_mean, reference = self._inner_request()
        if self._replicas is not None and against_mean:
            raise ValueError(
                "observe() under torch.distributed cannot give inner products relative to the "
                "global mean gradient (they need a second pass over the inputs, which observe "
                "does not see): use tracker.step(inputs, targets), inner_products=False, or "
                "inside tracker.accumulate(reference='last' or a dict), a shared reference"
            )
        self._adopt_late_sharding()
        accumulating = self._accumulation is not None
        if accumulating and self._accumulation.estimator == "micro-batch":  # type: ignore[union-attr]  # accumulating
            raise ValueError(
                "observe() inside accumulate(estimator='micro-batch') is not supported: the "
                "micro-batch estimator needs each micro-batch's own gradient, which step() computes. "
                "Use tracker.step(inputs, targets, scale=1/k) in that block"
            )
        with_stats = self._accumulation.with_stats if accumulating else self.wants_stats()  # type: ignore[union-attr]  # accumulating
        if with_stats and self.on_refusal == "fallback" and inputs is None:
            raise ValueError(
                "Tracker(on_refusal='fallback') needs the model's inputs of the observed forward: "
                "tracker.observe(targets, inputs=inputs)"
            )
        if not with_stats:
            observation = Observation()
            yield observation
            if not accumulating:
                self.steps += 1
            return
        if batch_size is None:
            leaves = [t for t in tensors_in(targets) if t.dim() > 0]
            if not leaves:
                raise ValueError("observe() needs the batch size: pass targets batched on dim 0, or batch_size=")
            batch_size = int(leaves[0].shape[0])
        sharded = self._replicas is not None and self._replicas.sharded
        if sharded:  # before FSDP2's first collective: a rank without examples is refused on every rank
            agree_on_examples(self._replicas.group, None, batch_size == 0, "persample.Tracker.observe (FSDP2)")  # type: ignore[union-attr]
        gate = None  # under DDP: one agreement before DDP's reducer runs (BackwardGate; not under FSDP2, whose
        if self._replicas is not None and not sharded:  # state an aborted backward leaves behind is not reusable)
            gate = BackwardGate(self._replicas, "persample.Tracker.observe")
            if batch_size == 0:  # every rank raises EMPTY_RANK (the others when their backward starts)
                gate.open(empty=True)
        sharding = unshard_all(self.model) if sharded else None  # FSDP2: the full parameters, by name
        local = None if self._replicas is None else LocalGradients(trainable_parameters(self.model))
        if output_module is None and self._replicas is not None and self._replicas.wrapper is not None:
            # DDP passes the module's output through its _DDPSink (find_unused_parameters, static_graph):
            # the loss reads the wrapper's output, so that is the output observed
            output_module = self._replicas.wrapper
        body_ran, failure = False, None  # the block's own code (the user's forward and backward) returned
        refused_here = False  # refused here or on another rank (recorded in self.refused), not just not finite
        observation = Observation()
        try:
            with observing(
                self.model,
                self.per_example_loss,
                targets,
                batch_size=batch_size,
                reduction=reduction,
                var=self.stats_options["var"],
                inner_products=against_mean,
                reference=reference,
                output_module=output_module,
                wrapper=wrapper,
                inputs_of_model=gate is not None and output_module is self._replicas.wrapper,  # type: ignore[union-attr]
            ) as observation:
                if local is not None:  # under DDP, this rank's own baseline moves with the observation's
                    observation._on_rebase.append(functools.partial(_rebase_local, local))
                with local.recording() if local is not None else contextlib.nullcontext():
                    with gate.watching(self.model) if gate is not None else contextlib.nullcontext():
                        yield observation
                body_ran = True
                if local is not None:
                    local.show_local()  # the sum check compares this rank's gradients with its own
        except Exception as err:
            if isinstance(err, REFUSALS) and body_ran and self.on_refusal != "raise":
                observation.stats = self._refused_statistics(err, inputs, targets, local)
                refused_here = True
                observation.skipped = observation.stats is None
            else:
                if isinstance(err, NotExact) and hasattr(err, "add_note"):
                    err.add_note(
                        "(observe() has only the fast engine, which cannot be exact for this model; "
                        + (
                            "under FSDP2, tracker.step has only that engine too: train with DDP)"
                            if sharded
                            else "tracker.step(inputs, targets) falls back to the exact engines, and "
                            "Tracker(on_refusal='skip' or 'fallback') keeps training going)"
                        )
                    )
                # An error of the user's own block propagates as it would without observe; an error of
                # persample's after the block (under replicas) goes through agree, so every rank raises.
                # Under DDP the block's error goes through the gate first, if this rank's backward had not
                # started (the others agree when theirs starts); after that, through the agree below.
                if gate is not None and not gate.opened:
                    gate.open(err)  # re-raises err here
                if self._replicas is None or not body_ran and (gate is None or gate.failed):
                    raise
                failure = err
        finally:
            if local is not None:
                local.restore()
            if sharding is not None:
                restore_sharding(self.model, sharding)
        if self._replicas is not None:
            (everyone_has_stats,) = self._replicas.agree(
                failure, "persample.Tracker.observe", observation.stats is not None
            )
            if not everyone_has_stats and observation.stats is not None:  # the global batch has no statistics
                self.refused.append((self.steps, "another rank had no statistics for this step"))
                refused_here = True
                observation.skipped = True
                if accumulating:
                    self._accumulation.refused = True  # type: ignore[union-attr]  # accumulating
            # everyone_has_stats: this rank's stats are set too
            observation.stats = self._replicas.reduce_stats(observation.stats) if everyone_has_stats else None  # type: ignore[arg-type]
        failure = None
        try:
            if observation.stats is None:
                self.skipped.append(self.steps)
                if accumulating:  # a micro-batch without statistics: the block's batch has none
                    self._accumulation.refused = True  # type: ignore[union-attr]  # accumulating
                if not refused_here:  # not finite (an fp16 overflow): warned as step() warns
                    _warn_skipped(self.steps, len(self.skipped), batch_size, None)
            elif accumulating:
                self._add_part(observation.stats)
            else:
                self._publish(observation.stats)
        except Exception as err:  # under replicas, re-raised by agree on every rank
            if self._replicas is None:
                raise
            failure = err
        if self._replicas is not None:
            self._replicas.agree(failure, "persample.Tracker.observe (hooks)")
        if not accumulating:
            self.steps += 1

    def _refused_statistics(
        self, err: BaseException, inputs: Any, targets: Any, local: LocalGradients | None
    ) -> GradStats | None:
        """``on_refusal`` "skip" or "fallback" for an observed step whose statistics ``err`` refused: the
        exact engines' statistics of ``inputs`` ("fallback"), or None after a warning (once per reason).
        ``p.grad`` is left as the user's backward made it (the engines do not touch it; checked)."""
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        stats = None
        if local is not None:
            local.restore()  # DDP's averaged p.grad back (show_local may have run)
        if self.on_refusal == "fallback":
            params = trainable_parameters(self.model)
            grads = {name: p.grad for name, p in params.items()}
            try:
                stats = compute_stats(
                    self.model, self.per_example_loss, as_batch(inputs, targets), **self._local_stats_options
                )
                reason = f"{reason} (statistics from the exact engines instead)"
            except Exception as second:  # noqa: BLE001 - a diagnostic never stops training (reason warned)
                reason = (
                    f"{reason}; the exact engines failed too: {type(second).__name__}: "
                    f"{str(second).splitlines()[0] if str(second) else ''}"
                )
            finally:
                for name, p in params.items():
                    p.grad = grads[name]  # the engines never write p.grad; keep it so whatever happened
        self.refused.append((self.steps, reason))
        if stats is None:
            if self._accumulation is not None:
                self._accumulation.refused = True
        if reason not in self._warned_reasons:
            self._warned_reasons.add(reason)
            what = (
                "computed by the exact engines"
                if stats is not None
                else "skipped (training goes on; p.grad is the backward's own)"
            )
            warnings.warn(
                f"persample: the statistics of step {self.steps} were {what}: {reason}",
                SkippedStatisticsWarning,
                stacklevel=4,
            )
        return stats

    def _skip_refused_step(self, step: int, err: BaseException) -> None:
        """``step`` under ``on_refusal`` "skip" / "fallback": every exact engine refused its statistics
        (``err``); its ``p.grad`` is the plain backward's. Recorded in :attr:`refused`, warned once per reason."""
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        self.refused.append((step, reason))
        if reason not in self._warned_reasons:
            self._warned_reasons.add(reason)
            warnings.warn(
                f"persample: the statistics of step {step} were skipped (training goes on; p.grad is "
                f"loss.backward()'s): {reason}",
                SkippedStatisticsWarning,
                stacklevel=3,
            )

    def _publish(self, stats: GradStats) -> None:
        """Keep ``stats`` as ``last_stats`` and call the hooks with it, in registration order.
        If a hook raises, ``last_stats`` goes back to what it was (earlier hooks have run)."""
        previous, self.last_stats = self.last_stats, stats
        try:
            for hook in list(self._hooks.values()):
                hook(self, stats)
        except BaseException:
            self.last_stats = previous
            raise

    def __repr__(self) -> str:
        return (
            f"Tracker({type(self.model).__name__}, every={self.every}, clip_norm={self.clip_norm}, "
            f"check_every={self.check_every}, steps={self.steps}, hooks={len(self._hooks)})"
        )


_STEP = "persample.Tracker.step"


def _rebase_local(local: LocalGradients) -> None:
    """``p.grad`` as it is now is the baseline of this rank's own gradient (Observation.rebase_grads)."""
    local.before = {n: None if p.grad is None else p.grad.detach().clone() for n, p in local.params.items()}


def _warn_skipped(step: int, count: int, batch_size: int, examples: list[int] | None) -> None:
    """One warning for the first statistics step skipped as not finite, then at 10, 100, … skipped steps."""
    if count != 1 and not (count >= 10 and math.log10(count).is_integer()):
        return
    import warnings

    from ._warn import user_stacklevel

    if examples:
        shown = ", ".join(map(str, examples[:10])) + (", …" if len(examples) > 10 else "")
        which = (
            f"example{'s' if len(examples) > 1 else ''} {shown} (0-based) of this batch of {batch_size} "
            f"{'have' if len(examples) > 1 else 'has'} a non-finite output, loss or gradient (a corrupt "
            "sample, or a diverged or fp16-overflowing step?)"
        )
    else:
        which = "the loss or the gradients are not finite (a diverged or fp16-overflowing step?)"
    warnings.warn(
        f"persample: step {step}'s statistics are not finite: {which}. That step has no statistics and "
        f"calls no hook (p.grad is what loss.backward() gives); {count} step{'s' if count > 1 else ''} "
        "skipped so far (tracker.skipped; warned again at 10, 100, … skipped steps).",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def _scale_value(scale: Any, model: nn.Module) -> float:
    """``step``'s ``scale`` as a number: a finite number as given, or a ``torch.amp.GradScaler``'s current
    scale (1.0 when disabled), initialised on the model's device as ``scaler.scale(loss)`` initialises it."""
    import torch

    if isinstance(scale, torch.amp.GradScaler):
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return float(scale.scale(torch.ones((), device=device)))
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(
            f"scale must be a finite number or a torch.amp.GradScaler, got {scale!r} (with a GradScaler, pass "
            "scale=scaler: scaler.get_scale() does not initialise a fresh scaler)"
        )
    return float(scale)


def _require_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
