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
``LMHeadModel``)             labels shifted left, ``-100`` ignored
seq2seq LM, masked LM,       mean over i's tokens of CE(logits_t, labels_t),       n_i / N
token classification         ``-100`` ignored
any of these with            Σ_t ℓ_it / K                                          1
``num_items_in_batch=K``
sequence / image             ``config.problem_type``: MSE over the labels          1 / B
classification               (regression), CE (single label), BCE-with-logits
                             over the labels (multi label)
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

A model whose loss fails one of them raises :class:`~persample.NotExact` with code
``MODEL_LOSS_NOT_RECOMPUTED`` (``engine="auto"`` moves on to the engines that run each example alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ...contract import refusal

__all__ = ["ModelLoss", "model_losses", "reads_model_loss", "head_kind"]

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
    """(L_i, w_i) of a token cross entropy: mean over example i's counted tokens (or Σ_t / K)."""
    if labels.shape != logits.shape[:-1]:
        return None
    if shift:
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    batch = logits.shape[0]
    x = logits.to(dtype).reshape(-1, logits.shape[-1])
    flat = labels.reshape(-1).to(x.device)
    per_token = F.cross_entropy(x, flat, ignore_index=IGNORE_INDEX, reduction="none").reshape(batch, -1)
    counts = (flat != IGNORE_INDEX).reshape(batch, -1).sum(1)
    if items is not None:
        divisor = float(items.item() if isinstance(items, Tensor) else items)
        return per_token.sum(1) / divisor, torch.ones(batch, dtype=torch.float64)
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


def _sequence_losses(logits: Tensor, labels: Tensor, config, dtype: torch.dtype):
    batch = logits.shape[0]
    uniform = torch.full((batch,), 1.0 / batch, dtype=torch.float64)
    problem, classes = getattr(config, "problem_type", None), getattr(config, "num_labels", None)
    x = logits.to(dtype)
    if logits.dim() != 2 or logits.shape[1] != classes:
        return None
    if problem == "regression":
        y = labels.to(x.dtype).reshape(batch, -1)
        if y.shape[1] != classes:
            return None
        return F.mse_loss(x, y, reduction="none").mean(1), uniform
    if problem == "single_label_classification":
        if labels.shape != (batch,) or bool((labels == IGNORE_INDEX).any()):
            return None
        return F.cross_entropy(x, labels.to(x.device), reduction="none"), uniform
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


def _candidate(kind: str, model: nn.Module, output: Any, leaves: list, inputs: dict, dtype: torch.dtype):
    """(L_i, w_i, indices of the output leaves read) of the head's loss, or None."""
    items = inputs.get("num_items_in_batch")
    if kind == "qa":
        s, e = _leaf(output, leaves, "start_logits"), _leaf(output, leaves, "end_logits")
        starts, ends = inputs.get("start_positions"), inputs.get("end_positions")
        if s is None or e is None or not isinstance(starts, Tensor) or not isinstance(ends, Tensor):
            return None
        found = _qa_losses(leaves[s], leaves[e], starts, ends, dtype)
        return None if found is None else (*found, (s, e))
    logits, labels = _leaf(output, leaves, "logits"), inputs.get("labels")
    if logits is None or not isinstance(labels, Tensor):
        return None
    if kind == "sequence":
        if items is not None:
            return None
        found = _sequence_losses(leaves[logits], labels, _base_model(model).config, dtype)
    else:
        if labels.is_floating_point():
            return None
        found = _token_losses(leaves[logits], labels, kind == "causal", dtype, items)
    return None if found is None else (*found, (logits,))


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


def model_losses(model: nn.Module, loss_fn: Callable, output: Any, inputs: Any, targets: Any) -> ModelLoss | None:
    """The per-example losses of a Hugging Face model's own ``out.loss``, checked (module docstring).

    None when ``loss_fn`` is not ``out.loss`` of a recognised head called with its labels (the caller
    then treats ``loss_fn`` as any other). Raises :class:`~persample.NotExact`
    (``MODEL_LOSS_NOT_RECOMPUTED``) when it is, but ``out.loss`` is not Σ_i w_i L_i of the recomputed
    losses. Costs a loss-only forward and two loss-only backwards at the output; the model is not run.
    """
    from torch.utils._pytree import tree_flatten

    if not isinstance(inputs, dict):
        return None
    kind = head_kind(model)
    if kind is None:
        return None
    own = reads_model_loss(loss_fn, output, targets)
    if own is None or not own.requires_grad:
        return None
    leaves, _ = tree_flatten(output)
    with torch.enable_grad():
        found = _candidate(kind, model, output, leaves, inputs, own.dtype)
        if found is None:
            return None
        losses, expected, used = found
        read = [leaves[i] for i in used]
        batch = losses.shape[0]
        if any(not t.requires_grad or t.shape[0] != batch for t in read):
            return None
        if _reaches_model_elsewhere(own, read):
            raise _not_recomputed(kind, "it has a term that does not come from the logits (an auxiliary loss?)")
        batch_grads = torch.autograd.grad(own, read, retain_graph=True, allow_unused=True)
        example_grads = torch.autograd.grad(losses.sum(), read, retain_graph=True, allow_unused=True)
    float64 = own.dtype == torch.float64
    example = _first_mismatch(batch_grads, example_grads, expected, rtol=1e-7 if float64 else 1e-4)
    if example is not None:
        raise _not_recomputed(
            kind,
            f"its gradient at the logits is not w_i ∇L_i for example {example} (w_i = "
            f"{expected[example].item():.6g}, the head's weight: n_i / N for token losses, 1 / B otherwise); "
            "a loss of another form (label smoothing, class weights, a sum)?",
        )
    combined = (expected.to(losses) * losses.detach()).sum()
    if not bool(torch.isclose(combined, own.detach(), rtol=1e-9 if float64 else 1e-5, atol=0.0)):
        raise _not_recomputed(kind, f"its value {own.item():.8g} is not Σ_i w_i L_i = {combined.item():.8g}")
    return ModelLoss(losses, expected, tuple(used), kind)
