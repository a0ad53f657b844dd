"""Statistics from the user's own ``loss.backward()``: the fast engine without a second pass.

Inside :func:`observing`, the user's forward and backward run unchanged while
the fast engine's hooks record each unit's inputs and output gradients. The
gradients are of the user's loss ℓ = w Σ_i L_i (a mean: w = 1/B; a sum: w = 1;
a token mean: w = 1/N_tokens; divided by accumulation steps or multiplied by a
loss scale: w times that), so they are rescaled by s = 1/w.

A wrong per-example loss must not give silently wrong statistics, and
comparing with ``p.grad`` alone cannot reveal it (every statistic scales
consistently). So two checks run after the backward:

1. **Weights**: the gradient of ℓ at the model's output must be w_i ∇_{o_i} L_i
   for every example, with one w (read off the gradients, see
   :func:`persample.batch_loss.derive_weights`; a declared ``reduction``
   also fixes w): one gradient of Σ_i L_i at the detached output (cheap: only
   the loss is redone, in closed form for standard losses).
2. **p.grad**: Σ_i g_i from the captured pieces must equal s times the increment
   of ``p.grad`` made by this backward; a loss with terms that are not
   per-example losses (a regulariser, a parameter used in the loss) fails here.
   Compared through random probes (:func:`.engine.differing_flags`), at the
   cost of the activations rather than of another weight gradient.

Either failure raises :class:`ObservationError`.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_unflatten

from ..._batch import Batch, flat_leaves, tensors_in
from ..._model import autocast_as, autocast_state, buffer_state
from ..._host_reads import HostChecks, one_host_read
from ...batch_loss import BatchLossMismatch, all_finite, common_weight, derive_weights, host_weights
from ...errors import NotExact, ObservationError
from ...stats import GradStats
from .audit import audit_graph, rows_check
from .capture import capturing
from .in_place import modified_in_place
from .units import store_grad
from .alone import check_alone, spot_check_off
from .alone import signature as alone_signature
from .plan import checked_alone, model_plan, remember_alone, widened_refusal
from .engine import (
    EXACT_CHECK_NUMEL,
    _pieces_by_parameter,
    differing_flags,
    output_leaves,
    per_example_losses,
    reduce_pieces,
    weighted_sums,
)
from .losses import example_weights, standard_losses, traced_standard_loss
from .model_loss import observed_model_losses
from .pieces import ConvPiece, OuterPiece, Piece
from .rules import Layout

__all__ = ["observing", "Observation", "ObservationError", "REDUCTIONS", "formed_parameters", "summed_gradients"]

REDUCTIONS = (None, "mean", "sum")


@dataclass
class Observation:
    """Filled in when the ``with`` block exits: ``stats`` (None until then)."""

    stats: GradStats | None = None
    skipped: bool = False
    _output: Any = None
    _output_grads: dict = field(default_factory=dict)
    _audit: Any = None
    _rows: Any = None  # the probe of the rows at the end of the forward (audit.rows_check): a Finding or None
    _roots: Any = None
    _before: dict = field(default_factory=dict)
    _params: dict = field(default_factory=dict)
    _on_rebase: list = field(default_factory=list)  # callables that take their own baseline too
    _inputs: dict | None = None  # the model's keyword inputs of the observed forward (labels=: its own loss)
    # the spot check against the definition (.alone), where this forward's signature has no verdict yet:
    # (the observed forward's batch, its signature, the buffers as the forward found them, its autocast)
    _spot: tuple | None = None
    _replayable: bool = False  # no random draw, no re-entrant recomputation: example j can run alone
    _units: list = field(default_factory=list)  # the model's units (their calls once the forward ran)
    _capture: Any = None
    _batch_size: int = 0
    # parameters whose backward skipped autograd's weight-gradient product (set by the caller between the
    # forward and the backward, :func:`formed_parameters`): their mean is Σ_i g_i of their pieces
    derived: frozenset = frozenset()
    weight: float | None = None  # w of the backwarded loss ℓ = w Σ_i L_i, once the statistics are built
    # s where the caller backwards s · loss_fn(output, targets) itself (Tracker.step under FSDP2), set between
    # the forward and the backward: a standard loss's weights are then its form's (:func:`_weights_by_form`)
    loss_scale: float | None = None

    def rebase_grads(self) -> None:
        """Take ``p.grad`` as it is now as the baseline of the backward's increment.

        Call it between the forward and the backward when something else changes ``p.grad`` there
        (Lightning zero-grads after ``training_step``, before ``backward``)."""
        self._before = _grad_snapshot(self._params)
        for rebase in self._on_rebase:
            rebase()


@contextlib.contextmanager
def observing(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    targets: Any,
    *,
    batch_size: int,
    reduction: str | None = None,
    var: bool = True,
    inner_products: bool = False,
    output_module: nn.Module | None = None,
    reference: dict[str, Tensor] | None = None,
    wrapper: nn.Module | None = None,
    inputs_of_model: bool = False,
) -> Iterator[Observation]:
    """Capture one forward + ``loss.backward()`` of ``model`` and build its GradStats on exit.

    ``output_module``: the submodule whose output the loss is computed from (default: ``model``),
    for models that compute their loss inside ``forward`` from, say, their ``lm_head``'s logits.
    ``reference``: a fixed direction r for the inner products p_i = ⟨g_i, r⟩ (default: ḡ).
    ``wrapper``: a module around ``model`` whose forward passes what it computed from the output on,
    unchanged in value and gradient (DDP's ``_DDPSink``, which the op watchers cannot see): the tensors it
    returns count as computed from the output, not as activations of the model.
    ``inputs_of_model``: with ``output_module`` a module that calls ``model`` (DDP's wrapper), the spot
    check still reads the observed inputs from ``model``'s own forward (the wrapper passes them on)."""
    if batch_size < 1:
        raise ValueError(
            f"observe() needs a batch with at least one example; the targets say {batch_size} "
            "(an empty batch has no per-example gradients: skip the step)"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    params, units, _, sharding = model_plan(model)  # the model's structure: found once, then fingerprinted
    observation = Observation(_params=params, _before=_grad_snapshot(params), _units=units, _batch_size=batch_size)
    names = {id(p): n for n, p in params.items()}

    with capturing(units, model, batch_size, sharding=sharding) as capture:
        observation._capture = capture

        def root_hook(module, args, output):  # after the capture's own hook on that module (registered later)
            if observation._output is not None:  # a later call (Lightning's DDP redirects training_step through
                return  # the module's forward, around the real one; a recomputation): not the observed forward
            observation._output = output
            leaves = flat_leaves(output)
            with torch._C.DisableTorchFunction():  # the capture's watchers see the model's hooks, not ours
                interior = _interior_leaves(leaves, batch_size)
                for i, leaf in enumerate(leaves):
                    if isinstance(leaf, Tensor) and leaf.requires_grad and i not in interior:
                        leaf.register_hook(store_grad(observation._output_grads, i))
            observation._roots = [t for t in leaves if isinstance(t, Tensor) and t.grad_fn is not None]
            capture.stop_recording()  # later unit calls are not this forward's (checkpoint recomputations)
            if capture.no_grad_calls:  # re-entrant checkpointing? its blocks' calls come in the backward
                with torch._C.DisableTorchFunction():
                    capture.follow_checkpoints(observation._roots)
            # the loss may read these, and what it computes from them; an interior output read by the loss
            # is an activation like any other (a term the output-gradient check cannot see)
            capture.watch_loss([t for i, t in enumerate(leaves) if i not in interior])
            # every unit's calls are recorded by now; the probe of the rows (audit.rows_check) needs the
            # graph, which the loop's backward frees: its verdict goes to the audit after the backward
            observation._rows = rows_check(observation._roots, units, batch_size)

        def wrapper_hook(module, args, output):
            if capture.user_watcher.outputs is not None:  # after the model's forward: its output passed on
                with torch._C.DisableTorchFunction():
                    for t in tensors_in(output):
                        if t.requires_grad:
                            capture.user_watcher.after_forward[id(t)] = t

        def root_hook_with_inputs(module, args, kwargs, output):
            if observation._output is None:
                observation._inputs = dict(kwargs)
            root_hook(module, args, output)

        def root_pre_hook(module, args, kwargs):  # the inputs, and the buffers as the forward finds them
            if observation._output is None and observation._spot is None:
                with torch._C.DisableTorchFunction():  # the capture's watchers see the model, not us
                    observation._spot = _spot_check_call(model, args, kwargs, targets, batch_size)

        handles = [
            model.register_forward_hook(root_hook_with_inputs, with_kwargs=True)
            if output_module is None
            else output_module.register_forward_hook(root_hook)
        ]
        if (output_module is None or inputs_of_model) and sharding is None and not spot_check_off():
            handles.append(model.register_forward_pre_hook(root_pre_hook, with_kwargs=True))
        if wrapper is not None:
            handles.append(wrapper.register_forward_hook(wrapper_hook))
        try:
            yield observation
        finally:
            for handle in handles:
                handle.remove()
        with _naming_the_setting(model):
            if observation._roots is not None:  # after the forward: every unit's calls are recorded by now
                observation._audit = audit_graph(
                    observation._roots,
                    units,
                    names,
                    batch_size=batch_size,
                    recomputed=capture.recomputed,
                    rows=observation._rows,
                )
            capture.end_forward()
            observation._replayable = capture.random_call is None and not capture.recomputed
            if capture.auxiliary_term is not None:
                raise ObservationError(
                    f"the backwarded loss has a term computed from an activation of the model other than its "
                    f"output ({capture.auxiliary_term}: an auxiliary loss, an activation penalty, a second "
                    "head?). Its gradient reaches the layers below that activation, so the statistics would "
                    "describe the gradient of the whole sum, not of the per-example loss of the output. Keep "
                    "such terms out of the observed backward, or use persample.grad_stats with a loss_fn of "
                    "the output alone",
                    code="OBSERVE_AUXILIARY_TERM",
                )
            if capture.escape is not None:
                raise NotExact(capture.escape)
    with _naming_the_setting(model), autocast_as(None):  # statistics in float32 or better, whatever the autocast
        observation.stats = _observed_stats(
            observation,
            params,
            observation._before,
            units,
            loss_fn,
            targets,
            batch_size,
            reduction,
            var,
            inner_products,
            reference,
            model,
        )


#: A module path inside a PEFT LoRA adapter: the LoRA layer's path, then the adapter's part.
_PEFT_PART = re.compile(r"([\w.]+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\b")

_FALLBACK_FIX = (
    "on_refusal='fallback' (Tracker(..., on_refusal='fallback'); track(trainer, on_refusal='fallback'); "
    "PersampleCallback(..., on_refusal='fallback')) computes such a step's statistics with the exact engines "
    "on the same batch"
)


def peft_setting(model: nn.Module, message: str) -> str | None:
    """The PEFT setting behind a refusal whose message names a module inside a LoRA adapter, in words,
    with the fix where one is known to work; None where the message names none.

    DoRA (``LoraConfig(use_dora=True)``) computes each adapted layer's weight norm by calling ``lora_A`` on
    an identity matrix, which is not a batch of examples: the fast engine cannot split that call per
    example and refuses; the exact engines (``on_refusal='fallback'``) are exact on it."""
    found = _PEFT_PART.search(message)
    if found is None:
        return None
    path = found.group(1)
    layer = dict(model.named_modules()).get(path)
    if layer is None or not type(layer).__module__.startswith("peft."):
        return None
    dora = getattr(layer, "use_dora", None)
    if isinstance(dora, dict) and any(dora.values()):
        return (
            f"the setting that causes it: PEFT's DoRA (LoraConfig(use_dora=True)) on {path}, which calls its "
            f"adapter on an identity matrix to compute the weight norm; fix: {_FALLBACK_FIX}, or "
            "LoraConfig(use_dora=False)"
        )
    return f"the setting involved: PEFT's LoRA adapter on {path}"


@contextlib.contextmanager
def _naming_the_setting(model: nn.Module) -> Iterator[None]:
    """Re-raise a refusal from within with the training setting that causes it named (:func:`peft_setting`)."""
    try:
        yield
    except (NotExact, ObservationError) as err:
        setting = peft_setting(model, Exception.__str__(err))
        if setting is None:
            raise
        raise type(err)(f"{Exception.__str__(err)}; {setting}", code=err.code, module=err.module, fix=err.fix) from err


def _observed_stats(
    observation: Observation,
    params,
    before,
    units,
    loss_fn,
    targets,
    batch_size,
    reduction,
    var,
    inner_products,
    reference=None,
    model=None,
) -> GradStats | None:
    if observation._output is None or not observation._output_grads:
        raise ObservationError(
            "no forward of the model reached a backward inside the block: run "
            "`loss_fn(model(inputs), targets).backward()` inside `with tracker.observe(...)`",
            code="OBSERVE_NO_BACKWARD",
        )
    escape = observation._audit.escape
    if escape is not None:  # (a widening helps the next step: this one's backward has run)
        raise NotExact(escape) if model is None else widened_refusal(model, escape)
    modified = modified_in_place(units)
    if modified is not None:
        raise NotExact(modified)
    # The host reads of what follows are two: the output gradients' finiteness with the weights' checks
    # and values (read where the weights are derived), then the sums' check with the second moments'
    # cancellation flags (when the block ends). Each check still fires as if read where it is added.
    try:
        with one_host_read() as step_reads:
            grads = list(observation._output_grads.values())
            device = grads[0].device
            # an overflowing fp16 step: GradScaler skips it, and so do the statistics
            step_reads.add(~torch.stack([all_finite(g).to(device) for g in grads]).all(), _NotFinite)
            try:
                losses, weight = _check_reduction(observation, loss_fn, targets, batch_size, reduction, model)
                observation.weight = weight
                scale = 1.0 / weight  # output gradients × scale are the gradients of Σ_i L_i
                half = _captured_half(units)
                derived = observation.derived
                means = {
                    n: _mean_from_increment(p, before[n], scale / batch_size)
                    for n, p in params.items()
                    if n not in derived
                }
                layout = Layout(batch_size, dim_zero_moved=observation._audit.dim_zero_moved, grad_scale=scale)
                pieces = _pieces_by_parameter(units, params, means, layout, checks=step_reads)
                compared = {n: piece for n, piece in pieces.items() if n not in derived}
                differences, second = _formed_sums(compared, means, var)
                _check_against_grad(
                    compared, means, rtol=3e-2 if half else 1e-3, checks=step_reads, differences=differences
                )
                if derived:  # no p.grad increment: ḡ (and M2) from the one formation of their g_i, as the
                    moments = {n: pieces[n].moments(var) for n in derived}  # fast engine's derived parameters
                    means.update({n: mean for n, (mean, _, _) in moments.items()})
                    means = {n: means[n] for n in params}  # named_parameters() order
                    if second is not None:
                        second.update({n: (m2, suspect) for n, (_, m2, suspect) in moments.items()})
                stats = reduce_pieces(
                    pieces,
                    means,
                    losses,
                    var=var,
                    inner_products=inner_products,
                    clip_norm=None,
                    reference=reference,
                    second_moments=second,
                )
            except BaseException:
                step_reads.raise_first()  # a check added before failed (gradients not finite): that error
                raise
    except _NotFinite:
        observation.skipped = True
        return None
    if observation._spot is not None and observation._replayable:
        batch, key, buffers_found, autocast = observation._spot
        with autocast_as(autocast):  # example j alone runs as the observed forward ran (bf16 autocast, ...)
            checked = check_alone(model, loss_fn, batch, params, pieces, losses.detach(), buffers_found)
        if checked.verdict:
            remember_alone(model, key)
    return stats


def formed_parameters(observation: Observation, var: bool) -> set[str]:
    """Between the forward and the backward of an observed step: the names of the parameters whose
    statistics form every g_i anyway (the fast engine's :func:`.engine.derived_parameters` on the
    observed calls), so that Σ_i g_i from that formation can stand for autograd's weight-gradient
    product, which a caller running the backward itself may then skip (setting ``derived``). None
    where the capture followed re-entrant checkpoints (their calls come in the backward)."""
    from .engine import derived_parameters

    capture = observation._capture
    if capture is None or observation._output is None or capture.no_grad_calls or capture.recomputed:
        return set()
    return derived_parameters(observation._units, observation._params, var)


def summed_gradients(observation: Observation, names: set[str]) -> dict[str, Tensor]:
    """Σ_i of the backwarded loss's gradients for the parameters ``names`` (whose backward skipped autograd's
    product, ``derived``), from their units' captured inputs and output gradients: the gradient the skipped
    product would have given, in closed form. For a step whose statistics are not built (output gradients
    that are not finite), where the formation's sums are not there."""
    params = observation._params
    ids = {id(params[n]) for n in names}
    units = [u for u in observation._units if any(id(p) in ids for p in u.params.values())]
    owned = {n: p for n, p in params.items() if any(q is p for u in units for q in u.params.values())}
    moved = observation._audit.dim_zero_moved if observation._audit is not None else False
    layout = Layout(observation._batch_size, dim_zero_moved=moved, grad_scale=1.0)
    with autocast_as(None):
        pieces = _pieces_by_parameter(units, owned, {}, layout)
    ones = torch.ones(observation._batch_size, dtype=torch.float64)
    return weighted_sums({n: pieces[n] for n in names}, params, ones)


def _spot_check_call(model: nn.Module, args: tuple, kwargs: dict, targets: Any, batch_size: int) -> tuple | None:
    """(batch, signature, buffers, autocast settings) for the spot check of the observed forward
    ``model(*args, **kwargs)``, or None where it has none: a batch of one, a verdict already in the plan
    for this signature, or inputs that are not all batched on dim 0 (a tensor shared by the batch, a
    non-tensor positional argument: a batch of one of them is not defined, so observe relies on the graph
    audit alone there)."""
    if batch_size < 2:
        return None
    options = {k: v for k, v in kwargs.items() if not isinstance(v, Tensor) and not tensors_in(v)}
    data = {k: v for k, v in kwargs.items() if k not in options}
    leaves = flat_leaves((args, data, targets))
    if not all(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch_size for t in leaves if t is not None):
        return None
    if any(t is None for t in flat_leaves(args)):
        return None
    batch = Batch(tuple(args), data, targets, batch_size, options)
    key = alone_signature(batch)
    return None if checked_alone(model, key) else (batch, key, buffer_state(model), autocast_state())


class _NotFinite(Exception):
    """Internal: the observed backward's output gradients are not finite (the step has no statistics)."""


def _interior_leaves(leaves: list, batch_size: int) -> set[int]:
    """Indices of the output tensors that other outputs batched over the examples are computed from
    (``last_hidden_state`` and ``encoder_last_hidden_state`` next to the ``logits`` computed from them):
    their gradient in the backward is that of the later layers, not the loss's at the output, so it says
    nothing of the loss's weights; a loss that reads them has a term of an activation (see
    ``watch_loss``). A scalar computed from the others (``out.loss``, computed inside the model) makes
    none of them interior: its gradient at them is the loss's; and an output such a scalar reads other
    than through the batched outputs (a router's auxiliary loss, inside the model) is not interior either,
    so the weight check sees that term and refuses."""
    nodes: dict = {}
    for i, t in enumerate(leaves):
        if isinstance(t, Tensor) and t.grad_fn is not None:
            nodes.setdefault(t.grad_fn, []).append(i)
    if len(nodes) < 2:
        return set()
    batched = {
        t.grad_fn
        for t in leaves
        if isinstance(t, Tensor) and t.grad_fn is not None and t.dim() > 0 and t.shape[0] == batch_size
    }
    seen: set = set()
    stack = [nxt for node in batched for nxt, _ in node.next_functions if nxt is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    interior = {node for node in nodes if node in seen}
    stack = [node for node in nodes if node not in batched]  # scalars: a loss computed inside the model
    reached: set = set()
    while stack:
        node = stack.pop()
        if node in reached or (node in batched and node not in interior):  # the loss of a batched output
            continue
        reached.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return {i for node in interior - reached for i in nodes[node]}


def _grad_snapshot(params) -> dict:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()}


def _captured_half(units) -> bool:
    """Whether the forward ran in half precision (autocast): the rules upcast what they read to
    float32 (``engine.at_least_float32``), but sums then agree with ``p.grad`` only to that precision."""
    return any(
        t.dtype in (torch.float16, torch.bfloat16)
        for unit in units
        for call in unit.calls
        for t in tensors_in((call.args, call.out_grads))
    )


def _mean_from_increment(p: nn.Parameter, before: Tensor | None, factor: float) -> Tensor:
    """factor · (p.grad − before), a new tensor in float32 or wider (statistics must not alias
    ``p.grad``, and are kept in float32 whatever the autocast or parameter dtype)."""
    dtype = p.dtype if p.dtype in _WIDE else torch.promote_types(p.dtype, torch.float32)
    if p.grad is None:
        return torch.zeros_like(p, dtype=dtype)
    grad = p.grad.detach()
    grad = grad.to_dense() if grad.is_sparse else grad  # nn.Embedding(sparse=True)
    before = before.to_dense() if before is not None and before.is_sparse else before
    if before is None and grad.dtype == dtype and factor != 1.0:
        return torch.mul(grad, factor)  # one pass: the same rounding as a copy scaled in place
    increment = grad.to(dtype, copy=True) if before is None else grad.to(dtype) - before
    return increment.mul_(factor) if factor != 1.0 else increment


_WIDE = (torch.float32, torch.float64)


def _check_reduction(
    observation: Observation, loss_fn, targets, batch_size: int, reduction: str | None, model=None
) -> tuple[Tensor, float]:
    """Per-example losses and the weight w of the backwarded loss ℓ = w Σ_i L_i, after checking
    ∂ℓ/∂o_i = w ∇_{o_i} L_i for every example (:func:`persample.batch_loss.derive_weights`; for a
    Hugging Face model's own ``out.loss``, :func:`.model_loss.observed_model_losses`)."""
    by_form = _weights_by_form(observation, loss_fn, targets, batch_size)
    if by_form is not None:
        return _checked_weight(*by_form, None, batch_size, reduction, half=False)
    leaves, spec, batched = output_leaves(observation._output, batch_size)
    differentiable = [i for i, t in enumerate(leaves) if i in observation._output_grads and batched[i]]
    detached = []
    for i, t in enumerate(leaves):
        if isinstance(t, Tensor):
            t = t.detach()
            if i in differentiable:  # half-precision outputs (autocast) are compared in float32
                t = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t.clone()).requires_grad_(True)
        detached.append(t)
    own = (
        None
        if model is None
        else observed_model_losses(
            model, loss_fn, observation._output, observation._inputs, targets, detached, observation._output_grads
        )
    )
    if own is not None:
        losses, w = own[0].losses, own[1]
    else:
        losses, w = _weights_of_output(observation, loss_fn, targets, batch_size, detached, spec, differentiable)
    half = any(observation._output_grads[i].dtype in (torch.float16, torch.bfloat16) for i in differentiable)
    return _checked_weight(losses, w, own, batch_size, reduction, half)


def _weights_by_form(observation: Observation, loss_fn, targets, batch_size: int) -> tuple[Tensor, Tensor] | None:
    """(L_i, w_i) where the caller backwarded s · ``loss_fn(output, targets)`` itself (``loss_scale`` s) and
    ``loss_fn`` is a standard loss (:mod:`.losses`): w_i = s · D_i / Σ_j D_j by its form
    (:func:`.losses.example_weights`), with no evaluation or derivation at the output; the D_i are read with
    the step's other reads. None otherwise, or where every target is ignored (the derivation then tells)."""
    if observation.loss_scale is None:
        return None
    call = traced_standard_loss(loss_fn, observation._output, targets, batch_size)
    if call is None or call.source is None:
        return None
    with torch.no_grad():
        losses = standard_losses(call)
        if losses is None:
            return None
        counts = HostChecks().resolve(example_weights(call))
    total = math.fsum(counts)
    if not total > 0:
        return None
    if losses.dtype in (torch.float16, torch.bfloat16):
        losses = losses.float()
    return losses, host_weights([observation.loss_scale * d / total for d in counts])


def _checked_weight(
    losses: Tensor, w: Tensor, own, batch_size: int, reduction: str | None, half: bool
) -> tuple[Tensor, float]:
    """(L_i, w) of :func:`_check_reduction` from the weights w_i: their common value w, checked against
    ``reduction``; ``own``: the Hugging Face model's own loss the w_i come from, or None."""
    weight = common_weight(w, rtol=2e-2 if half else 1e-5)  # half precision: w_i carry its rounding
    if weight is None and own is not None:
        raise ObservationError(
            f"the model's own loss weighs the examples differently (w_i from {w.min().item():.4g} to "
            f"{w.max().item():.4g}: a token mean over the batch weighs example i by its share n_i / N of the "
            "tokens), and observe() needs ℓ = w Σ_i L_i. Give the Tracker a loss whose per-example losses "
            "the backward weighs equally (persample.causal_lm_loss(): each example's summed token loss), or "
            "use tracker.step",
            code="OBSERVE_WEIGHTS_DIFFER",
        )
    if weight is None:
        raise ObservationError(
            "the examples weigh differently in the backwarded loss (w_i from "
            f"{w.min().item():.4g} to {w.max().item():.4g}; class weights?): observe() needs ℓ = w Σ_i L_i. "
            "Use a per-example loss that carries the weights (persample.BatchLoss(loss_fn, per_example=<the "
            "loss with reduction='sum'>)), or tracker.step",
            code="OBSERVE_WEIGHTS_DIFFER",
        )
    if weight <= 0:
        raise ObservationError(
            "the backwarded loss has no gradient at the model output (or decreases with the per-example losses)",
            code="OBSERVE_NO_OUTPUT_GRADIENT",
        )
    expected = {"mean": 1.0 / batch_size, "sum": 1.0}.get(reduction)  # type: ignore[arg-type]  # .get(None) is None
    if reduction is not None and expected is None:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if expected is not None and abs(weight - expected) > 1e-3 * expected:
        hint = f"observed / expected ≈ {weight / expected:.4g}"
        if abs(weight - 1.0) < 0.05:
            hint += ", as if the loss were summed: reduction='sum'?"
        elif abs(weight * batch_size - 1) < 0.05:
            hint += ", as if the loss were averaged: reduction='mean'?"
        raise ObservationError(
            f"the loss's gradient at the model output does not match reduction={reduction!r} of the "
            f"per-example losses loss_fn(output_i, target_i) ({hint}); the statistics would be wrong. "
            "Declare the reduction the loss really uses (reduction=None reads it from the backward), "
            "or pass the targets that the loss uses.",
            code="OBSERVE_REDUCTION_MISMATCH",
        )
    return losses.detach(), weight


def _weights_of_output(observation: Observation, loss_fn, targets, batch_size: int, detached, spec, differentiable):
    """Per-example losses ``loss_fn`` on each example's output, and the weights w_i of the backwarded loss
    at the output (:func:`persample.batch_loss.derive_weights`)."""
    closed = _cross_entropy_at_output(loss_fn, detached, spec, targets, differentiable)
    if closed is not None:
        losses, grads = closed
    else:
        losses, grads = _losses_and_gradients(loss_fn, targets, batch_size, detached, spec, differentiable)
    observed = [observation._output_grads[i] for i in differentiable]
    try:
        w = derive_weights(observed, list(grads), batch_size, what="the backwarded loss")
    except BatchLossMismatch as err:
        raise ObservationError(
            f"{err}. Declare the per-example loss the backward really combines, or pass the targets that the loss uses",
            code="OBSERVE_NOT_WEIGHTED_SUM",
        ) from None
    return losses, w


def _cross_entropy_at_output(loss_fn, detached: list, spec, targets, differentiable: list[int]):
    """(L_i, ∇_o Σ_i L_i at each differentiable output leaf) in closed form where ``loss_fn`` is a plain
    cross-entropy (:mod:`.losses`: traced, mean reduction) of class indices ``[B]`` on a ``[B, C]`` output
    leaf, without class weights or label smoothing: ∇_{o_i} L_i = softmax(o_i) − e_{y_i}, and 0 for an
    example whose target is ignored (as autograd gives there; its L_i is 0/0, NaN, as the loss gives).
    None otherwise: autograd then differentiates the closed-form or vmapped losses
    (:func:`_losses_and_gradients`), as it does here for every other loss."""
    call = traced_standard_loss(loss_fn, tree_unflatten(detached, spec), targets)
    if call is None or call.kind != "ce":
        return None
    x, y, options = call.input, call.target, call.options
    index = next((i for i in differentiable if detached[i] is x), None)
    if (
        options.get("weight") is not None
        or options.get("label_smoothing")
        or index is None
        or x.dim() != 2
        or y.dim() != 1
        or y.dtype != torch.long
        or y.shape[0] != x.shape[0]
        or x.shape[1] == 0
    ):
        return None
    with torch.no_grad():
        losses = standard_losses(call)  # L_i = ℓ_i / [y_i kept]; None: not the mean reduction
        if losses is None:
            return None
        kept = (y != options.get("ignore_index", -100)).unsqueeze(1)
        gradient = torch.softmax(x, dim=1)
        # −1 at each kept example's target; an ignored example's row is zeroed below (any in-range column)
        gradient.scatter_add_(1, torch.where(kept, y.unsqueeze(1), 0).long(), kept.to(gradient.dtype).neg())
        gradient.mul_(kept)
    return losses, [gradient if i == index else None for i in differentiable]


def _losses_and_gradients(loss_fn, targets, batch_size: int, detached: list, spec, differentiable: list[int]):
    """(L_i, ∇_o Σ_i L_i at each differentiable output leaf) by autograd through ``per_example_losses``."""
    with torch.enable_grad():
        losses = per_example_losses(loss_fn, tree_unflatten(detached, spec), targets, batch_size)
        if not losses.requires_grad:
            raise ObservationError(
                "loss_fn(output, targets) does not depend on the model's batched outputs: is the loss computed "
                "inside the model (`lambda out: out.loss`) of a model that is not a Hugging Face head with "
                "its labels among the keyword inputs? observe() recomputes each example's loss from the "
                "model's output, so give the Tracker a loss_fn of the output and the targets (for causal LMs "
                "persample.causal_lm_loss(), with the labels as targets)",
                code="OBSERVE_LOSS_NOT_FROM_OUTPUT",
            )
        grads = torch.autograd.grad(losses.sum(), [detached[i] for i in differentiable], allow_unused=True)
    return losses, list(grads)


def _sum_from_formation(piece: Piece, var: bool) -> bool:
    """Whether the check of this piece's Σ_i g_i against ``p.grad`` is cheaper from the pass that forms
    its g_i for the statistics anyway (:func:`_formed_sums`: one more read of each formed chunk) than
    from the piece's own closed form: a convolution's (``projected_sum`` is its whole weight-gradient
    convolution once more), and a Linear map's on T > 1 positions where the statistics form its g_i
    (with the variance, or for the norms where the ghost norm costs more) and either T·(p + d) > p·d
    (its projected sum over the activations then reads more than the formed g_i) or, with the variance,
    the parameter is small enough to be compared whole (``EXACT_CHECK_NUMEL``: its closed form is then
    Σ_i g_i itself, a weight-gradient product over all B·T positions, T times the sums of the formed
    g_i). Only the cost depends on this: every other piece is checked by its closed form, as before."""
    kind = type(piece)
    if kind is OuterPiece:
        if piece.positions == 1:  # type: ignore[attr-defined]  # an OuterPiece
            return False
        if not piece._ghost_is_cheaper():  # type: ignore[attr-defined]  # an OuterPiece
            return True
        return var and piece.shape.numel() <= EXACT_CHECK_NUMEL
    return kind is ConvPiece


def _formed_sums(
    pieces: dict[str, Piece], means: dict[str, Tensor], var: bool
) -> tuple[dict[str, Tensor], dict[str, tuple] | None]:
    """(D per name, (M2, None) per name with ``var``) for the pieces whose statistics form their g_i
    anyway and whose check is cheaper from them (:func:`_sum_from_formation`), from that one formation.

    With the variance the pass goes over the chunks around ḡ, the mean of the p.grad increment: with
    d_i = g_i − ḡ it adds D = (1/B) Σ_i d_i = (1/B) Σ_i g_i − ḡ, the difference that the check of the sum
    against ``p.grad`` compares (:func:`.engine.differing_flags`, whole or through the same probe: the
    same comparison, without a second product of the whole batch such as a convolution's weight
    gradient), and M2 = Σ_i d_i², the two-pass form ``centered_second_moment(ḡ)`` gives (exact, nothing
    to flag). Without it the pass adds Σ_i g_i as it is formed (no centring), and D = (1/B) Σ_i g_i − ḡ.
    Either way the norms ‖g_i‖² are kept from the same chunks."""
    differences: dict[str, Tensor] = {}
    second: dict[str, tuple] = {}
    for name, piece in pieces.items():
        if not _sum_from_formation(piece, var):
            continue
        if var:
            _, total, squares = piece._chunk_pass(means[name], sums=True, squares=True)
            assert total is not None and squares is not None  # summed around a given centre
            differences[name] = piece._scaled(total.view(piece.shape)).div_(piece.batch_size)
            second[name] = (piece._scaled(squares.view(piece.shape), 2), None)
        else:
            _, total, _ = piece._chunk_pass(sums=True, squares=False)
            assert total is not None  # no centre, no shift: summed as formed
            differences[name] = torch.sub(piece._scaled(total.view(piece.shape)).div_(piece.batch_size), means[name])
    return differences, (second if var else None)


def _check_against_grad(
    pieces,
    means,
    rtol: float = 1e-3,
    checks: HostChecks | None = None,
    differences: dict[str, Tensor] | None = None,
) -> None:
    """Σ_i g_i of the pieces against the p.grad increment (``rtol`` outside float64: 3e-2 when the
    forward ran in half precision, whose rounding the two sides carry differently); read when
    ``checks`` are (now without them). ``differences``: (1/B) Σ_i g_i − mean where it is known already
    (:func:`_formed_sums`)."""
    flags = differing_flags(pieces, means, float64_rtol=1e-6, rtol=rtol, differences=differences)
    if flags is None:
        return
    names = list(pieces)

    def mismatch(read: list | None = None) -> ObservationError:
        differing = [name for name, bad in zip(names, flags.tolist() if read is None else read) if bad]
        return ObservationError(
            f"per-example gradients of {differing[0]!r} do not add up to the change in its p.grad: the loss "
            "has terms that are not per-example losses of the model's output (a regulariser, say), "
            "or another backward ran inside the block",
            code="OBSERVE_SUM_MISMATCH",
        )

    if checks is not None:
        checks.add(flags.any(), mismatch)  # (the error reads which, only when it is raised)
        return
    read = flags.tolist()
    if any(read):
        raise mismatch(read)
