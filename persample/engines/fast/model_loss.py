"""Per-example losses of a Hugging Face model's own loss (``labels=``), recomputed from its logits.

A Hugging Face model called with ``labels=`` returns ``out.loss``, one scalar for the whole batch,
and the usual ``loss_fn`` is ``lambda out: out.loss``. The per-example loss is, as everywhere in
persample, L_i = that loss_fn on example i alone: the model's own loss of a batch of one. For the
loss classes Hugging Face uses (``transformers/loss/loss_utils.py`` and the same losses written
inline in older modelling files) L_i is a closed form of example i's logits and labels, and the
batch loss is ℓ = Σ_i w_i L_i with known weights:

===========================  ===================================================  =================
head                         L_i (example i alone)                                w_i
===========================  ===================================================  =================
causal LM (``ForCausalLM``,  mean over i's tokens of CE(logits_t, labels_{t+1}),   n_i / N
``LMHeadModel``)             labels shifted left, ``-100`` ignored; where that
                             fails the checks, CE(logits_t, labels_t) (the
                             causal decoders of BART, Marian, MBart, BlenderBot,
                             which leave the shift to the caller)
seq2seq LM, masked LM,       mean over i's tokens of CE(logits_t, labels_t),       n_i / N
token classification         ``-100`` ignored
any of these with            Σ_t ℓ_it / K (a loss that divides by K; one that      1
``num_items_in_batch=K``     ignores K is the row above; when K equals the batch's
                             count, the cross entropy in ``out.loss``'s graph,
                             summed or averaged, tells which)
sequence / image             ``config.problem_type``: MSE over the labels          1 / B
classification               (regression), CE (single label; / K with
                             ``num_items_in_batch``, then w_i = 1),
                             BCE-with-logits over the labels (multi label)
question answering           (CE(start) + CE(end)) / 2                            1 / B
===========================  ===================================================  =================

n_i is the number of example i's labels that are not ignored, N = Σ_i n_i. The losses are computed
in the dtype of ``out.loss`` (Hugging Face casts the logits with ``.float()`` before its token
losses: a float64 model then computes its loss in float32, and so does the recomputation, which is
exact to that rounding; see docs/coverage.md).

Nothing here is taken on trust. Before the recomputed L_i replace ``out.loss``, :func:`model_losses`
checks on the batch that

1. ``out.loss`` depends on the model only through the output tensors that L_i read (a walk of its
   autograd graph: a term computed from anything else, such as a mixture-of-experts router's
   auxiliary loss, is found there);
2. its gradient at those outputs is w_i ∇_{o_i} L_i, example by example, with the w_i of the table
   (‖a_i − w_i b_i‖_∞ ≤ rtol · max(‖a_i‖_∞, ‖w_i b_i‖_∞), rtol 1e-7 in float64, 1e-4 in float32; a loss
   of another form, label smoothing, a weight per class, a sum, fails here);
3. its value is Σ_i w_i L_i.

After the user's own backward (``Tracker.observe``, :func:`observed_model_losses`), check 2 reads the
gradient the backward left at the logits, and allows one common scale c (ℓ = c · out.loss: an
accumulation divisor, a loss scale). A model whose loss fails one of them raises :class:`~persample.NotExact` with code
``MODEL_LOSS_NOT_RECOMPUTED`` (``engine="auto"`` moves on to the engines that run each example alone).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ...contract import refusal
from ...errors import NotExact

__all__ = ["ModelLoss", "model_losses", "observed_model_losses", "reads_model_loss", "head_kind"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ModelLoss:
    """The recomputed per-example losses ``[B]`` (differentiable at the output), their weights
    ``[B]`` (float64, checked: ℓ = Σ_i w_i L_i) and the output leaves (pytree indices) they read."""

    losses: Tensor
    weights: Tensor
    leaves: tuple[int, ...]
    kind: str


# ------------------------------------------------------------------------- is it the model's loss?


class _NoOps(TorchFunctionMode):
    """Stops ``loss_fn`` at its first tensor operation: reading ``out.loss`` performs none."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        raise _NotAttribute


