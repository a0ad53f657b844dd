"""The ``fast`` engine: GradStats from one forward + backward, without B × P gradients.

1. One ordinary forward of the batch; per-example losses L_i come from
   ``vmap(loss_fn)`` over the model's output (only the loss is vmapped).
2. One ``torch.autograd.grad`` of (1/B) Σ_i L_i gives ḡ for every parameter
   and the gradient of every unit output :mod:`.capture` recorded (with its inputs)
   (those are of the mean: pieces carry the factor B as their ``scale`` and
   apply it to reduced results, never to activations or gradient chunks).
   Layers whose reductions form their g_i anyway (:func:`derived_parameters`)
   are asked for their output gradients only: their ḡ is (1/B) Σ_i g_i, from
   the same formation as their norms and M2 (``Piece.moments``). Recurrent
   layers whose closed form gives their input gradient too are not gone
   through by autograd at all (:mod:`.cuts`: the backward is split there).
3. Each parameter gets a :mod:`piece <.pieces>` from a closed-form layer rule
   (:mod:`.rules`); modules without a rule get their per-example gradients from
   ``torch.func`` — ``vmap`` over the ``vjp`` of that module alone, fed its
   captured inputs and output gradients — checked against autograd's sum.
4. The pieces give norms, second moments (the unbiased variance's
   M2 = Σ_i (g_i − ḡ)², one-pass only where it cannot cancel), inner products
   ⟨g_i, ḡ⟩ and clipped sums.

Whenever this cannot be exact (a parameter used outside the modules that own
it, an activation whose batch dim is not dim 0 or is ambiguous, a fallback
that disagrees with autograd, random draws under ``randomness="same"``, hooks
it cannot apply per example, a loss that is not per example, a module input or
parameter changed in place after the module's call, a re-entrant checkpoint whose
recomputation it cannot follow, examples 0 or B − 1 whose loss or gradient alone differs
from the batch's reading: :mod:`.alone`, once per plan and input signature) the engine
raises :class:`~persample.errors.NotExact`,
and ``engine="auto"`` moves on to the vmap engine, then the per-example loop.

Re-entrant activation checkpointing (``checkpoint(..., use_reentrant=True)``) runs
its block under no_grad in the forward and again inside the backward, where it
refuses ``torch.autograd.grad``. The engine then follows the recomputation as
``observe`` does (:func:`_backward_through_recomputations`): one ``backward()``
into emptied ``.grad`` slots, the block's calls recorded as they are recomputed,
and the graph audited after the backward, recomputed blocks included.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..._batch import Batch, flat_leaves
from ..._host_reads import HostChecks, open_checks
from ..._model import (
    RandomCalls,
    RandomCallStop,
    autocast_as,
    buffer_state,
    hooked_parameters,
    detached_buffers,
    first_random_module,
    randomness_error,
    translate_vmap_error,
)
from ..._torch_compat import is_batched_tensor, tensor_gradient_hook_functions
from ...contract import Finding
from ...errors import NotExact
from ...stats import GradStats, clip_factors
from .._functional import ParameterReads, vmap_friendly_modules
from .._autograd import dense_gradient, fresh_grad_slots, graph_leaves, is_reentrant_checkpoint_error
from ..vmap import example_loss, refuse_module_backward_hooks
from .audit import REENTRANT_CHECKPOINT, audit_graph, rows_check
from .capture import capturing
from .in_place import modified_in_place
from .alone import check_alone, spot_check_off
from .alone import signature as alone_signature
from .plan import checked_alone, model_plan, remember_alone, widened_refusal
from .units import Call, Unit, add_gradient
from .watchers import RandomCallStopped
from .cuts import Cut, plan_cuts
from .cuts import backward as cut_backward
from .losses import closed_form_losses, example_weights, standard_losses, traced_standard_loss
from .model_loss import ModelLoss, model_losses
from .pieces import DensePiece, Piece, as_matrix, combine_pieces
from .places import batch_first
from .recurrent import (
    raise_if_outputs_not_reproduced,
    recurrent_closed_form,
    recurrent_mode,
    recurrent_pieces,
)
from .rules import Layout, LayoutError

__all__ = ["fast_grad_stats", "fast_pieces", "FastPieces", "NotExact", "per_example_losses"]


def fast_grad_stats(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batch: Batch,
    *,
    randomness: str = "error",
    var: bool = True,
    inner_products: bool = False,
    clip_norm: float | None = None,
    reference: dict[str, Tensor] | None = None,
    keep_output: list | None = None,
    closed_form_at_output: bool = False,
    form_suffices: bool = False,
) -> GradStats:
    """Exact :class:`GradStats` from one forward + backward, or :class:`NotExact`.

    ``keep_output``: a list that gets the model's output on the batch once the forward has run (also
    when the engine then refuses), for checks at the output that need no forward of their own; then
    whether ``loss_fn`` turned out to be a standard loss with a closed form (:mod:`.losses`), which
    is a weighted sum of per-example losses by its form; then, once the backward has run, an
    :class:`AtOutput` (the per-example losses and their mean's gradient at the output, which the
    check at the output would otherwise compute again) or None; for a standard loss only with
    ``closed_form_at_output`` and ``form_suffices`` (see :func:`fast_pieces`).

    Peak extra memory is O(P + activations): the captured activations and
    output gradients, plus chunks of at most ``pieces.CHUNK_ELEMENTS`` gradient
    numbers where a piece has to be materialised (var on sequences, tied weights
    across layer kinds).
    """
    try:
        found = fast_pieces(
            model,
            loss_fn,
            batch,
            randomness=randomness,
            var=var,
            keep_output=keep_output,
            closed_form_at_output=closed_form_at_output,
            form_suffices=form_suffices,
        )
    except BaseException:
        raise_if_outputs_not_reproduced()  # (a refusal caused by states that were never a recurrent layer's)
        raise
    pieces, means, params, derived = found.pieces, found.means, found.params, found.derived
    with autocast_as(None):  # statistics in float32 or better, whatever the forward's autocast
        moments = {
            name: _derived_moments(pieces[name], var, params[name], summed=id(params[name]) in found.cut_params)
            for name in derived
        }
        means.update({name: mean for name, (mean, _, _) in moments.items()})
        means = {name: means[name] for name in params}  # named_parameters() order
        second = {name: (m2, suspect) for name, (_, m2, suspect) in moments.items()} if var else None
        stats = reduce_pieces(
            pieces,
            means,
            found.losses,
            var=var,
            inner_products=inner_products,
            clip_norm=clip_norm,
            reference=reference,
            second_moments=second,
        )
    at_output = keep_output[2] if keep_output is not None and len(keep_output) == 3 else None
    if at_output is not None and (at_output.form is not None or at_output.own is not None):
        at_output.weighted_sums = functools.partial(weighted_sums, pieces, params)
    return stats


def weighted_sums(pieces: dict[str, Piece], params: dict[str, nn.Parameter], weights: Tensor) -> dict[str, Tensor]:
    """Σ_i w_i g_i of every piece, for weights w ``[B]`` (float64, on any device): the gradient of a batch
    loss ℓ = Σ_i w_i L_i, at the cost of one weight-gradient product per layer (``Piece.weighted_sum``), in
    float32 or better."""
    with autocast_as(None), torch.no_grad():
        return {
            name: piece.weighted_sum(weights.to(device=params[name].device, dtype=torch.float64))
            for name, piece in pieces.items()
        }


@dataclass
class AtOutput:
    """What the fast engine's own backward already knows at the model's output, for the batch-loss check
    (:func:`persample.batch_loss.weights_at_output`): ``losses``, the per-example losses L_i ``[B]``
    (detached, at least float32), and ``mean_grads``, ∇_o (1/B) Σ_i L_i at each floating leaf o of the
    output's pytree (its index in ``tree_flatten(output)``; None where L_i does not reach it), each L_i
    being ``loss_fn`` on example i's output alone (vmapped, or the closed form of a standard loss, which the
    check's own :func:`per_example_losses` takes too). Made only where the output has one floating
    leaf, batched, reached by the graph and in float32 or float64, so that these are exactly what the check
    computes on a detached copy of the output, up to the factor 1/B (:func:`_loss_leaves_at_output`).

    ``form``: for a standard loss (:mod:`.losses`), where the caller asked (``closed_form_at_output``),
    (the output tensor the loss reads, D ``[B]``): the batch loss is ℓ = Σ_i (D_i / Σ_j D_j) L_i by its
    form (:func:`.losses.example_weights`), so the check needs neither ℓ's backward nor ``mean_grads``
    (then empty where the output has several floating leaves). ``own`` the same for a Hugging Face model's own
    ``out.loss`` (its weights, checked)."""

    losses: Tensor
    mean_grads: dict[int, Tensor | None]
    form: tuple[Tensor, Tensor] | None = None
    #: a Hugging Face model's own loss, as :func:`.model_loss.model_losses` found it at this output
    own: ModelLoss | None = None
    #: where ``form`` or ``own`` is set, once the statistics are reduced: weights ↦ Σ_i w_i g_i
    #: (:func:`weighted_sums` of the call's pieces), for a batch loss whose weights differ between examples
    weighted_sums: Callable[[Tensor], dict[str, Tensor]] | None = None


def _loss_leaves_at_output(output: Any, batch_size: int) -> list[tuple[int, Tensor]] | None:
    """(index, leaf) of the floating leaf of the output's pytree, where :class:`AtOutput` can be made for it
    (batched, in the graph, float32 or float64), else None. Only for an output with ONE floating leaf: the
    backward gives the total derivative at a tensor of the graph, and where one output leaf feeds another
    (an encoder's last hidden state, read by the decoder that makes the logits) that is not the derivative
    of the loss through that leaf alone, which the check computes on a detached copy of the output."""
    leaves, _, batched = output_leaves(output, batch_size)
    floating = [(i, t) for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.is_floating_point()]
    if len(floating) != 1 or any(
        not batched[i] or not t.requires_grad or t.dtype not in (torch.float32, torch.float64) for i, t in floating
    ):
        return None
    return floating


@dataclass
class FastPieces:
    """What one forward + backward of the fast engine leaves: a piece per trainable parameter, the
    means autograd computed (every parameter but the ``derived`` ones, whose mean is Σ_i g_i of their
    piece), the per-example losses ``[B]`` and the ids of parameters of cut recurrent layers."""

    pieces: dict[str, Piece]
    means: dict[str, Tensor]
    losses: Tensor
    params: dict[str, nn.Parameter]
    derived: set[str]
    cut_params: set[int]


def fast_pieces(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batch: Batch,
    *,
    randomness: str = "error",
    var: bool = True,
    keep_output: list | None = None,
    form_all: bool = False,
    closed_form_at_output: bool = False,
    form_suffices: bool = False,
) -> FastPieces:
    """The fast engine's forward + backward up to the pieces (see :func:`fast_grad_stats`), or
    :class:`NotExact`. ``form_all``: every parameter whose g_i a built-in rule forms gets no
    autograd mean (:func:`per_sample_grads` forms them all: their sum would be wasted work).
    ``closed_form_at_output``: an :class:`AtOutput` also where the loss has a closed form (the Tracker's check
    at the output reads it; ``grad_stats``' check knows such a loss by its form and reads none).
    ``form_suffices``: that check's batch loss is ``loss_fn`` itself, so a standard loss's ``AtOutput.form``
    is all it reads: the backward is not asked for the gradient at the output (an output-sized tensor,
    ``[B, T, V]`` logits, kept to the end of the step otherwise)."""
    params, units, hooks, sharding = model_plan(model)  # the model's structure: found once, then fingerprinted
    hooked = _parameters_with_hooks(model, hooks)  # applied to each example's gradient (_hooked_piece)
    modes = recurrent_modes(units)  # before the capture's hooks are on the modules
    grad_scale = float(batch.size)
    spot = _spot_check_signature(model, batch, sharding)  # None: this call has no spot check
    buffers_found = buffer_state(model) if spot is not None else []
    with (
        torch.enable_grad(),
        capturing(
            units,
            model,
            batch.size,
            hook_outputs=False,
            watch_dim_moves=_input_has_batch_sized_dim(batch),
            stop_random=randomness == "error",
            sharding=sharding,
        ) as capture,
    ):
        try:
            output = batch.forward(model)
        except RandomCallStopped:  # stopped before it drew
            _refuse_random_draws(model, loss_fn, batch, randomness)
        if keep_output is not None:
            keep_output.append(output)
        capture.end_model_forward()
        followed = _follow_reentrant_checkpoints(capture, output)
        traced = traced_standard_loss(loss_fn, output, batch.targets, batch.size)
        closed = None if traced is None else standard_losses(traced)
        standard_form = closed is not None  # (not a model's own loss, whose check reads the model's graph)
        own = None
        if closed is None:  # a Hugging Face model's own out.loss: recomputed per example, checked
            own = model_losses(model, loss_fn, output, {**batch.options, **batch.kwargs}, batch.targets)
            closed = None if own is None else own.losses
        standard = closed is not None  # a weighted sum of per-example losses by its form (checked, if own)
        losses = (
            closed
            if closed is not None
            else per_example_losses(loss_fn, output, batch.targets, batch.size, closed_form=False)
        )
        if keep_output is not None:
            keep_output.append(standard)
        # vmapped losses, and closed forms where the caller's check reads them (the check's own
        # per_example_losses takes the same closed form; not a model's own loss): their gradient at the output
        # comes with the backward, for the check at the output (found below, where a backward can give it)
        wants_at_output = keep_output is not None and (
            closed is None or standard_form and closed_form_at_output and not form_suffices
        )
        loss_leaves: list[tuple[int, Tensor]] | None = None
        at_output: AtOutput | None = None
        capture.end_forward()
        if capture.escape is not None:
            raise NotExact(capture.escape)
        if randomness != "different" and capture.random_call is not None:  # seen in the model's calls
            _refuse_random_draws(model, loss_fn, batch, randomness)
        modified = modified_in_place(units)
        if modified is not None:
            raise NotExact(modified)
        mean_loss = losses.mean()

        def audit(rows: Finding | None | str = "probe"):
            return audit_graph(
                mean_loss,
                units,
                {id(p): n for n, p in params.items()},
                batch_size=batch.size,
                outputs=flat_leaves(output),
                inputs_moved=capture.raw_input_moved,
                recomputed=capture.recomputed,
                rows=rows,
            )

        if not followed:
            audited = audit()
            if audited.escape is not None and audited.escape.code == "REENTRANT_CHECKPOINT":
                followed = _follow_reentrant_checkpoints(capture, output, called_without_grad=False)
            if not followed and audited.escape is not None:
                raise widened_refusal(model, audited.escape)
        if followed:  # the checkpointed blocks' graphs exist only in the backward: audited after it
            rows = rows_check(flat_leaves(output), units, batch.size)
        planned = plan_cuts(units, modes, mean_loss) if modes and not followed else []
        derived = derived_parameters(units, params, var, form_all=form_all) | set(hooked)  # hooks: never on ḡ
        from_autograd = {name: p for name, p in params.items() if name not in derived}
        outputs = [
            (call, leaf_index, edge) for unit in units for call in unit.calls for leaf_index, edge in call.edges.items()
        ]

        def closed_form(cut: Cut, call: Call, input_grad: bool):
            return recurrent_closed_form(cut.unit, call, batch.size, grad_scale, cut.mode, input_grad)

        if followed:  # the backward runs through the recomputations: the check computes its own (no loss_leaves)
            if hooked:  # refused before the backward() that would call the hooks on the batch's gradient
                _refuse_hooks_not_per_example(hooked, units, batch.size, reentrant=True, moved=False)
            grads = _backward_through_recomputations(
                mean_loss, capture, list(from_autograd.values()), [edge for _, _, edge in outputs], model, batch
            )
            cuts: list[Cut] = []
            audited = audit(rows)
            found = capture.escape or audited.escape or modified_in_place(units)
            if found is not None:
                raise widened_refusal(model, found)
        else:
            if wants_at_output and not planned:  # (a cut's closed form could give the output's gradient: not read)
                loss_leaves = _loss_leaves_at_output(output, batch.size)
            at_leaves = [get_gradient_edge(t) for _, t in loss_leaves or []]
            grads, cuts = _autograd_means(
                mean_loss,
                list(from_autograd.values()) + [edge for _, _, edge in outputs],
                planned,
                closed_form,
                at_leaves,
            )
            if loss_leaves is not None and keep_output is not None:
                leaf_grads = grads[len(grads) - len(at_leaves) :]
                at_output = AtOutput(
                    at_least_float32(losses.detach()), {i: g for (i, _), g in zip(loss_leaves, leaf_grads)}
                )
            grads = grads[: len(grads) - len(at_leaves)]
        if capture.rewritten_gradient is not None:
            raise NotExact(capture.rewritten_gradient)
    delivered = {id(call) for cut in planned for call in cut.unit.calls}  # the cut backward added theirs
    for (call, leaf_index, _), grad in zip(outputs, grads[len(from_autograd) :]):
        if id(call) not in delivered:
            add_gradient(call.out_grads, leaf_index, grad)
    if hooked:
        moved = audited.dim_zero_moved or capture.raw_input_moved
        _refuse_hooks_not_per_example(hooked, units, batch.size, followed, moved)
    cut_params = {id(p) for cut in cuts for p in cut.unit.params.values()}
    derived |= {name for name, p in params.items() if id(p) in cut_params}
    means = {
        name: at_least_float32(dense_gradient(g, p))
        for (name, p), g in zip(from_autograd.items(), grads)
        if id(p) not in cut_params
    }
    layout = Layout(batch.size, dim_zero_moved=audited.dim_zero_moved or capture.raw_input_moved, grad_scale=grad_scale)
    with autocast_as(None):  # statistics in float32 or better, whatever the forward's autocast
        pieces = _pieces_by_parameter(units, params, means, layout, cuts)
        for name, p in hooked.items():
            pieces[name] = _hooked_piece(name, pieces[name], p)
    # a forward that draws cannot be replayed alone; re-entrant checkpoints refuse torch.autograd.grad
    if spot is not None and capture.random_call is None and not followed:
        if check_alone(model, loss_fn, batch, params, pieces, losses.detach(), buffers_found).verdict:
            remember_alone(model, spot)
    if keep_output is not None and len(keep_output) == 2:  # the output and whether the loss is standard
        if closed_form_at_output and (standard_form or own is not None):  # the batch loss's weights are known
            if at_output is None:
                at_output = AtOutput(at_least_float32(losses.detach()), {})
            if traced is not None and traced.source is not None and standard_form:  # by the loss's form
                at_output.form = (traced.source, example_weights(traced))
            else:  # checked by model_losses
                at_output.own = own
        keep_output.append(at_output)
    return FastPieces(pieces, means, at_least_float32(losses.detach()), params, derived, cut_params)


def _spot_check_signature(model: nn.Module, batch: Batch, sharding: str | None) -> tuple | None:
    """The input signature under which this call runs the spot check against the definition
    (:mod:`.alone`), or None where it does not: a batch of one (nothing to compare), a sharded model (a
    batch-of-one forward would run the shards' collectives on this rank alone: the audit alone vouches
    there), inside :func:`.alone.without_spot_check`, or a verdict already in the model's plan for this
    signature."""
    if batch.size < 2 or sharding is not None or spot_check_off():
        return None
    key = alone_signature(batch)
    return None if checked_alone(model, key) else key


def _derived_moments(
    piece: Piece, var: bool, param: Tensor, summed: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(ḡ, M2, suspect) of a parameter whose mean autograd did not compute. Without the variance, a
    cut recurrent layer's ḡ is the weighted sum (1/B) Σ_i g_i in closed form (one matmul), where
    forming every g_i would cost more; otherwise ``Piece.moments`` forms them once for all three."""
    if summed and not var:  # (weights of one: 1/B would be rounded to the weights' dtype)
        return piece.weighted_sum(torch.ones(piece.batch_size, device=param.device)).div_(piece.batch_size), None, None
    return piece.moments(var)


def _refuse_random_draws(model: nn.Module, loss_fn, batch: Batch, randomness: str) -> None:
    """The forward drew random numbers: an error under ``"error"``; under ``"same"`` (one draw for
    the whole batch) a batched forward, which draws per element, is not what was asked."""
    if randomness == "error":
        raise randomness_error(first_random_module(model, lambda: batch.call(model, loss_fn)))
    raise NotExact(
        "randomness='same' (one draw shared by all examples) differs from a batched forward, "
        "which draws independent numbers for every example",
        code="RANDOM_SAME_BATCHED",
    )


#: A Linear's weight on sequences at least this long has its g_i formed even without the variance:
#: the ghost norm would cost more than the memory pass over them.
MIN_POSITIONS_TO_FORM = 8


def derived_parameters(
    units: list[Unit], params: dict[str, nn.Parameter], var: bool, *, form_all: bool = False
) -> set[str]:
    """The names of the parameters whose mean is Σ_i g_i from their pieces instead of autograd's.

    A unit qualifies when the reductions form its weight's g_i anyway: a convolution, or a
    Linear on T > 1 positions when the variance is wanted or T ≥ :data:`MIN_POSITIONS_TO_FORM`.
    Σ_i g_i is then the weight gradient itself (nanoGNS's observation), so autograd skips that
    GEMM and only propagates to the unit's outputs; the unit's bias follows (its g_i are a sum
    over positions, and oneDNN's convolution backward computes a bias gradient at the cost of a
    weight gradient). A parameter that a fallback unit also uses keeps autograd's mean, which
    checks the fallback. ``form_all``: every unit with a built-in rule qualifies (a user's rule
    keeps autograd's mean, which checks it).
    """
    users: dict[int, list[Unit]] = {}
    for unit in units:
        for p in unit.params.values():
            users.setdefault(id(p), []).append(unit)
    forming = {
        id(u)
        for u in units
        if u.rule is not None and (not u.rule.user if form_all else _forms_weight_gradients(u, var))
    }
    return {
        name
        for name, p in params.items()
        if (found := users.get(id(p)))
        and all(u.rule is not None and (id(u) in forming or not form_all) for u in found)
        and any(id(u) in forming for u in found)
    }


def _forms_weight_gradients(unit: Unit, var: bool) -> bool:
    assert unit.rule is not None  # asked of units with a rule only
    if unit.rule.name == "conv":
        return True
    if unit.rule.name not in ("linear", "hf_conv1d", "multihead_attention"):  # attention: its query positions
        return False
    calls = [call for call in unit.calls if call.args and isinstance(call.args[0], Tensor)]
    positions = sum(_positions(call.args[0], call.place) for call in calls if call.args[0].dim() >= 2)
    return positions > 1 and (var or positions >= MIN_POSITIONS_TO_FORM)


def _positions(x: Tensor, place: Any) -> int:
    """An example's number of positions in input ``x`` of a call (its rows: all dims but the batch's and
    the last), with the batch where the call's place says (:mod:`.places`), else on dim 0."""
    if place is None:
        examples = x.shape[0]
    elif place.positions:
        examples = x.shape[0] // max(1, math.prod(place.positions))
    else:
        examples = x.shape[place.dim]
    return x.numel() // max(1, examples * x.shape[-1])


def _autograd_means(
    mean_loss: Tensor, inputs: list, cuts: list[Cut], closed_form, also: Sequence = ()
) -> tuple[list, list[Cut]]:
    """autograd's gradient of the mean loss for every input, parameters or edges (None where unused),
    through :func:`.cuts.backward`; and the cuts that held. ``also``: more edges (the model output's,
    for :class:`AtOutput`), whose gradients follow those of ``inputs`` in the same backward."""
    try:
        return cut_backward(mean_loss, [*inputs, *also], cuts, closed_form)
    except RuntimeError as err:
        if is_reentrant_checkpoint_error(err):
            raise NotExact(REENTRANT_CHECKPOINT) from err
        raise


def _parameters_with_hooks(model: nn.Module, hooks: bool) -> dict[str, nn.Parameter]:
    """The trainable parameters with tensor hooks (``p.register_hook``), by name; a module backward hook
    (its own or global) is refused: it may change the gradients reaching every module before it, per
    example, which one batch backward cannot apply (MODULE_BACKWARD_HOOK)."""
    if not hooks:
        return {}
    refuse_module_backward_hooks(model, "fast")
    named = dict(model.named_parameters())
    return {name: named[name] for name in hooked_parameters(model)}


def _refuse_hooks_not_per_example(
    hooked: dict[str, nn.Parameter], units: list[Unit], batch_size: int, reentrant: bool, moved: bool
) -> None:
    """PARAMETER_GRADIENT_HOOK unless each hooked parameter's per-example gradients are exactly what the
    per-example loop hands its hooks (:func:`_hooked_piece`).

    The loop's g_i is H(∇_p L_i), H the parameter's hooks in order, called by ``autograd.grad`` on example
    i's own gradient, and only where example i's graph reaches p (else g_i = 0, H not called). A leaf's
    hooks change that leaf's gradient alone, so every other parameter's g_i is unchanged. Hence the
    conditions: p belongs to modules with a built-in closed-form rule (which give ∇_p L_i exactly; a
    fallback's or a user rule's rows are checked against autograd's mean, which the hook would change),
    each of their calls takes the whole batch on dim 0 and its output reaches the loss (so every
    example's graph reaches p, as in the loop), and no batch dim moved (dim 0 is the examples). Under
    re-entrant checkpointing the engine's ``backward()`` would call the hooks on the batch's gradient."""
    for name, p in hooked.items():
        users = [unit for unit in units if any(q is p for q in unit.params.values())]
        problem = None
        if reentrant:
            problem = "re-entrant checkpointing makes the engine's own backward() call it on the batch's gradient"
        elif moved:
            problem = "some tensor's dim 0 moved, so dim 0 may not be the examples"
        elif not users:
            problem = "no module that owns it was found"
        for unit in users:
            label = f"module {unit.name or '<root>'} ({type(unit.module).__name__})"
            if problem is not None:
                break
            if unit.rule is None or unit.rule.user:
                problem = f"{label} has no built-in closed-form rule"
            elif not unit.calls:
                problem = f"{label} was not called with gradients"
            elif getattr(unit.module, "sparse", False) is True:
                problem = f"{label} gives it a sparse gradient, which the loop hands the hook as it is"
            for call in unit.calls:
                x = call.args[0] if call.args else None
                if problem is None and (
                    call.broadcast
                    or not isinstance(x, Tensor)
                    or x.dim() == 0
                    or x.shape[0] != batch_size
                    or not call.out_grads
                ):
                    problem = f"{label} is called on something other than the whole batch, or does not reach the loss"
        if problem is not None:
            raise NotExact(
                f"parameter {name!r} has a gradient hook (p.register_hook), which the fast engine applies to "
                f"each example's gradient only where it can form them exactly as the loop does, but {problem}",
                code="PARAMETER_GRADIENT_HOOK",
            )


def _hooked_piece(name: str, piece: Piece, p: nn.Parameter) -> DensePiece:
    """Example i's gradient g_i = H(∇_p L_i), H the hooks on ``p`` (``p.register_hook``) called in
    registration order, each on what the one before returned (None: unchanged), on ∇_p L_i in p's dtype:
    what ``autograd.grad`` hands them in the per-example loop, B calls as there. Rows as formed by
    ``piece`` (unscaled), so memory O(B × p.numel())."""
    functions = tensor_gradient_hook_functions(p)
    rows = piece.materialize_all()
    hooked = []
    for i in range(rows.shape[0]):
        g = rows[i].to(p.dtype, copy=True)
        for hook in functions:
            with torch.no_grad():  # as autograd calls them without create_graph
                result = hook(g)
            if result is not None:
                if not isinstance(result, Tensor) or result.shape != p.shape or result.dtype != p.dtype:
                    raise NotExact(
                        f"the gradient hook of parameter {name!r} returned "
                        f"{type(result).__name__ if not isinstance(result, Tensor) else tuple(result.shape)}, "
                        "not a gradient of its shape and dtype",
                        code="PARAMETER_GRADIENT_HOOK",
                    )
                g = result
        hooked.append(g)
    return DensePiece(at_least_float32(torch.stack(hooked).detach()))


def _follow_reentrant_checkpoints(capture, output, called_without_grad: bool = True) -> bool:
    """Whether the model's forward went through re-entrant checkpoints (``checkpoint(..., use_reentrant=True)``)
    that the capture now follows (:meth:`.capture.Capture.follow_checkpoints`): their blocks ran under
    no_grad in the forward, and the backward runs them again with gradients, when their calls are recorded,
    their output gradients delivered by hooks and their graph audited.

    ``called_without_grad``: look only if some unit was called with gradients off in the forward
    (``Capture.no_grad_calls``, as in a checkpointed block with layers); False: look anyway (the graph audit
    met a checkpoint, say one whose block calls no layer)."""
    if called_without_grad and not capture.no_grad_calls:
        return False
    with torch._C.DisableTorchFunction():  # our own walk: not the user's code
        capture.follow_checkpoints([t for t in flat_leaves(output) if isinstance(t, Tensor) and t.grad_fn is not None])
    return bool(capture.recomputed)


def _backward_through_recomputations(
    mean_loss: Tensor, capture, wrt: list[Tensor], edges: list, model: nn.Module, batch: Batch
) -> list:
    """autograd's gradient of ``mean_loss`` for every parameter of ``wrt`` and every edge of ``edges`` (None
    where unused), in the order ``wrt + edges``, through followed re-entrant checkpoints, which refuse
    ``autograd.grad`` and ``backward(inputs=...)``.

    One ``backward()``: parameters accumulate into emptied ``.grad`` slots (:class:`.._autograd.fresh_grad_slots`:
    the model's trainable parameters, the inputs that require grad, every leaf the graph shows and, as each
    block is recomputed, every leaf its graph reaches), restored afterwards with their post-accumulate-grad
    hooks held back meanwhile. Each edge's gradient is what the edge's node receives for that output (a
    pre-hook on the node, as ``autograd.grad`` of the edge gives it); the recomputed calls' output gradients
    come from their own tensor hooks (:func:`.capture.capturing`). The graph outside the blocks is retained
    for the audit that follows."""
    position: dict = {}
    for i, edge in enumerate(edges):
        position.setdefault(edge.node, []).append((i, edge.output_nr))
    edge_grads: list = [None] * len(edges)

    def pre_hook(node):
        def hook(grad_outputs):
            for i, nr in position[node]:  # added up: a leaf's node may run in a block's backward and outside
                grad = grad_outputs[nr] if nr < len(grad_outputs) else None
                if grad is not None:
                    edge_grads[i] = grad if edge_grads[i] is None else edge_grads[i] + grad

        return hook

    trainable = [p for p in model.parameters() if p.requires_grad]
    leaves = [*wrt, *trainable, *(t for t in batch.input_leaves if isinstance(t, Tensor))]
    handles = []
    try:
        with fresh_grad_slots([*leaves, *graph_leaves([mean_loss])[0]]) as slots:
            capture.on_recomputed_leaves = slots.add
            handles = [node.register_prehook(pre_hook(node)) for node in position]
            mean_loss.backward(retain_graph=True)
            grads = [p.grad for p in wrt]
    finally:
        capture.on_recomputed_leaves = None
        for handle in handles:
            handle.remove()
    return [*grads, *edge_grads]


def recurrent_modes(units: list[Unit]) -> dict[int, str]:
    """``{id(unit): cell}`` for the rule-less units that are recurrent layers the closed form covers."""
    return {id(unit): mode for unit in units if unit.rule is None and (mode := recurrent_mode(unit)) is not None}


def _input_has_batch_sized_dim(batch: Batch) -> bool:
    return any(isinstance(t, Tensor) and batch.size in tuple(t.shape[1:]) for t in batch.input_leaves)


def per_example_losses(
    loss_fn: Callable[..., Tensor], output, targets, batch_size: int, *, closed_form: bool = True
) -> Tensor:
    """L_i = loss_fn(output_i[None], target_i[None]) for every example, differentiably: ``[B]``.

    Standard losses, also inside plain wrappers, have a closed form (:mod:`.losses`);
    others are vmapped. Either way L_i depends on example i's output alone, so one
    gradient of Σ_i L_i gives every example's own gradient at the output.

    A loss must really be per example: a value that does not vary with the example (a batch
    loss the model computed, such as Hugging Face's ``out.loss`` with ``labels=``), or that
    reads a differentiable output shared by the whole batch, raises :class:`NotExact`
    instead of being broadcast.
    """
    closed = closed_form_losses(loss_fn, output, targets, batch_size) if closed_form else None  # False: tried
    if closed is not None:
        return closed
    leaves, spec, batched = output_leaves(output, batch_size)
    if not any(batched):
        raise NotExact("the model's output has no tensor batched on dim 0", code="OUTPUT_NOT_BATCHED")
    # Differentiable outputs shared by the batch enter through fresh leaves, to see whether L_i reads them.
    shared = {
        i: t.detach().requires_grad_()
        for i, (t, b) in enumerate(zip(leaves, batched))
        if isinstance(t, Tensor) and not b and t.requires_grad
    }
    leaves = [shared.get(i, t) for i, t in enumerate(leaves)]

    def one(leaves, target):
        loss = example_loss(loss_fn, example_output(leaves, batched, spec), target)
        if not is_batched_tensor(loss):
            raise NotExact(_NOT_PER_EXAMPLE)
        return loss

    target_dims = None if targets is None else 0
    try:
        losses = vmap(one, in_dims=([0 if b else None for b in batched], target_dims))(leaves, targets)
    except NotExact:
        raise
    except RuntimeError as err:  # data-dependent control flow, ops without a batching rule
        clearer = translate_vmap_error(err)
        if clearer is not None:
            raise clearer from err
        raise NotExact(
            f"torch.func.vmap cannot evaluate loss_fn on each example of the batched output: "
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
            code="LOSS_NOT_VMAPPABLE",
        ) from err
    if shared and any(
        g is not None
        for g in torch.autograd.grad(losses.sum(), list(shared.values()), allow_unused=True, retain_graph=True)
    ):
        raise NotExact(_NOT_PER_EXAMPLE)
    return losses


_NOT_PER_EXAMPLE = Finding(
    "LOSS_NOT_PER_EXAMPLE",
    "loss_fn's value for an example depends on a model output "
    "shared by the whole batch (a batch loss the model computed, such as Hugging Face's "
    "out.loss with labels=, or AdaptiveLogSoftmaxWithLoss's loss): per-example losses cannot "
    "be read off a batched forward, so each example is evaluated on its own instead",
)


def output_leaves(output, batch_size: int) -> tuple[list, Any, list[bool]]:
    """The model output's pytree leaves, its spec, and which leaves are batched on dim 0.

    Losses are vmapped over these flat leaves: rebuilding containers such as
    Hugging Face ``ModelOutput`` with None in_dims would drop their None fields.
    """
    leaves, spec = tree_flatten(output)
    return leaves, spec, [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch_size for t in leaves]


def example_output(leaves: list, batched: list[bool], spec):
    """Inside vmap: one example's output, each batched leaf as a batch of one."""
    return tree_unflatten([t.unsqueeze(0) if b else t for t, b in zip(leaves, batched)], spec)


def _pieces_by_parameter(
    units: list[Unit],
    params: dict[str, nn.Parameter],
    means: dict[str, Tensor],
    layout: Layout,
    cuts: Sequence[Cut] = (),
    checks: HostChecks | None = None,
) -> dict[str, Piece]:
    """One piece per parameter; captured output gradients times ``layout.grad_scale`` are the
    gradients of Σ_i L_i (rules fold the factor in; fallbacks scale their cotangents). The calls
    of ``cuts`` come with their pieces, from the closed form that replaced their backward. The
    fallbacks' sum checks are read at once, or added to ``checks`` (observe, which has no engine to
    fall back to: its refusal may come when the step's checks are read)."""
    batch_size = layout.size
    by_id = {id(p): name for name, p in params.items()}
    collected: dict[str, list[Piece]] = {}
    cut_pieces = {id(call): found for cut in cuts for call, found in zip(cut.unit.calls, cut.pieces)}
    for unit in units:
        for call in unit.calls:
            if id(call) in cut_pieces:
                found = cut_pieces[id(call)]
            elif not call.out_grads:
                continue  # this call's output never reached the loss
            else:
                found = (
                    _rule_pieces(unit, call, layout)
                    if unit.rule is not None
                    else _fallback_pieces(unit, call, batch_size, layout.grad_scale)
                )
            for local_name, piece in found.items():
                collected.setdefault(by_id[id(unit.params[local_name])], []).append(piece)
    pieces = {}
    for name, p in params.items():
        parts = collected.get(name)
        pieces[name] = combine_pieces(parts) if parts else ZeroPiece(batch_size, p.shape, like=p)
    cut_units = {id(cut.unit) for cut in cuts}
    _check_fallback_sums([unit for unit in units if id(unit) not in cut_units], pieces, means, by_id, checks)
    return pieces


class ZeroPiece(Piece):
    """g_i = 0 for every example: a parameter that no captured output gradient reached (a branch the
    batch does not use: the vision tower of a multimodal model given a text-only batch). Every
    reduction is a zero tensor of its size, in the parameter's dtype, without forming a single row,
    so such parameters cost an allocation each, not B rows (issue 22: 69x a plain step before)."""

    def __init__(self, batch_size: int, shape: torch.Size, *, like: Tensor):
        self.batch_size, self.shape, self._like = batch_size, shape, like

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self._like.dtype, device=self._like.device)

    def _unscaled(self, start, stop, out=None):
        return self._zeros(stop - start, *self.shape)

    def materialize(self, start, stop):
        return self._zeros(stop - start, *self.shape)

    def materialize_all(self):
        return self._zeros(self.batch_size, *self.shape)

    def moments(self, var):
        return self._zeros(*self.shape), (self._zeros(*self.shape) if var else None), None

    def sq_norms(self):
        return self._zeros(self.batch_size)

    def second_moment(self):
        return self._zeros(*self.shape)

    def centered_second_moment(self, mean):
        """Σ_i (0 − ḡ)² = B ḡ∘ḡ (zero, as ḡ is, for a parameter autograd did not reach either)."""
        center = mean.to(self._like.dtype).reshape(self.shape)
        return center.square().mul_(self.batch_size)  # one new tensor (2 M parameters: no second one)

    def quick_centered_second_moment(self, mean):
        return self.centered_second_moment(mean), None

    def inner(self, ref):
        return self._zeros(self.batch_size)

    def weighted_sum(self, weights):
        return self._zeros(*self.shape)


def _rule_pieces(unit: Unit, call: Call, layout: Layout) -> dict[str, Piece]:
    assert unit.rule is not None  # called for units with a rule only
    if unit.rule.whole_call:
        grads = {index: at_least_float32(g) for index, g in call.out_grads.items()}
        return _guarded(unit, lambda: unit.rule.compute(unit.module, call, grads, layout))  # type: ignore[union-attr]
    leaves = flat_leaves(call.output)
    if (
        unit.rule.whole_call
        or len(call.args) < 1
        or not isinstance(call.args[0], Tensor)
        or 0 not in call.out_grads
        or len(leaves) != 1
    ):
        raise NotExact(
            f"module {unit.name or '<root>'} was called in a way its {unit.rule.name} rule does not cover",
            code="RULE_NOT_APPLICABLE",
            module=unit.name or "<root>",
        )
    x = at_least_float32(call.args[0].detach())
    if call.broadcast:
        x = x.expand(layout.size, *x.shape[1:])
    grad = at_least_float32(call.out_grads[0])
    if call.place is not None:  # a flattening or a sequence-first input: example i where its place says
        x, grad = batch_first(x, call.place, layout.size), batch_first(grad, call.place, layout.size)
    elif call.rows_per_example > 1:  # [B·k, *] rows, row r of example r // k: the rule's pieces on [B, k, *]
        x, grad = (t.reshape(layout.size, call.rows_per_example, *t.shape[1:]) for t in (x, grad))
    elif call.gathered:
        x, grad = _by_example(unit, call, x, grad, layout.size)
    return _guarded(unit, lambda: unit.rule.compute(unit.module, x, grad, layout))  # type: ignore[union-attr]


def _by_example(unit: Unit, call: Call, x: Tensor, grad: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """A row-wise rule's input and output gradient on gathered rows (an expert Linear's ``x[token]``), laid
    out ``[B, m, *]``: example b's rows (``call.row_examples``, read off the graph by the probe of the rows)
    in its first slots, zeros after (m: the most rows of one example). The rule's pieces on that layout are
    per example the sum over its own rows: a segment sum. A row that no example's output reaches must have
    no gradient (it adds nothing to any example), else the rows cannot be attributed."""
    label = unit.name or "<root>"
    examples = call.row_examples
    if examples is None or examples.shape[0] != x.shape[0]:
        raise NotExact(
            f"module {label}: the examples of its gathered rows were not read off the graph",
            code="BATCH_MIXED",
            module=label,
        )
    examples = examples.to(x.device)
    owned = examples >= 0
    if not bool(owned.all()) and bool(grad[~owned].ne(0).any()):
        raise NotExact(
            f"module {label}: a gathered row that no example's output reaches in the probe has a gradient",
            code="BATCH_MIXED",
            module=label,
        )
    examples, x, grad = examples[owned], x[owned], grad[owned]
    order = torch.argsort(examples, stable=True)
    examples, x, grad = examples[order], x[order], grad[order]
    counts = torch.bincount(examples, minlength=batch_size)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(examples.shape[0], device=x.device) - starts[examples]
    width = max(int(counts.max()) if counts.numel() else 0, 1)

    def laid_out(t: Tensor) -> Tensor:
        out = t.new_zeros(batch_size, width, *t.shape[1:])
        out[examples, slots] = t
        return out

    return laid_out(x), laid_out(grad)


def _guarded(unit: Unit, compute: Callable[[], dict[str, Piece]]) -> dict[str, Piece]:
    """``compute()``, a rule's pieces; a failed precondition of the closed form is :class:`NotExact`."""
    assert unit.rule is not None
    try:
        return compute()
    except LayoutError as err:
        raise NotExact(f"module {unit.name or '<root>'}: {err}", code=err.code, module=unit.name or "<root>") from None
    except Exception as err:  # a precondition of the closed form failed: never guess, fall back
        raise NotExact(
            f"module {unit.name or '<root>'} ({type(unit.module).__name__}): its {unit.rule.name} "
            f"rule does not apply ({type(err).__name__}: {err})",
            code="RULE_NOT_APPLICABLE",
            module=unit.name or "<root>",
        ) from err


def at_least_float32(t: Tensor) -> Tensor:
    """Half-precision activations and gradients (autocast) in float32, so that statistics are
    accumulated in float32 or better; other tensors (ids, float32, float64) as they are."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def _fallback_batch_dims(module: nn.Module, in_leaves: list, out_leaves: list, batch_size: int):
    """The batch dim of every input and output leaf of one call (None: shared by all examples).

    Recurrent modules keep their states batched on dim 1, and modules with
    ``batch_first=False`` their sequences too; anything else is batched on
    dim 0 when its dim 0 has the batch's size.
    """

    def default(t):
        return 0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch_size else None

    in_dims, out_dims = [default(t) for t in in_leaves], [default(t) for t in out_leaves]
    sequence_dim = 0 if getattr(module, "batch_first", True) else 1
    if isinstance(module, nn.RNNBase):
        in_dims = [(sequence_dim if i == 0 else 1) if isinstance(t, Tensor) else None for i, t in enumerate(in_leaves)]
        out_dims = [sequence_dim if i == 0 else 1 for i in range(len(out_leaves))]
    elif isinstance(module, nn.MultiheadAttention) and sequence_dim == 1:
        tensors = [i for i, t in enumerate(in_leaves) if isinstance(t, Tensor)]
        for i in tensors[:3]:  # query, key, value
            in_dims[i] = 1
        out_dims[0] = 1
    for t, d in zip(in_leaves + out_leaves, in_dims + out_dims):
        if d is not None and (t.dim() <= d or t.shape[d] != batch_size):
            raise NotExact(
                f"module {type(module).__name__}: a tensor of shape {tuple(t.shape)} is not batched on dim {d}",
                code="FALLBACK_NOT_BATCHED",
            )
    return in_dims, out_dims


def _fallback_pieces(unit: Unit, call: Call, batch_size: int, grad_scale: float) -> dict[str, Piece]:
    """Per-example gradients of a rule-less module: vmap over the vjp of the module alone (recurrent
    layers: their closed form from :mod:`.recurrent` where it applies; summed, both are checked)."""
    if call.rows_per_example > 1:
        return _token_rows_pieces(unit, call, batch_size, grad_scale)
    closed = recurrent_pieces(unit, call, batch_size, grad_scale)
    if closed is not None:
        return closed
    label = f"{unit.name or '<root>'} ({type(unit.module).__name__})"
    out_leaves, out_spec = tree_flatten(call.output)
    in_leaves, in_spec = tree_flatten((call.args, call.kwargs))
    in_leaves = [t.detach() if isinstance(t, Tensor) else t for t in in_leaves]
    in_dims, out_dims = _fallback_batch_dims(unit.module, in_leaves, out_leaves, batch_size)
    flattened = _flattened_rows(in_leaves, in_dims, out_leaves, batch_size)
    if flattened is not None:
        shared = [isinstance(t, Tensor) and t.dim() > 0 and d is None for t, d in zip(in_leaves, in_dims)]
        return _token_rows_pieces(unit, call, batch_size, grad_scale, flattened, shared=shared)
    for leaf, d in zip(out_leaves, out_dims):
        if isinstance(leaf, Tensor) and d is None:
            raise NotExact(
                f"module {label} returns a tensor of shape {tuple(leaf.shape)} that is not "
                f"batched over the {batch_size} examples",
                code="FALLBACK_NOT_BATCHED",
                module=label,
            )
    tensor_outputs = [i for i, leaf in enumerate(out_leaves) if isinstance(leaf, Tensor)]
    cotangents = [
        call.out_grads[i] * grad_scale if i in call.out_grads else torch.zeros_like(out_leaves[i])
        for i in tensor_outputs
    ]
    cotangent_dims = [out_dims[i] for i in tensor_outputs]
    params = {n: p.detach() for n, p in unit.params.items()}
    frozen = {n: p.detach() for n, p in unit.module.named_parameters() if n not in params}
    buffers = detached_buffers(unit.module)
    if sum(1 for i in tensor_outputs if i in call.out_grads) > 1:
        cotangents = _external_batch_cotangents(unit, call, params, frozen, buffers, tensor_outputs, cotangents)

    def batch_of_one(leaves, dims):
        return [t.unsqueeze(d) if d is not None else t for t, d in zip(leaves, dims)]

    def tensor_outputs_of(p, args, kwargs):
        leaves = flat_leaves(functional_call(unit.module, (p, frozen, buffers), args, kwargs))
        return [leaves[i] for i in tensor_outputs]

    def one_example_grads(params, leaves, cotangent):
        args, kwargs = tree_unflatten(batch_of_one(leaves, in_dims), in_spec)
        _, pullback = vjp(lambda p: tensor_outputs_of(p, args, kwargs), params)
        return pullback(batch_of_one(cotangent, cotangent_dims))[0]

    try:
        with (
            autocast_as(call.autocast),
            torch.no_grad(),
            vmap_friendly_modules(unit.module),
            ParameterReads(unit.params),  # a read of a parameter itself, not substituted: its term would be lost
        ):
            per_example = vmap(one_example_grads, in_dims=(None, in_dims, cotangent_dims), randomness="error")(
                params, in_leaves, cotangents
            )
    except NotExact:
        raise
    except Exception as err:  # random ops, unsupported batching, data-dependent control flow
        if all(d in (0, None) for d in in_dims) and 0 in in_dims and _batch_first(out_leaves, out_dims):
            # vmap cannot run it (an autograd.Function without setup_context, an int output, .item()): each
            # example alone instead, its outputs compared with the batch's rows (HY-V4's attention, Zaya)
            shared = [d is None for d in in_dims]
            return _token_rows_pieces(unit, call, batch_size, grad_scale, flattened=1, shared=shared)
        clearer = translate_vmap_error(err) if isinstance(err, RuntimeError) else None
        raise NotExact(
            f"module {label} has no closed-form rule and torch.func could not isolate it: {clearer or err}",
            code="FALLBACK_NOT_ISOLATED",
            module=label,
        ) from err
    return {n: DensePiece(at_least_float32(g)) for n, g in per_example.items()}


def _batch_first(leaves: list, dims: list) -> bool:
    """Whether every tensor of ``leaves`` (not a scalar) is batched on dim 0."""
    return all(d == 0 for t, d in zip(leaves, dims) if isinstance(t, Tensor) and t.dim() > 0)


def _external_batch_cotangents(
    unit: Unit, call: Call, params: dict, frozen: dict, buffers: dict, tensor_outputs: list[int], cotangents: list
) -> list:
    """:func:`_external_cotangents` for a vmap fallback: the outputs' captured gradients without what flows
    back into an output from the module's other outputs computed from it (GPT-OSS's attention, a fallback
    for its ``sinks``, returns ``(attn_output, attn_weights)`` with attn_output computed from attn_weights:
    attn_weights' hook sees attn_output's gradient too, which fed to the vjp of both counted twice). One
    more call of the module on the batch, with a graph, finds which outputs are computed from which."""
    leaves = [p.requires_grad_() for p in (q.detach() for q in params.values())]
    with autocast_as(call.autocast), torch.enable_grad():
        inputs = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, (call.args, call.kwargs))
        out = flat_leaves(functional_call(unit.module, (dict(zip(params, leaves)), frozen, buffers), *inputs))
        outputs = [out[i] for i in tensor_outputs]
        if not all(isinstance(y, Tensor) and y.requires_grad for y in outputs):
            return cotangents
        return [c.detach() for c in _external_cotangents(outputs, cotangents)]


def _flattened_rows(in_leaves: list, in_dims: list, out_leaves: list, batch_size: int) -> list[int] | None:
    """Per output leaf, its rows per example k_j, where a call looks like a module that flattens the batch
    itself: every input tensor (not a scalar) batched on dim 0 with B rows, or not batched at all (rotary
    tables, shared by every example), at least one batched; every output tensor with B·k_j rows on dim 0, and
    some k_j > 1 (DeepSeek-V3, GLM-4-MoE, Kimi routers: ``[B, T, d]`` in, ``[B·T, E]`` out; JetMoE's
    attention: ``[B, T, d]`` and its router's ``[B·T, E]`` logits out); else None. Only the shapes say so
    here: :func:`_token_rows_pieces` then calls the module on each example alone and compares the segments
    of rows with the batch's (``TOKEN_ROWS_DIFFER``), and the sums are checked with autograd's."""
    inputs = [(t, d) for t, d in zip(in_leaves, in_dims) if isinstance(t, Tensor) and t.dim() > 0]
    if batch_size < 2 or not any(d == 0 for _, d in inputs) or any(d not in (0, None) for _, d in inputs):
        return None
    if any(d is None and t.shape[0] > batch_size and t.shape[0] % batch_size == 0 for t, d in inputs):
        return None  # an input of B·k rows is no table shared by the examples: token rows, whose map is not known
    tensors = [t for t in out_leaves if isinstance(t, Tensor) and t.dim() > 0]
    if not tensors or any(t.shape[0] < batch_size or t.shape[0] % batch_size for t in tensors):
        return None
    ks = [t.shape[0] // batch_size if isinstance(t, Tensor) and t.dim() > 0 else 1 for t in out_leaves]
    if len({t.shape[0] for t in tensors}) > 1 and any(t.dim() != 2 and t.shape[0] > batch_size for t in tensors):
        # rows of several lengths: only [B·k, E] matrices are taken for flattened tokens beside [B, ...] outputs (a
        # sequence-first [T, B, d], a bias of B·k numbers are not rows of examples)
        return None
    return ks if max(ks) > 1 else None


def _token_rows_pieces(
    unit: Unit,
    call: Call,
    batch_size: int,
    grad_scale: float,
    flattened: int | list[int] | None = None,
    shared: list[bool] | None = None,
) -> dict[str, Piece]:
    """Per-example gradients of a rule-less module called on a flattened token batch (an MoE router or its
    experts on ``h.view(-1, d)``): every tensor of the call has B·k rows on dim 0, row r of example r // k
    (:func:`.units.token_rows`; the graph audit's probe checked that map on the rows that carry gradients).
    ``flattened`` = k: a module that flattens the batch itself (DeepSeek-V3's router, ``[B, T, d]`` in,
    ``h.view(-1, d)`` inside, ``[B·T, E]`` out; :func:`_flattened_rows`): its inputs have B rows, one per
    example, and its outputs B·k (a list: each output leaf its own k, JetMoE's attention returning its
    ``[B, T, d]`` output and its router's ``[B·T, E]`` logits).

    The module is called again on each example's segment of rows alone, and
    g_b = (∂ module(θ; rows of b) / ∂θ)ᵀ · (output gradient rows of b),
    the sum over b's rows of the per-row terms (a segment sum), whatever the module does inside: gathers of
    tokens to experts, ``index_add_`` back, data-dependent loops. That is example b's gradient only if the
    module computes b's rows alone as it did in the batch: each segment's outputs are compared with the
    batch's rows (``TOKEN_ROWS_DIFFER`` otherwise: a capacity limit, or routing that depends on other
    examples' tokens), and the pieces' sum with autograd's gradient (:func:`_check_fallback_sums`).
    B calls of the module on k rows each: the work of one call, without vmap (an MoE layer's data-dependent
    control flow runs as it is). ``flattened`` = 1 with ``shared``: a call that vmap cannot run, each example's
    row alone; the inputs that ``shared`` marks (not batched: position ids, rotary tables) go whole to each."""
    label = f"{unit.name or '<root>'} ({type(unit.module).__name__})"
    out_leaves = flat_leaves(call.output)
    if isinstance(flattened, list):
        out_k = flattened  # rows of one example in each output
    else:
        out_k = [call.rows_per_example if flattened is None else flattened] * len(out_leaves)
    k = max(out_k, default=1)
    k_in = call.rows_per_example if flattened is None else 1  # rows of one example in the inputs
    in_leaves, in_spec = tree_flatten((call.args, call.kwargs))
    in_leaves = [t.detach() if isinstance(t, Tensor) else t for t in in_leaves]
    whole = shared or [False] * len(in_leaves)  # inputs every example gets whole (not batched)
    batched_in = [t for t, w in zip(in_leaves, whole) if not w]
    wanted = [*((t, batch_size * k_in) for t in batched_in), *((t, batch_size * j) for t, j in zip(out_leaves, out_k))]
    for t, want in wanted:
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] != want:
            raise NotExact(
                f"module {label}: a tensor of shape {tuple(t.shape)} is not one of {want} token rows",
                code="FALLBACK_NOT_BATCHED",
                module=label,
            )
    graded = [i for i, t in enumerate(out_leaves) if isinstance(t, Tensor) and i in call.out_grads]
    names = list(unit.params)
    frozen = {n_: p.detach() for n_, p in unit.module.named_parameters() if n_ not in unit.params}
    buffers = detached_buffers(unit.module)

    def rows(t: Any, b: int, k: int) -> Any:
        return t[b * k : (b + 1) * k] if isinstance(t, Tensor) and t.dim() > 0 else t

    # B forwards, each with its own parameter leaves (disjoint graphs); then one comparison with the batch's
    # rows per output, and one backward for all segments together (the graphs do not meet, so each segment's
    # leaves get that segment's gradient alone): B calls of the module, not B backward passes
    segments: list[dict[str, Tensor]] = []
    alone_leaves: list[list[Any]] = []
    outputs: list[Tensor] = []
    cotangents: list[Tensor] = []
    owners: list[int] = []  # the segment of each output
    with autocast_as(call.autocast), torch.enable_grad():
        for b in range(batch_size):
            params = {name: p.detach().requires_grad_() for name, p in unit.params.items()}
            args, kwargs = tree_unflatten([t if w else rows(t, b, k_in) for t, w in zip(in_leaves, whole)], in_spec)
            try:
                with RandomCalls(stop=True), ParameterReads(unit.params):  # (a draw would differ from the forward's)
                    leaves = flat_leaves(functional_call(unit.module, (params, frozen, buffers), args, kwargs))
            except NotExact:
                raise
            except RandomCallStop as stop:
                raise NotExact(
                    f"module {label} has no closed-form rule and draws random numbers ({stop}): its call on "
                    "one example's token rows cannot be recomputed with the forward's draws",
                    code="FALLBACK_NOT_ISOLATED",
                    module=label,
                ) from None
            except Exception as err:  # noqa: BLE001 - the module refuses a segment: not shown exact
                raise NotExact(
                    f"module {label} could not be called on one example's {k} token rows: {type(err).__name__}: {err}",
                    code="FALLBACK_NOT_ISOLATED",
                    module=label,
                ) from err
            segments.append(params)
            alone_leaves.append(leaves)
            for i in graded:
                if i < len(leaves) and isinstance(leaves[i], Tensor) and leaves[i].requires_grad:
                    outputs.append(leaves[i])
                    cotangents.append(rows(call.out_grads[i], b, out_k[i]) * grad_scale)
                    owners.append(b)
        differing = _first_differing_segment(alone_leaves, out_leaves, out_k)
        if differing is not None:
            b, i = differing
            raise NotExact(
                f"module {label}, called on example {b}'s {k} token rows alone, computes output {i} "
                "differently from those rows of the batch's call: its rows depend on other examples' "
                "tokens (an expert capacity, batch-dependent routing)",
                code="TOKEN_ROWS_DIFFER",
                module=label,
            )
        cotangents = _external_cotangents(outputs, cotangents)
        leaves_in = [p for params in segments for p in params.values()]
        grads: Sequence[Tensor | None] = (
            torch.autograd.grad(outputs, leaves_in, cotangents, allow_unused=True)
            if outputs
            else [None] * len(leaves_in)
        )
    per_example: dict[str, list[Tensor]] = {name: [] for name in names}
    flat = iter(zip(leaves_in, grads))
    for _ in range(batch_size):
        for name in names:
            p, g = next(flat)
            per_example[name].append(torch.zeros_like(p) if g is None else g.detach())
    return {name: DensePiece(at_least_float32(torch.stack(gs))) for name, gs in per_example.items()}


def _external_cotangents(outputs: list[Tensor], cotangents: list[Tensor]) -> list[Tensor]:
    """The part of each output's captured gradient that came from outside the module.

    A hook on an output sees all of its gradient, also what flows back into it from the module's other
    outputs computed from it (an MoE router returns its logits and the routing weights made from them:
    the logits' gradient holds the weights'). Fed as it is to a backward of all the outputs, that part
    would count twice. With D(i) the outputs computed from output i (found in the recomputed graph),
    processed downstream first: c_i,ext = c_i − (∂(y_D(i))/∂y_i)ᵀ c_D(i),ext.

    ``outputs`` may hold several segments' outputs, of graphs that do not meet: the outputs whose
    downstream outputs are all done are done together, in one backward (a y_j not computed from y_i adds
    nothing to y_i's part)."""
    if len(outputs) < 2:
        return list(cotangents)
    edges = {(y.grad_fn, y.output_nr): i for i, y in enumerate(outputs) if y.grad_fn is not None}
    below = []  # below[j]: indices i of the outputs that y_j is computed from
    for j, y in enumerate(outputs):
        seen, stack, found = set(), [y.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for nxt in node.next_functions:
                if nxt[0] is not None and nxt in edges:
                    found.add(edges[nxt])
                stack.append(nxt[0])
        below.append(found - {j})
    downstream = [[j for j in range(len(outputs)) if i in below[j]] for i in range(len(outputs))]
    external = list(cotangents)
    done = {i for i in range(len(outputs)) if not downstream[i]}
    while len(done) < len(outputs):
        ready = [i for i in range(len(outputs)) if i not in done and all(j in done for j in downstream[i])]
        if not ready:  # outputs computed from each other both ways cannot happen in a graph
            raise RuntimeError("persample: the module's outputs form a cycle")
        used = sorted({j for i in ready for j in downstream[i]})
        internal = torch.autograd.grad(
            [outputs[j] for j in used],
            [outputs[i] for i in ready],
            [external[j] for j in used],
            retain_graph=True,
            allow_unused=True,
        )
        for i, part in zip(ready, internal):
            if part is not None:
                external[i] = cotangents[i] - part
        done.update(ready)
    return external


def _first_differing_segment(alone: list[list[Any]], batched: list[Any], out_k: list[int]) -> tuple[int, int] | None:
    """The first (example, output) whose segment, computed alone, differs from the batch's rows
    (:func:`_same_rows`), or None; output i has ``out_k[i]`` rows per example. Each output's B segments are
    compared in one pass where they are tensors of the batch's row shape (one read of the result), else
    segment by segment."""
    for i, whole in enumerate(batched):
        if not isinstance(whole, Tensor):
            continue
        k = out_k[i]
        parts = [leaves[i] if i < len(leaves) else None for leaves in alone]
        tensors = [t for t in parts if isinstance(t, Tensor) and t.shape == (k, *whole.shape[1:])]
        if whole.dim() > 0 and len(tensors) == len(parts) and all(t.dtype == whole.dtype for t in tensors):
            stacked = torch.stack([t.detach() for t in tensors])
            if _same_segments(stacked, whole.detach().reshape(len(parts), k, *whole.shape[1:])):
                continue
        for b, t in enumerate(parts):
            if not _same_rows(t, whole[b * k : (b + 1) * k] if whole.dim() > 0 else whole):
                return b, i
    return None


def _same_segments(alone: Tensor, batched: Tensor) -> bool:
    """:func:`_same_rows` for every segment at once: ``[B, k, *]`` each, the tolerance relative to each
    segment's largest value."""
    if not alone.is_floating_point():
        return bool(torch.equal(alone, batched))
    tolerance = 1e-6 if batched.dtype == torch.float64 else 1e-5 if batched.element_size() >= 4 else 1e-2
    scale = (
        batched.abs().reshape(batched.shape[0], -1).amax(1) if batched.numel() else batched.new_zeros(batched.shape[0])
    )
    bound = (scale * tolerance).reshape(-1, *[1] * (batched.dim() - 1)) + tolerance * batched.abs()
    return bool(((alone - batched).abs() <= bound).all())


def _same_rows(alone: Any, batched: Any) -> bool:
    """Whether a segment's output equals the batch's rows: exactly for integers (expert indices), and for
    floating point to a rounding tolerance of its dtype (1e-6 float64, 1e-5 float32, 1e-2 half precision,
    relative to the largest value; a matmul of fewer rows may round differently). A routing that depends on
    other examples' tokens changes whole rows (a token dropped, another expert), far beyond that."""
    if not isinstance(alone, Tensor) or not isinstance(batched, Tensor) or alone.shape != batched.shape:
        return False
    batched = batched.detach()
    if not alone.is_floating_point():
        return bool(torch.equal(alone, batched))
    tolerance = 1e-6 if batched.dtype == torch.float64 else 1e-5 if batched.element_size() >= 4 else 1e-2
    scale = batched.abs().max().item() if batched.numel() else 0.0
    return bool(torch.allclose(alone.detach(), batched, rtol=tolerance, atol=tolerance * scale))


def _check_fallback_sums(
    units: list[Unit],
    pieces: dict[str, Piece],
    means: dict[str, Tensor],
    by_id: dict[int, str],
    checks: HostChecks | None = None,
) -> None:
    """A fallback is exact only if (1/B) Σ_i g_i equals autograd's gradient (batch dim really dim 0);
    a user's rule (:func:`persample.register_rule`) is held to the same check. With ``checks``, the
    fallbacks' check is added there (read with the step's other checks) instead of read now."""
    names = [by_id[id(p)] for unit in units if unit.rule is None for p in unit.params.values()]
    half = {
        by_id[id(p)]: half_precision_rtol(unit) for unit in units if unit.rule is None for p in unit.params.values()
    }
    fallbacks = {n: pieces[n] for n in names}
    flags = differing_flags(fallbacks, means, float64_rtol=1e-5, rtols={n: r for n, r in half.items() if r is not None})

    def mismatch(read: list | None = None) -> NotExact:
        differing = [n for n, bad in zip(fallbacks, flags.tolist() if read is None else read) if bad]  # type: ignore[union-attr]  # flags is set
        return NotExact(
            f"per-example gradients of {differing[0]!r} from torch.func do not add up to "
            "autograd's gradient: the module does not keep examples apart on dim 0",
            code="FALLBACK_SUM_MISMATCH",
        )

    if flags is not None and checks is not None:
        checks.add(flags.any(), mismatch)  # (the error reads which, only when it is raised)
    elif flags is not None:
        read = flags.tolist()
        if any(read):
            raise mismatch(read)
    checked = [
        by_id[id(p)]
        for unit in units
        if unit.rule is not None and unit.rule.user
        for p in unit.params.values()
        if id(p) in by_id
    ]
    differing = means_that_differ({n: pieces[n] for n in checked if n in pieces}, means, float64_rtol=1e-5)
    if differing:
        raise NotExact(
            f"per-example gradients of {differing[0]!r} from its registered rule do not add up to "
            "autograd's gradient: the rule is wrong for this module or call",
            code="CUSTOM_RULE_SUM_MISMATCH",
        )


#: Parameters with at most this many elements have their sums compared exactly (it is cheap).
EXACT_CHECK_NUMEL = 1 << 14


def half_precision_rtol(unit: Unit) -> float | None:
    """The tolerance of a fallback unit's sum check where autocast computed its calls in float16 or
    bfloat16 (else None: the float32 / float64 tolerances hold).

    Both sides of the check are computed in that dtype: autograd's gradient of the batch, and the
    per-example gradients of torch.func (then summed in float32). Each rounds its results to the compute
    dtype (relative error ≤ ε/2 per element, ε = ``torch.finfo(dtype).eps``) and reduces over the n rows of
    a call's input (the examples times their positions), a sum whose rounding grows as log2(n)·ε for the
    blocked and pairwise sums of matmul kernels. Hence rtol = ε·(2 + log2 n): 0.031 for a batch of 4 in
    bfloat16, 0.078 for 256 rows; an honest module differs by about ε/2 (2–4e-3 measured in bfloat16 at
    B = 4 to 256), a module that does not keep the examples apart by O(1).
    """
    eps, rows = 0.0, 1
    for call in unit.calls:
        dtypes = [dtype for _, enabled, dtype in (call.autocast or ()) if enabled]
        half = [torch.finfo(d).eps for d in dtypes if d in (torch.float16, torch.bfloat16)]
        if half:
            eps = max(eps, *half)
            leaves = [t for t in flat_leaves((call.args, call.kwargs)) if isinstance(t, Tensor) and t.dim() > 0]
            if leaves:
                rows = max(rows, leaves[0].numel() // max(leaves[0].shape[-1], 1) * len(unit.calls))
    return None if eps == 0.0 else eps * (2 + math.log2(rows))


#: A difference below ``rtol`` × this × the largest gradient compared (per element) is rounding: a gradient
#: that is 0 in exact arithmetic (a question-answering head's bias, shifted under a softmax over positions)
#: is ~ε × the gradients it is summed from, which a tolerance relative to itself alone would refuse.
MODEL_SCALE_FLOOR = 1e-3


def means_that_differ(
    pieces: dict[str, Piece],
    means: dict[str, Tensor],
    *,
    float64_rtol: float,
    rtol: float = 1e-3,
    rtols: dict[str, float] | None = None,
) -> list[str]:
    """The names whose (1/B) Σ_i g_i from the piece differs from ``means[name]`` by more than rounding
    (:func:`differing_flags`, read to the host: one device sync in all)."""
    flags = differing_flags(pieces, means, float64_rtol=float64_rtol, rtol=rtol, rtols=rtols)
    return [] if flags is None else [name for name, bad in zip(pieces, flags.tolist()) if bad]


def differing_flags(
    pieces: dict[str, Piece],
    means: dict[str, Tensor],
    *,
    float64_rtol: float,
    rtol: float = 1e-3,
    rtols: dict[str, float] | None = None,
    differences: dict[str, Tensor] | None = None,
) -> Tensor | None:
    """Per name of ``pieces``, in order, whether (1/B) Σ_i g_i from the piece differs from ``means[name]``
    by more than rounding, as a bool tensor on the device, unread (None when there is nothing to compare).

    A difference D is rounding when ‖D‖_∞ ≤ rtol_k · max(‖mean_k‖_∞, ``MODEL_SCALE_FLOOR`` · m, 1e-12), with
    rtol_k = ``float64_rtol`` in float64, ``rtol`` otherwise (``rtols`` raises it per name, for the pieces
    computed in half precision: :func:`half_precision_rtol`), and m the largest ‖mean_j‖_∞ of the compared
    parameters: a gradient that is zero in exact arithmetic is compared at the model's rounding, not at its
    own (~ε · m), and is no longer refused for its noise; any difference above that floor still is.

    Small parameters are compared whole. Larger ones are compared through a Gaussian probe V from
    a fixed seed (Freivalds; the global RNG is untouched): (1/B)·``projected_sum(V)`` against M·V for
    M = ``as_matrix(mean)``. A difference D ≠ 0 shows in D·V, whose entries are Gaussian with the
    spread of D's rows: one column when M has many rows, four otherwise (for m, ‖M·V‖_∞ is divided by
    √(columns of M), the gain of a Gaussian sum). The pieces' closed forms make this O(activations)
    instead of one more weight-gradient product per layer.

    ``differences``: D = (1/B) Σ_i g_i − ``means[name]`` already known for some names (a pass that formed
    the g_i for the statistics summed them too); D is then compared as above, whole or through the
    same probe, in place of the difference of the piece's sum and the mean: the same comparison.
    """
    constants: dict[tuple, Tensor] = {}  # probes and averaging weights, made once per shape
    rtols_by_name = rtols or {}
    known = differences or {}
    gaps, sizes, tolerances, gains = [], [], [], []
    for name, piece in pieces.items():
        if name in known:
            difference, expected, gain = _projected_difference(known[name], means[name], constants)
        else:
            got, expected, gain = _sum_and_expected(piece, means[name], constants)
            difference = got - expected
        gaps.append(torch.linalg.vector_norm(difference, float("inf")))
        sizes.append(torch.linalg.vector_norm(expected, float("inf")))
        gains.append(gain)
        base = float64_rtol if expected.dtype == torch.float64 else rtol
        tolerances.append(max(base, rtols_by_name.get(name, 0.0)))
    if not gaps:
        return None
    device = gaps[0].device  # parameters may live on several devices
    size = _as_float64_vector(sizes, device)
    largest = (size / torch.tensor(gains, dtype=torch.float64, device=device)).max()
    scale = torch.maximum(size, MODEL_SCALE_FLOOR * largest).clamp_min(1e-12)
    tolerance = torch.tensor(tolerances, dtype=torch.float64, device=device) * scale
    return _as_float64_vector(gaps, device) > tolerance


def _as_float64_vector(values: list[Tensor], device: torch.device) -> Tensor:
    """0-d tensors (maxima of |x|: exact in any float dtype) as one float64 vector on ``device``: one stack
    (which promotes to the widest dtype) and one cast where they share the device."""
    if all(v.device == device for v in values):
        return torch.stack(values).double()
    return torch.stack([v.double().to(device) for v in values])


def _sum_and_expected(piece: Piece, mean: Tensor, constants: dict) -> tuple[Tensor, Tensor, float]:
    """((1/B) Σ_i g_i, mean, 1) whole for small parameters; both times a probe V for larger ones, and
    √(columns of V's product), the gain of a Gaussian sum."""
    if mean.numel() <= EXACT_CHECK_NUMEL:
        key: tuple[Any, ...] = ("average", piece.batch_size, mean.dtype, mean.device)
        if key not in constants:
            constants[key] = torch.full(key[1:2], 1.0 / piece.batch_size, dtype=mean.dtype, device=mean.device)
        return piece.weighted_sum(constants[key]), mean, 1.0
    matrix = as_matrix(mean)
    probe = _probe(matrix, constants)
    gain = math.sqrt(max(matrix.shape[1], 1))
    return piece.projected_sum(probe) / piece.batch_size, matrix @ probe, gain


def _projected_difference(difference: Tensor, mean: Tensor, constants: dict) -> tuple[Tensor, Tensor, float]:
    """(D, mean, 1) whole for small parameters; both times the probe V of :func:`_sum_and_expected` for
    larger ones, and the gain: for a known D = (1/B) Σ_i g_i − mean, what that function's two results
    differ by."""
    if mean.numel() <= EXACT_CHECK_NUMEL:
        return difference, mean, 1.0
    matrix = as_matrix(mean)
    probe = _probe(matrix, constants)
    gain = math.sqrt(max(matrix.shape[1], 1))
    return as_matrix(difference.to(matrix.dtype)) @ probe, matrix @ probe, gain


#: Probes kept across calls, by (columns, probe columns, dtype, device): each is drawn from a seed fixed by
#: its shape, so a call finds the one it would draw (at most ``_PROBES_KEPT``; then drawn afresh).
_PROBES: dict[tuple, Tensor] = {}
_PROBES_KEPT = 256


def _probe(matrix: Tensor, constants: dict) -> Tensor:
    """The Gaussian probe V for a ``[rows, columns]`` matrix: one column when it has many rows, four
    otherwise; from a seed fixed by its shape (the global RNG is untouched), drawn once per shape and
    process (``_PROBES``), not once per call."""
    key = ("probe", matrix.shape[1], 1 if matrix.shape[0] >= 16 else 4, matrix.dtype, matrix.device)
    if key not in constants:
        probe = _PROBES.get(key)
        if probe is None:
            generator = torch.Generator(device=matrix.device).manual_seed(4 * key[1] + key[2])
            with torch.inference_mode(False):  # a plain tensor, whatever mode the first call ran in
                probe = torch.randn(key[1:3], generator=generator, dtype=matrix.dtype, device=matrix.device)
            if len(_PROBES) >= _PROBES_KEPT:
                _PROBES.clear()
            _PROBES[key] = probe
        constants[key] = probe
    return constants[key]


def _second_moments(
    pieces: dict[str, Piece], mean: dict[str, Tensor], known: dict[str, tuple] | None = None
) -> dict[str, Tensor]:
    """M2 per parameter, exact without catastrophic cancellation (see ``Piece.quick_centered_second_moment``;
    ``known``: (M2, suspect) pairs computed already, by ``Piece.moments``). The cancellation flags are read
    at once; inside a step's :func:`persample._host_reads.one_host_read`, with the step's other host reads,
    and the two-pass form then replaces the flagged entries of the returned dict in place."""
    known = known or {}
    quick = {
        name: known[name] if name in known else piece.quick_centered_second_moment(mean[name])
        for name, piece in pieces.items()
    }
    suspects = [name for name, (_, suspect) in quick.items() if suspect is not None]
    m2 = {name: value for name, (value, _) in quick.items()}
    if suspects:
        device = quick[suspects[0]][1].device
        flags = torch.stack([quick[name][1].to(device) for name in suspects])
        # Only the suspects' pieces and means are kept until the flags are read.
        suspected = {name: (pieces[name], mean[name]) for name in suspects}

        def two_pass_where_cancelled(cancelled: list[float]) -> None:
            if not any(cancelled):
                return
            # (read later: maybe inside the caller's autocast, or where the weights' check enables grad)
            with autocast_as(None), torch.no_grad():
                for name, flag in zip(suspected, cancelled):
                    if flag:
                        piece, piece_mean = suspected[name]
                        m2[name] = piece.centered_second_moment(piece_mean)

        step = open_checks()
        if step is None:
            two_pass_where_cancelled(flags.tolist())
        else:  # read with the step's other checks: m2 (in the GradStats) is final once they are read
            step.defer(flags, two_pass_where_cancelled)
    return m2


def reduce_pieces(
    pieces: dict[str, Piece],
    mean: dict[str, Tensor],
    losses: Tensor,
    *,
    var: bool,
    inner_products: bool,
    clip_norm: float | None,
    reference: dict[str, Tensor] | None = None,
    second_moments: dict[str, tuple] | None = None,
) -> GradStats:
    """GradStats from per-parameter pieces and ḡ = (1/B) Σ_i g_i (autograd's, or the pieces'); inner
    products p_i = ⟨g_i, r⟩ against ``reference`` r when given, else (with ``inner_products``) against ḡ.

    M2 = Σ_i (g_i − ḡ)² comes from ``second_moments`` or each piece's cheapest form; where a
    one-pass form (Σ_i g_i∘g_i − B ḡ∘ḡ) may have cancelled, from the two-pass form (one device
    sync in all).
    """
    n = losses.shape[0]
    m2 = _second_moments(pieces, mean, second_moments) if var else None  # first: pieces keep squares the norms reuse
    sq = {name: piece.sq_norms() for name, piece in pieces.items()}
    inner = None
    if reference is None and inner_products:
        reference = mean
    if reference is not None:
        inner = cast(Tensor, sum(piece.inner(reference[name].to(mean[name])) for name, piece in pieces.items()))
    clipped = None
    if clip_norm is not None:
        factors = clip_factors(torch.stack(list(sq.values())).sum(0), clip_norm)
        clipped = {name: piece.weighted_sum(factors) / n for name, piece in pieces.items()}
    return GradStats(
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
