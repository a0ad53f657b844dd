"""The statistics-step planner of :class:`persample.Tracker`: what one ``step`` computes, and how.

- :func:`plan_step` decides from the schedule alone (``every``, ``check_every``, ``clip_norm``, an open
  ``accumulate`` block, DDP) whether a step runs the per-example engines, a plain backward of the
  batch loss, or DDP's own backward: a :class:`StepPlan`.
- :func:`statistics_step` runs a statistics step: the :class:`~persample.GradStats` of the batch and
  the ``p.grad`` increment Σ_i w_i g_i, taken from the statistics where they determine it (equal
  weights w_i = w: (w·B)·ḡ), else from one plain backward of the batch loss (:func:`plain_gradient`).
- :func:`check_against_autograd` is ``check_every``'s check: Σ_i w_i g_i from the independent engines
  against autograd's gradient of the batch loss.

Nothing here writes ``p.grad``: the increments go to :mod:`persample._grad_writer`. The statistics are
of the unscaled per-example gradients g_i = ∇ L_i; ``scale`` never enters them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._batch import Batch, flat_leaves, tensors_in
from ._host_reads import HostChecks, one_host_read
from ._model import (
    buffer_state,
    forward_hook_if_possible,
    random_state,
    restore_buffer_state,
    set_random_state,
)
from ._torch_compat import inert_hook, is_functorch_wrapped, tensor_gradient_hooks
from .api import compute_stats
from .batch_loss import (
    BatchLossMismatch,
    gradient_multiple,
    NonFiniteLoss,
    OpaqueLoss,
    common_weight,
    reachable_leaves,
    weights_at_output,
)
from .check import check_batch_mean
from .contract import PRECONDITIONS
from .engines._autograd import gradients
from .engines.fast.recurrent import has_recurrent_layers, output_checks_read_with_the_step
from .stats import GradStats


@dataclass(frozen=True)
class StepPlan:
    """What one ``Tracker.step`` does, decided before it runs.

    >>> plan_step(3, every=2, check_every=0, clip_norm=None, accumulation=None, ddp_wrapper=False)
    StepPlan(with_stats=False, checking=False, micro=False, per_example_work=False, ddp_backward=False)
    """

    with_stats: bool  # the step hands statistics to the hooks (or to the open accumulate block)
    checking: bool  # check_every: the independent engines' weighted mean against autograd's gradient
    micro: bool  # inside accumulate(estimator="micro-batch"): a plain backward and its G_m
    per_example_work: bool  # the per-example engines run (statistics, the check, or clipping)
    ddp_backward: bool  # a plain step under DDP: DDP's own backward averages p.grad, overlapped


def plan_step(
    step: int,
    *,
    every: int,
    check_every: int,
    clip_norm: float | None,
    accumulation: Any,
    ddp_wrapper: bool,
) -> StepPlan:
    """The :class:`StepPlan` of step ``step`` (``accumulation``: the open ``accumulate`` block, or None;
    ``ddp_wrapper``: the Tracker's model is a DDP wrapper)."""
    with_stats = accumulation.with_stats if accumulation is not None else step % every == 0
    checking = check_every > 0 and step % check_every == 0
    micro = accumulation is not None and accumulation.estimator == "micro-batch"
    per_example_work = not micro and (with_stats or checking or clip_norm is not None)
    return StepPlan(
        with_stats=with_stats,
        checking=checking,
        micro=micro,
        per_example_work=per_example_work,
        ddp_backward=not per_example_work and ddp_wrapper,
    )


@dataclass(frozen=True)
class StepConfig:
    """The Tracker's model and losses, and the engine options for this process's batch."""

    model: nn.Module
    batch_loss: Callable[..., Tensor]
    per_example_loss: Callable[..., Tensor]
    clip_norm: float | None
    stats_options: dict  # compute_stats options: engine, var, chunk_size, randomness, inner products


@dataclass
class StepOutcome:
    """A statistics step's result: ``stats`` (None when not finite), the ``p.grad`` increment
    Σ_i w_i g_i by parameter name (unreached parameters left out), the inputs' gradients, and, on a
    step that is not finite, the examples at fault when known."""

    stats: GradStats | None
    update: dict[str, Tensor]
    input_grads: list
    nonfinite_rows: list[int] | None = None
    finite: bool | None = None  # stats.is_finite(), read with the step's other host reads (None: not read)


def statistics_step(
    config: StepConfig,
    batch: Batch,
    params: dict[str, nn.Parameter],
    inputs_with_grad: list[Tensor],
    checking: bool,
) -> StepOutcome:
    """The statistics of one step and its ``p.grad`` increment Σ_i w_i g_i.

    The weights w_i are derived at the model output of the engine's own forward (the fast
    engine) when there is one. When they are equal and no input needs a gradient, the
    increment is (w·B)·ḡ for the parameters the loss reaches; otherwise (unequal weights,
    inputs that require grad, the vmap engine, a loss computed inside the model) it comes
    from one more forward and backward of the batch loss, as ``loss.backward()`` computes it.

    Buffers end as one training forward of the batch leaves them: the engines leave no trace
    (``compute_stats`` restores them), and then either that one more forward updates them, or,
    when p.grad comes from the statistics, the updates of the first forward of the batch (the
    fast engine's, also when it then refused) are put back.
    """

    def attempt() -> StepOutcome:
        with one_host_read() as step_reads:
            finite: dict[int, bool] = {}  # id(statistics) -> their finiteness, once read
            outcome = _statistics_step(config, batch, params, inputs_with_grad, checking, step_reads, finite)
        if outcome.stats is not None:
            outcome.finite = finite.get(id(outcome.stats))  # (still alive: ids cannot have been reused)
        return outcome

    if not has_recurrent_layers(config.model):
        return attempt()
    # A recurrent layer's check of its output is read with the step's other host reads; where it fails,
    # the step runs again from the buffers and random generators as found (only then)
    buffers, generators = buffer_state(config.model), random_state()

    def reset() -> None:
        restore_buffer_state(buffers)
        set_random_state(generators)

    return output_checks_read_with_the_step(attempt, reset)


def _finite_later(stats: GradStats, step_reads: HostChecks, finite: dict[int, bool]) -> None:
    """``finite[id(stats)]`` gets ``stats.is_finite()`` when ``step_reads`` are read (nothing where it is
    not known unread: the Tracker then asks the statistics)."""
    flag = stats.finite_flag()
    if flag is not None:
        step_reads.defer(flag, lambda read: finite.__setitem__(id(stats), bool(read[0])))


def _statistics_step(
    config: StepConfig,
    batch: Batch,
    params: dict[str, nn.Parameter],
    inputs_with_grad: list[Tensor],
    checking: bool,
    step_reads: HostChecks,
    finite: dict[int, bool],
) -> StepOutcome:
    """:func:`statistics_step` inside its :func:`one_host_read`: the fast engine's cancellation flags,
    the statistics' finiteness and the checks of the weights at the output are read in one copy."""
    model, per_example, clip_norm = config.model, config.per_example_loss, config.clip_norm
    first_forward: list = []  # the first forward of the batch: (its output, the buffers as it left them)
    # (None on a TorchScript model, which takes no hooks: p.grad then comes from one more backward)
    handle = forward_hook_if_possible(model, _first_batch_forward(first_forward, batch.size))
    engine_output: list = []  # the fast engine's: its losses and their gradient at the output (AtOutput)
    used: list = []  # the engine whose statistics these are
    try:
        stats = compute_stats(
            model,
            per_example,
            batch,
            clip_norm=clip_norm,
            fork_rng=False,
            engine_output=engine_output,
            engine_output_form=config.batch_loss is per_example,
            engine_used=used,
            **config.stats_options,
        )
    finally:
        if handle is not None:
            handle.remove()
    _finite_later(stats, step_reads, finite)  # read with the weights' checks below
    factor = weighted = None
    if first_forward:
        output, buffers_after_forward = first_forward[0]
        # where the engine's forward gave this output, its backward gave L_i and their gradient there
        at_output = engine_output[2] if len(engine_output) == 3 and engine_output[0] is output else None
        try:
            weights, used_leaves = weights_at_output(
                config.batch_loss,
                per_example,
                output,
                batch.targets,
                batch.size,
                at_output=at_output,
                **_model_inputs(model, batch),
            )
            factor = common_weight(weights, rtol=1e-5)
            if factor is None and clip_norm is None and used[-1:] == ["fast"]:  # weights that differ (padding)
                weighted = getattr(at_output, "weighted_sums", None)  # Σ_i w_i g_i from the engine's pieces
        except NonFiniteLoss:  # a diverged step: p.grad as the loop's backward makes it, no statistics
            update, input_grads = plain_gradient(config, batch, params, inputs_with_grad)
            return StepOutcome(None, update, input_grads, _nonfinite_output_rows(output, batch.size))
        except OpaqueLoss as refusal:
            if refusal.per_example:  # the per-example loss is not a function of example i's output alone
                options = {**config.stats_options, "engine": "independent"}
                stats = compute_stats(model, per_example, batch, clip_norm=clip_norm, fork_rng=False, **options)
                _finite_later(stats, step_reads, finite)
        leaves = flat_leaves(output)
        reached = None if factor is None and weighted is None else reachable_leaves([leaves[i] for i in used_leaves])
        # None: checkpointing hides what is reached. A parameter's gradient hook: the statistics hold H(g_i) per
        # example (the fast engine applies it as the loop does), loss.backward() gives H of the batch's gradient.
        # vmap and the loop compute each example alone: where the fast engine refused because the forward
        # couples the examples, or before its audit of the forward could tell, their mean may not be the batch's
        # gradient, which loss.backward() gives (clipping combines the clipped g_i by definition)
        coupled = clip_norm is None and any(_may_couple(u[1]) for u in used if isinstance(u, tuple))
        if reached is not None and not coupled and not inputs_with_grad and not _any_gradient_hook(params):
            if checking:
                check_against_autograd(config, batch, weights)
            if weighted is not None:  # the weights differ: p.grad = Σ_i w_i g_i, a product per layer
                sums = weighted(weights)
                update = {name: sums[name] for name, p in params.items() if id(p) in reached}
            else:
                base = stats.mean if clip_norm is None else stats.clipped_mean
                # factor is set (reached is), and base is clipped_mean when clip_norm is. A mean loss gives
                # factor · B = 1: x · 1.0 is x, so no copy here (the writer copies: p.grad never aliases the stats)
                multiple = factor * batch.size  # type: ignore[operator]
                update = {
                    name: base[name] if multiple == 1.0 else base[name] * multiple  # type: ignore[index]
                    for name, p in params.items()
                    if id(p) in reached
                }
            restore_buffer_state(buffers_after_forward)  # that forward is this step's forward
            return StepOutcome(stats, update, [])
    update, input_grads, weights, opaque = plain_gradient(config, batch, params, inputs_with_grad, weigh=True)
    if weights is not None and not bool(torch.isfinite(weights).all()):  # a diverged step: no statistics
        return StepOutcome(None, update, input_grads, nonfinite_examples(stats) or None)
    factor = None if weights is None else common_weight(weights, rtol=1e-5)
    if clip_norm is not None and factor is None:
        raise BatchLossMismatch(
            "clip_norm needs a batch loss that weighs every example equally (w_i = w), so that the clipped "
            "gradients can be combined as the loss combines them; this loss's weights differ "
            + ("(it is computed inside the model)" if opaque else "(class weights?)"),
            code="CLIP_NEEDS_EQUAL_WEIGHTS",
        )
    if opaque:  # the loss hides its weights: p.grad must be a multiple of the mean of the g_i
        factor = _require_multiple(update, stats.mean) / batch.size
        weights = torch.full((batch.size,), factor, dtype=torch.float64)
    if clip_norm is not None:  # inputs that require grad: p.grad from the clipped gradients
        # clip_norm: clipped_mean is computed, and factor is set (refused above otherwise)
        update = {name: stats.clipped_mean[name] * (factor * batch.size) for name in update}  # type: ignore[index, operator]
    if checking:
        check_against_autograd(config, batch, weights)
    return StepOutcome(stats, update, input_grads)


#: Refusals of the fast engine that say the batch's forward does not compute each example as it computes it
#: alone (it mixes rows, depends on positions or the batch size, or a module's batch gradient is not the sum of
#: its examples' gradients): then Σ_i w_i g_i of the examples alone is not the gradient loss.backward() gives.
COUPLING_CODES = frozenset(
    {
        "BATCH_MIXED",
        "EXAMPLE_DIFFERS_ALONE",
        "FALLBACK_SUM_MISMATCH",
        "FALLBACK_NOT_BATCHED",
        "TOKEN_ROWS_DIFFER",
        "GRADIENT_REWRITTEN",
        "CUSTOM_RULE_SUM_MISMATCH",
        "BUFFERS_CHANGED",
        "LOSS_NOT_PER_EXAMPLE",
    }
)


def _may_couple(code: str | None) -> bool:
    """Whether a refusal of the fast engine leaves open that the batch's forward couples the examples: a
    coupling code, or a refusal in the forward, before the graph audit of the backward could tell (a
    substituted parameter, an ambiguous batch dim; setup-stage refusals run no forward, so p.grad comes from
    the backward anyway). ``RANDOM_SAME_BATCHED`` aside: a forward that draws has no one batch gradient, and
    p.grad follows the engine's draws (docs/concepts.md). Loss-stage refusals (a Hugging Face model's own
    loss) keep (w·B)·mean, to spare those models a second backward per step: a forward that couples the
    examples behind one is the residual (docs/redteam.md)."""
    if code in COUPLING_CODES:
        return True
    pre = PRECONDITIONS.get(code or "")
    return pre is None or (pre.stage in ("setup", "forward") and code != "RANDOM_SAME_BATCHED")


def check_against_autograd(config: StepConfig, batch: Batch, weights: Tensor) -> None:
    """check_every: Σ_i w_i g_i, with g_i from the independent engines (vmap, else the loop: each
    example in isolation, never the fast engine being checked) and w_i the batch loss's weights
    (derived and checked at the model output), against autograd's gradient of the batch loss.

    Equal weights w: w·B times the engines' mean. Unequal ones: the engines' mean of the weighted
    per-example losses w_i L_i (the weights ride along as targets), times B.
    """
    options: dict[str, Any] = dict(
        engine="independent",
        var=False,
        chunk_size=config.stats_options["chunk_size"],
        randomness=config.stats_options["randomness"],
    )
    factor = common_weight(weights, rtol=1e-5)
    if factor is not None:
        independent = compute_stats(config.model, config.per_example_loss, batch, **options)
        scale = factor * batch.size
    else:
        weighted, weighted_batch = _weighted_examples(config.per_example_loss, batch, weights)
        independent = compute_stats(config.model, weighted, weighted_batch, **options)
        scale = float(batch.size)
    scaled = dataclasses.replace(independent, mean={k: v * scale for k, v in independent.mean.items()})
    check_batch_mean(config.model, config.batch_loss, batch, scaled)


def plain_gradient(
    config: StepConfig,
    batch: Batch,
    params: dict[str, nn.Parameter],
    inputs_with_grad: list[Tensor],
    weigh: bool = False,
):
    """∇ of the batch loss for the parameters (None-free: unreached ones are left out) and for the
    inputs that require grad, as ``loss.backward()`` would compute them (not yet accumulated).

    With ``weigh``, also the loss's weights w_i (``[B]`` float64; None when the loss hides them,
    NaN when it is not finite), derived and checked at this forward's output, and whether the
    loss hides its weights (computed inside the model): returns (update, input grads, w, opaque).
    """
    batch_loss = config.batch_loss
    with torch.enable_grad():
        output = batch.forward(config.model)
        loss = batch_loss(output) if batch.targets is None else batch_loss(output, batch.targets)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn on the whole batch must return a scalar (the batch loss)")
        weights, opaque = None, False
        if weigh:
            try:
                weights, _ = weights_at_output(
                    batch_loss,
                    config.per_example_loss,
                    output,
                    batch.targets,
                    batch.size,
                    **_model_inputs(config.model, batch),
                )
            except OpaqueLoss:
                opaque = True
            except NonFiniteLoss:
                weights = torch.full((batch.size,), math.nan, dtype=torch.float64)
        grads = gradients(loss, [*params.values(), *inputs_with_grad])
    update = {name: g for name, g in zip(params, grads) if g is not None}
    if weigh:
        return update, list(grads[len(params) :]), weights, opaque
    return update, list(grads[len(params) :])


def _model_inputs(model: nn.Module, batch: Batch) -> dict:
    """weights_at_output's view of the model and its keyword inputs (a Hugging Face model's own loss)."""
    return {"model": model, "inputs": {**batch.options, **batch.kwargs}}


def nonfinite_examples(stats: GradStats) -> list[int]:
    """The examples whose loss or gradient norm is not finite."""
    bad = ~torch.isfinite(stats.losses.detach()) | ~torch.isfinite(stats.sq_norms.detach())
    return bad.nonzero().flatten().tolist()


def _nonfinite_output_rows(output: Any, batch_size: int) -> list[int] | None:
    """The examples whose rows of the model output are not finite (None when no output leaf is batched)."""
    bad, found = None, False
    for t in tensors_in(output):
        if t.is_floating_point() and t.dim() > 0 and t.shape[0] == batch_size:
            rows = ~torch.isfinite(t.detach().reshape(batch_size, -1)).all(1)
            bad = rows if bad is None else bad | rows
            found = True
    return bad.nonzero().flatten().tolist() if found else None  # type: ignore[union-attr]  # found: bad is set


def _weighted_examples(per_example_loss: Callable[..., Tensor], batch: Batch, weights: Tensor):
    """(loss, batch) whose per-example loss is w_i L_i: the weights travel as (part of) the targets,
    so every engine hands example i its own w_i."""
    from ._batch import device_of

    weights = weights.to(device_of(batch))
    has_targets = batch.targets is not None

    def weighted(output, targets):
        w, target = targets if has_targets else (targets, None)
        loss = per_example_loss(output) if target is None else per_example_loss(output, target)
        return loss * w.reshape(()).to(loss.dtype)

    targets = (weights, batch.targets) if has_targets else weights
    return weighted, Batch(batch.args, batch.kwargs, targets, batch.size, batch.options)


def _any_gradient_hook(params: dict[str, nn.Parameter]) -> bool:
    """Whether one of the step's trainable parameters has a tensor hook (``p.register_hook``, read now: one
    the forward registered counts). ``hooked_parameters(model)`` without its walk of every module: the step
    writes p.grad of these parameters only, and a hook on any other is never called by their backward."""
    return any(tensor_gradient_hooks(p) for p in params.values())


def _first_batch_forward(store: list, batch_size: int):
    """A forward hook keeping the model's first output on the real batch (not inside vmap), with the
    buffers as that forward left them: ``store`` gets ``(output, buffer_state(model))``."""

    def hook(module, args, output):
        if store:
            return
        tensors = tensors_in(output)
        if any(is_functorch_wrapped(t) for t in tensors):
            return
        if any(t.dim() > 0 and t.shape[0] == batch_size for t in tensors):
            store.append((output, buffer_state(module)))

    # it returns None and changes nothing: the fast engine's plan and rules do not count it (a root with
    # parameters of its own, hooked anew each step, keeps its plan and its rule)
    return inert_hook(hook)


def _require_multiple(grad: dict[str, Tensor], mean: dict[str, Tensor]) -> float:
    """The loss hides its weights (computed inside the model): p.grad must be c·ḡ for one c
    (:func:`persample.batch_loss.gradient_multiple`); returns c."""
    c, difference = gradient_multiple(grad, mean)
    # Unequal weights differ at O(1); models that compute parts in float32 (Qwen2's and Llama's RMSNorm)
    # differ from a float64 multiple by ~1e-7 at most.
    rtol = 1e-5 if next(iter(mean.values())).dtype == torch.float64 else 1e-3
    if difference > rtol:
        raise BatchLossMismatch(
            "the gradient of the batch loss is not a multiple of the mean per-example gradient (relative "
            f"difference {difference:.2e}): the examples weigh differently in "
            "the batch loss, and since the loss is computed inside the model (not from its output) persample "
            "cannot read the weights. Compute the loss from the model's output in loss_fn, e.g. "
            "persample.causal_lm_loss() for token losses, instead of `lambda out: out.loss`",
            code="OPAQUE_LOSS_NOT_MEAN",
        )
    return c