class _NotAttribute(Exception):
    pass


def _output_loss(output: Any) -> Tensor | None:
    loss = output.get("loss") if hasattr(output, "get") and not isinstance(output, Tensor) else None
    if loss is None:
        loss = getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) and loss.dim() == 0 else None


def reads_model_loss(loss_fn: Callable, output: Any, targets: Any) -> Tensor | None:
    """``out.loss`` when ``loss_fn(output[, targets])`` returns it unchanged (``lambda out: out.loss``),
    with no tensor operation; else None."""
    own = _output_loss(output)
    if own is None:
        return None
    try:
        with _NoOps():
            result = loss_fn(output) if targets is None else loss_fn(output, targets)
    except Exception:
        return None
    return own if result is own else None


# ------------------------------------------------------------------------------------ which head

_HEADS = (
    ("ForCausalLM", "causal"),
    ("LMHeadModel", "causal"),
    ("ForConditionalGeneration", "generation"),
    ("ForMaskedLM", "tokens"),
    ("ForTokenClassification", "tokens"),
    ("ForSequenceClassification", "sequence"),
    ("ForImageClassification", "sequence"),
    ("ForAudioClassification", "sequence"),
    ("ForQuestionAnswering", "qa"),
)


def _base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (``get_base_model``), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return base if isinstance(base, nn.Module) else model


def head_kind(model: nn.Module) -> str | None:
    """``causal``, ``tokens``, ``sequence`` or ``qa`` for a Hugging Face head whose loss has a closed form
    here (by its class name and config), else None."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    if config is None:
        return None
    name = type(base).__name__
    kind = next((k for suffix, k in _HEADS if name.endswith(suffix)), None)
    if kind == "generation":  # encoder-decoders score the decoder's labels as they are; decoders shift them
        kind = "tokens" if getattr(config, "is_encoder_decoder", False) else "causal"
    return kind


# ----------------------------------------------------------------------------------- the losses


def _leaf(output: Any, leaves: list, name: str) -> int | None:
    value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
    return next((i for i, t in enumerate(leaves) if t is value), None) if isinstance(value, Tensor) else None


def _token_losses(logits: Tensor, labels: Tensor, shift: bool, dtype: torch.dtype, items: Any):
    """(L_i, w_i) of a token cross entropy: the mean over example i's counted tokens, w_i = n_i / N; or,
    with ``items`` = K (``num_items_in_batch``), Σ_t ℓ_it / K, w_i = 1."""
    if labels.shape != logits.shape[:-1] or labels.is_floating_point():
        return None
    if shift:
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    batch = logits.shape[0]
    x = logits.to(dtype).reshape(-1, logits.shape[-1])
    flat = labels.reshape(-1).to(x.device)
    per_token = F.cross_entropy(x, flat, ignore_index=IGNORE_INDEX, reduction="none").reshape(batch, -1)
    if items is not None:
        return per_token.sum(1) / _count(items), torch.ones(batch, dtype=torch.float64)
    counts = (flat != IGNORE_INDEX).reshape(batch, -1).sum(1)
    if bool((counts == 0).any()):
        i = int((counts == 0).nonzero()[0])
        raise refusal(
            "MODEL_LOSS_NOT_RECOMPUTED",
            f"example {i} has no label that is not -100: its own loss (the model's loss on it alone) is "
            "NaN. Drop such examples from the batch, or pass num_items_in_batch (each example's loss is "
            "then its summed token loss over that count)",
        )
    counts64 = counts.to(torch.float64).cpu()
    return per_token.sum(1) / counts.to(per_token.dtype), counts64 / counts64.sum()


def _count(items: Any) -> float:
    return float(items.item() if isinstance(items, Tensor) else items)


def _sequence_losses(logits: Tensor, labels: Tensor, config, dtype: torch.dtype, items: Any):
    """(L_i, w_i) of ``config.problem_type``'s loss: w_i = 1 / B; or, single label with ``items`` = K
    (Hugging Face's ``fixed_cross_entropy``), CE_i / K and w_i = 1."""
    batch = logits.shape[0]
    uniform = torch.full((batch,), 1.0 / batch, dtype=torch.float64)
    problem, classes = getattr(config, "problem_type", None), getattr(config, "num_labels", None)
    if problem is None:  # as Hugging Face infers it (a model that then computes another loss fails the checks)
        single = not labels.is_floating_point()
        problem = (
            "regression" if classes == 1 else "single_label_classification" if single else "multi_label_classification"
        )
    x = logits.to(dtype)
    if logits.dim() != 2 or logits.shape[1] != classes:
        return None
    if problem == "regression":
        y = labels.to(x.dtype).reshape(batch, -1)
        if y.shape[1] != classes:
            return None
        return F.mse_loss(x, y, reduction="none").mean(1), uniform
    if problem == "single_label_classification":
        if labels.shape != (batch,) or labels.is_floating_point() or bool((labels == IGNORE_INDEX).any()):
            return None
        losses = F.cross_entropy(x, labels.to(x.device), reduction="none")
        return (losses, uniform) if items is None else (losses / _count(items), torch.ones(batch, dtype=torch.float64))
    if problem == "multi_label_classification":
        if labels.shape != x.shape:
            return None
        return F.binary_cross_entropy_with_logits(x, labels.to(x.dtype), reduction="none").mean(1), uniform
    return None


def _qa_losses(start: Tensor, end: Tensor, starts: Tensor, ends: Tensor, dtype: torch.dtype):
    batch, length = start.shape[0], start.shape[1] if start.dim() == 2 else -1
    if start.dim() != 2 or end.shape != start.shape:
        return None
    starts, ends = starts.reshape(batch).clamp(0, length), ends.reshape(batch).clamp(0, length)
    if bool(((starts == length) | (ends == length)).any()):
        return None  # an ignored position: the two halves then weigh the examples differently
    losses = (
        F.cross_entropy(start.to(dtype), starts.to(start.device), reduction="none")
        + F.cross_entropy(end.to(dtype), ends.to(end.device), reduction="none")
    ) / 2
    return losses, torch.full((batch,), 1.0 / batch, dtype=torch.float64)


Candidate = Callable[[], "tuple[Tensor, Tensor] | None"]


def _candidates(
    kind: str,
    model: nn.Module,
    output: Any,
    leaves: list,
    inputs: dict,
    dtype: torch.dtype,
    shift: bool | None = None,
) -> tuple[list[Candidate], tuple[int, ...]]:
    """The forms the head's loss may take, each a callable giving (L_i, w_i) or None, and the indices
    of the output leaves they read. With ``num_items_in_batch``, the loss divided by it (Hugging Face's
    loss functions) comes first, then the one that ignores it (losses written inline in modelling files).
    ``shift``: whether a token loss shifts the labels (default: for a causal head)."""
    items = inputs.get("num_items_in_batch")
    if kind == "qa":
        s, e = _leaf(output, leaves, "start_logits"), _leaf(output, leaves, "end_logits")
        starts, ends = inputs.get("start_positions"), inputs.get("end_positions")
        if s is None or e is None or not isinstance(starts, Tensor) or not isinstance(ends, Tensor):
            return [], ()
        return [lambda: _qa_losses(leaves[s], leaves[e], starts, ends, dtype)], (s, e)
    logits, labels = _leaf(output, leaves, "logits"), inputs.get("labels")
    if logits is None or not isinstance(labels, Tensor):
        return [], ()
    counts = [items, None] if items is not None else [None]
    if kind == "sequence":
        config = _base_model(model).config
        forms: list[Candidate] = [
            functools.partial(_sequence_losses, leaves[logits], labels, config, dtype, k) for k in counts
        ]
    else:
        shifted = kind == "causal" if shift is None else shift
        forms = [functools.partial(_token_losses, leaves[logits], labels, shifted, dtype, k) for k in counts]
    return forms, (logits,)


def _choose_causal_form(
    kind: str, own: Tensor, forms: list, unshifted: Callable[[], list], batch_grads, fit: Callable
) -> ModelLoss | None:
    """:func:`_choose_form`; for a causal head whose loss fits no shifted form, the same forms without the
    shift (``unshifted()``): the causal-LM decoders of encoder-decoder families (``BartForCausalLM``,
    ``MarianForCausalLM``, BlenderBot's, MBart's, BigBirdPegasus's) score ``labels`` as they are,
    CE(logits_t, labels_t), the caller having shifted them. Tried only after the shifted forms failed,
    and held to the same checks; if it fails too, the shifted forms' error is raised."""
    try:
        return _choose_form(kind, own, forms, batch_grads, fit)
    except NotExact as err:
        if kind != "causal" or getattr(err, "code", None) != "MODEL_LOSS_NOT_RECOMPUTED":
            raise
        try:
            chosen = _choose_form(kind, own, unshifted(), batch_grads, fit)
        except NotExact:
            raise err from None
        if chosen is None:
            raise
        return chosen


# ------------------------------------------------------------------------------------ the checks


def _first_mismatch(batch_grads, example_grads, expected: Tensor, rtol: float) -> int | None:
    """The first example i where ∇_{o_i} ℓ ≠ w_i ∇_{o_i} L_i (``expected`` = w), else None:
    ‖a_i − w_i b_i‖_∞ > rtol · max(‖a_i‖_∞, ‖w_i b_i‖_∞) on some output read, or a non-finite gradient."""
    batch = expected.shape[0]
    bad = torch.zeros(batch, dtype=torch.bool)
    for a, b in zip(batch_grads, example_grads):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        a2 = a.detach().reshape(batch, -1).to(torch.float64).cpu()
        wb = b.detach().reshape(batch, -1).to(torch.float64).cpu() * expected[:, None]
        scale = torch.maximum(a2.abs().amax(1), wb.abs().amax(1))
        bad |= ~((a2 - wb).abs().amax(1) <= rtol * scale)  # NaN compares False: bad
    return int(bad.nonzero()[0]) if bool(bad.any()) else None


def _reaches_model_elsewhere(loss: Tensor, through: list[Tensor]) -> bool:
    """Whether ``loss``'s graph reaches a parameter or an input (an ``AccumulateGrad``), or a node that
    hides its graph, other than through the grad_fn of the tensors ``through``."""
    stops = {t.grad_fn for t in through if t.grad_fn is not None}
    seen: set = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        if type(node).__name__ in ("AccumulateGrad", "CheckpointFunctionBackward"):
            return True
        stack.extend(nxt for nxt, _ in node.next_functions)
    return False


def _not_recomputed(kind: str, why: str):
    return refusal(
        "MODEL_LOSS_NOT_RECOMPUTED",
        f"the model's own loss (out.loss, a {kind} head) is not the Hugging Face loss that persample "
        f"recomputes per example from the logits: {why}. Pass a loss_fn of the logits and the labels "
        "(persample.causal_lm_loss() for causal LMs), or engine='auto' (each example alone)",
    )


def _own_loss(model: nn.Module, loss_fn: Callable, output: Any, inputs: Any, targets: Any):
    """(head kind, out.loss) when ``loss_fn`` reads a recognised head's own differentiable loss, else None."""
    if not isinstance(inputs, dict):
        return None
    kind = head_kind(model)
    if kind is None:
        return None
    own = reads_model_loss(loss_fn, output, targets)
    if own is None or not own.requires_grad:
        return None
    return kind, own


def _check_value(kind: str, own: Tensor, losses: Tensor, weights: Tensor) -> None:
    combined = (weights.to(losses) * losses.detach()).sum()
    rtol = 1e-9 if own.dtype == torch.float64 else 1e-5
    if not bool(torch.isclose(combined, own.detach().to(combined), rtol=rtol, atol=0.0)):
        raise _not_recomputed(kind, f"its value {own.item():.8g} is not Σ_i w_i L_i = {combined.item():.8g}")


def _mismatch(kind: str, example: int, weights: Tensor):
    return _not_recomputed(
        kind,
        f"its gradient at the logits is not w_i ∇L_i for example {example} (w_i = {weights[example].item():.6g}, "
        "the head's weight: n_i / N for token losses, 1 / B otherwise); a loss of another form (label "
        "smoothing, class weights, a sum)?",
    )


def model_losses(model: nn.Module, loss_fn: Callable, output: Any, inputs: Any, targets: Any) -> ModelLoss | None:
    """The per-example losses of a Hugging Face model's own ``out.loss``, checked (module docstring).

    None when ``loss_fn`` is not ``out.loss`` of a recognised head called with its labels (the caller
    then treats ``loss_fn`` as any other). Raises :class:`~persample.NotExact`
    (``MODEL_LOSS_NOT_RECOMPUTED``) when it is, but ``out.loss`` is not Σ_i w_i L_i of the recomputed
    losses. ``output`` is the model's output with its graph; costs a loss-only forward and two loss-only
    backwards at the output per form tried; the model is not run.
    """
    from torch.utils._pytree import tree_flatten

    found = _own_loss(model, loss_fn, output, inputs, targets)
    if found is None:
        return None
    kind, own = found
    leaves, _ = tree_flatten(output)
    forms, used = _candidates(kind, model, output, leaves, inputs, own.dtype)
    read = [leaves[i] for i in used]
    if not forms or any(not t.requires_grad for t in read):
        return None
    if _reaches_model_elsewhere(own, read):
        raise _not_recomputed(kind, "it has a term that does not come from the logits (an auxiliary loss?)")
    batch_grads = torch.autograd.grad(own, read, retain_graph=True, allow_unused=True)

    def fit(losses: Tensor, weights: Tensor) -> tuple[tuple, ModelLoss]:
        example_grads = torch.autograd.grad(losses.sum(), read, retain_graph=True, allow_unused=True)
        return example_grads, ModelLoss(losses, weights, used, kind)

    def unshifted() -> list:
        return _candidates(kind, model, output, leaves, inputs, own.dtype, shift=False)[0]

    return _choose_causal_form(kind, own, forms, unshifted, batch_grads, fit)


def _choose_form(kind: str, own: Tensor, forms: list, batch_grads, fit: Callable) -> ModelLoss | None:
    """The form among ``forms`` whose per-example losses explain ``out.loss`` = ``own``: for each form that
    applies, ``fit(losses, weights)`` gives the examples' loss gradients at the used output leaves and the
    :class:`ModelLoss` it would be; the batch's gradients there (``batch_grads``) must be
    Σ_i (that ModelLoss's weights)_i ∇L_i, and ``own``'s value Σ_i w_i L_i. Of the forms that pass,
    :func:`_one_form`; if none passes, the first mismatch is raised; None when no form applies."""
    rtol = 1e-7 if own.dtype == torch.float64 else 1e-4
    passing, first_error = [], None
    for number, form in enumerate(forms):
        with torch.enable_grad():
            computed = form()
            if computed is None:
                continue
            losses, weights = computed
            example_grads, candidate = fit(losses, weights)
        example = _first_mismatch(batch_grads, example_grads, candidate.weights, rtol=rtol)
        if example is None:
            _check_value(kind, own, losses, weights)
            passing.append((number, candidate))
        else:
            first_error = first_error or _mismatch(kind, example, weights)
    if passing:
        return _one_form(kind, own, passing)
    if first_error is not None:
        raise first_error
    return None


def _one_form(kind: str, own: Tensor, passing: list):
    """The form of the loss among those that fit the batch. With ``num_items_in_batch`` = K equal to the
    batch's count of labels, ``Σ_t ℓ_it / K`` (form 0, a loss that divides by K) and the token mean (form
    1, a loss that ignores K) give the same batch loss and gradient but not the same loss of an example
    alone; the cross entropy in ``out.loss``'s graph tells them apart: summed (form 0) or averaged (form 1)."""
    first = passing[0][1]
    if len(passing) == 1 or all(torch.allclose(m.losses, first.losses, rtol=1e-9, atol=0.0) for _, m in passing):
        return first
    reductions = _cross_entropy_reductions(own)
    want = 0 if reductions == {2} else 1 if reductions == {1} else None
    chosen = next((m for number, m in passing if number == want), None)
    if chosen is None:
        raise _not_recomputed(
            kind,
            "num_items_in_batch equals the batch's count of labels, so the batch cannot show whether the "
            "model divides its loss by it, and its graph does not say either (its cross entropies are "
            f"reduced by {sorted(reductions)})",
        )
    return chosen


def _cross_entropy_reductions(loss: Tensor) -> set[int]:
    """The reductions (1 mean, 2 sum) of the NllLoss nodes in ``loss``'s graph, down to the logits."""
    from ..._torch_compat import nll_loss_reduction

    found: set[int] = set()
    seen: set = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("NllLoss"):
            found.add(nll_loss_reduction(node))
            continue
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


def observed_model_losses(
    model: nn.Module,
    loss_fn: Callable,
    output: Any,
    inputs: Any,
    targets: Any,
    detached: list,
    observed: dict[int, Tensor],
) -> tuple[ModelLoss, Tensor] | None:
    """:func:`model_losses` after the user's backward (``Tracker.observe``): the losses are recomputed at
    the ``detached`` output leaves (differentiable copies), and the gradient check reads the ``observed``
    gradients of the backwarded loss ℓ = c · out.loss at the output leaves (a scale c: an accumulation
    divisor, a loss scale). Returns the losses and the weights of ℓ, c · w_i (checked: the same c for
    every example), or None when ``loss_fn`` is not a recognised head's own loss."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    found = _own_loss(model, loss_fn, output, inputs, targets)
    if found is None:
        return None
    kind, own = found
    leaves, spec = tree_flatten(output)
    copy = tree_unflatten(detached, spec)
    forms, used = _candidates(kind, model, copy, detached, inputs, own.dtype)
    if not forms or any(i not in observed for i in used):
        return None
    if _reaches_model_elsewhere(own, [leaves[i] for i in used]):  # the graph's nodes outlive its backward
        raise _not_recomputed(kind, "it has a term that does not come from the logits (an auxiliary loss?)")
    batch_grads = [observed[i] for i in used]

    def fit(losses: Tensor, weights: Tensor) -> tuple[tuple, ModelLoss]:
        example_grads = torch.autograd.grad(losses.sum(), [detached[i] for i in used], allow_unused=True)
        scale = _common_scale(batch_grads, example_grads, weights)
        return example_grads, ModelLoss(losses.detach(), weights * scale, used, kind)

    def unshifted() -> list:
        return _candidates(kind, model, copy, detached, inputs, own.dtype, shift=False)[0]

    chosen = _choose_causal_form(kind, own, forms, unshifted, batch_grads, fit)
    return None if chosen is None else (chosen, chosen.weights)


def _common_scale(batch_grads, example_grads, weights: Tensor) -> float:
    """c minimising Σ_i ‖a_i − c w_i b_i‖² (dot products in float64)."""
    dot = bb = 0.0
    for a, b in zip(batch_grads, example_grads):
        if a is None or b is None:
            continue
        w = weights.to(torch.float64).reshape(-1, *[1] * (b.dim() - 1)).to(b.device)
        wb = b.detach().to(torch.float64) * w
        dot += float((a.detach().to(torch.float64) * wb).sum())
        bb += float((wb * wb).sum())
    return dot / bb if bb > 0 else 0.0
