"""How a batch loss combines per-example losses: ℓ = Σ_i w_i L_i.

persample's statistics describe per-example gradients g_i = ∇_θ L_i, where
L_i is **the per-example loss**: ``per_example(output_i[None], target_i[None])``
on a batch of one (by default the training loop's own ``loss_fn``). A training
loop backwards a **batch loss** ℓ = ``loss_fn(output, targets)``. Many batch
losses are not (1/B) Σ_i L_i:

=====================================  ===================  ======================
batch loss ℓ                           L_i                  w_i
=====================================  ===================  ======================
``reduction="mean"`` (the default)     loss of example i    1/B
``reduction="sum"``                    loss of example i    1
token mean over a padded batch         Σ_t ℓ_it (summed)    1/N_tokens
``num_items_in_batch`` (HF, GA)        Σ_t ℓ_it (summed)    1/num_items_in_batch
``(loss / k).backward()``              as above             w_i / k
class weights (``weight=c``)           loss_fn on one       c_{y_i} / Σ_j c_{y_j}
=====================================  ===================  ======================

persample does not ask for w: it **derives** it. Example i's loss depends on
example i's output o_i alone, so for any batch loss that is a combination
Σ_i w_i L_i, ∇_{o_i} ℓ = w_i ∇_{o_i} L_i: w_i is read off the two gradients at
the model output (a loss-only backward, no model backward) and the identity
is checked for every example. When it fails,
the per-example loss does not describe the batch loss and
:class:`BatchLossMismatch` says so; nothing is written.

``p.grad`` = Σ_i w_i g_i, exactly what ``ℓ.backward()`` gives. When every
w_i equals one w (all rows above but class weights), p.grad = (w·B)·ḡ with
ḡ = ``stats.mean`` = (1/B) Σ_i g_i: the statistics' mean relates to p.grad by
the factor w·B (1 for a mean, B for a sum, B/N_tokens for a token mean).

To describe token losses by the example's summed token loss (L_i = Σ_t ℓ_it,
so that every example weighs 1/N_tokens) pair the batch loss with its
per-example part in a :class:`BatchLoss`, as :func:`causal_lm_loss` does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._host_reads import HostChecks
from .engines._autograd import graph_leaves
from .errors import BatchLossMismatch

__all__ = [
    "BatchLoss",
    "BatchLossMismatch",
    "causal_lm_loss",
    "loss_parts",
    "derive_weights",
    "common_weight",
    "check_batch_loss",
]


@dataclass(frozen=True)
class BatchLoss:
    """A batch loss together with the per-example losses it combines.

    Args:
        batch: ``batch(output, targets)`` on the whole batch: the loss your loop
            backwards (calling the BatchLoss calls it).
        per_example: ``per_example(output, targets)`` on a batch of ONE example:
            L_i, a scalar. The statistics describe g_i = ∇_θ L_i.

    The weights w_i with ℓ = Σ_i w_i L_i are derived and checked (see the
    module docstring); they are never declared.
    """

    batch: Callable[..., Tensor]
    per_example: Callable[..., Tensor]

    def __call__(self, output: Any, targets: Any = None, **kwargs) -> Tensor:
        return self.batch(output, **kwargs) if targets is None else self.batch(output, targets, **kwargs)


def loss_parts(loss_fn: Callable) -> tuple[Callable, Callable]:
    """(batch loss, per-example loss) of a :class:`BatchLoss` or of a plain loss function
    (which is then both: L_i = loss_fn on a batch of one)."""
    if isinstance(loss_fn, BatchLoss):
        return loss_fn.batch, loss_fn.per_example
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    return loss_fn, loss_fn


# ------------------------------------------------------------------------ causal LM


def _logits(output: Any) -> Tensor:
    return output.logits if hasattr(output, "logits") else (output["logits"] if isinstance(output, dict) else output)


def _token_losses_sum(output: Any, labels: Tensor, ignore_index: int, shift: bool) -> tuple[Tensor, Tensor]:
    """(Σ_{i,t} ℓ_it, number of counted tokens), with Hugging Face's label shift."""
    logits = _logits(output)
    if shift:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat_labels = labels.reshape(-1).to(logits.device)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as HF: half logits in float32
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), flat_labels, ignore_index=ignore_index, reduction="sum"
    )
    return total, (flat_labels != ignore_index).sum()


def causal_lm_loss(
    *,
    ignore_index: int = -100,
    shift: bool = True,
    num_items_in_batch: int | Tensor | None = None,
    reduction: str = "mean",
) -> BatchLoss:
    """Next-token cross-entropy as Hugging Face's causal-LM models compute it, with its per-example part.

    - batch loss: ℓ = (1/N) Σ_i Σ_t ℓ_it over the tokens whose label is not
      ``ignore_index`` (labels shifted left by one when ``shift``, as HF does
      inside ``ForCausalLM`` models), N = their count, or
      ``num_items_in_batch`` when given (HF's count over all micro-batches of
      a gradient-accumulation step); with ``reduction="sum"``, ℓ = Σ_i Σ_t ℓ_it
      (divide it yourself, e.g. ``tracker.step(x, y, scale=1 / n_tokens)``);
    - per-example loss: L_i = Σ_t ℓ_it, example i's summed token loss (0 for an
      example whose tokens are all ignored).

    So w_i = 1/N for every example and p.grad = (B/N)·ḡ. Targets are the
    labels ``[B, T]`` (the input ids, with padding set to ``ignore_index``).
    Half-precision logits are cast to float32 first, as HF does.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")

    def batch(output: Any, labels: Tensor) -> Tensor:
        total, count = _token_losses_sum(output, labels, ignore_index, shift)
        if reduction == "sum":
            return total
        denominator = count if num_items_in_batch is None else num_items_in_batch
        if isinstance(denominator, Tensor):
            denominator = denominator.to(total.device)
        return total / denominator

    def per_example(output: Any, labels: Tensor) -> Tensor:
        return _token_losses_sum(output, labels, ignore_index, shift)[0]

    return BatchLoss(batch, per_example)


# ------------------------------------------------------------------------ weights


#: Tensors of at most this many elements are checked by the plain forms (``torch.isfinite(t).all()``,
#: ``t.abs().amax(1)``): fewer ops, and at this size each op's fixed cost outweighs its pass.
_SMALL = 1 << 15


def all_finite(t: Tensor) -> Tensor:
    """0-d bool tensor on ``t``'s device: whether every element of ``t`` is finite (no inf, no NaN), without
    a host read. A large floating tensor is read once by ``aminmax`` (which propagates NaN and holds ±inf at
    its ends): on CPU about 20x cheaper than ``torch.isfinite(t).all()``, which writes four tensors of t's
    size, on a language model's logits.

    >>> import torch
    >>> bool(all_finite(torch.tensor([1.0, 2.0]))), bool(all_finite(torch.tensor([1.0, float("nan")])))
    (True, False)
    """
    if t.numel() <= _SMALL or not t.is_floating_point():
        return torch.isfinite(t).all()
    low, high = torch.aminmax(t)  # (over a dim, aminmax is slow on CPU: see _row_abs_max)
    return torch.isfinite(low) & torch.isfinite(high)


def _tolerance(dtypes: Sequence[torch.dtype]) -> float:
    if all(d == torch.float64 for d in dtypes):
        return 1e-5  # not 1e-7: float64 models may compute their loss in float32 (HF casts logits .float())
    if any(d in (torch.float16, torch.bfloat16) for d in dtypes):
        return 2e-2
    return 1e-3


def derive_weights(
    batch_grads: Sequence[Tensor | None],
    example_grads: Sequence[Tensor | None],
    batch_size: int,
    *,
    what: str = "the batch loss",
    checks: HostChecks | None = None,
) -> Tensor:
    """w_i with ∇_{o_i} ℓ = w_i ∇_{o_i} L_i for every example, in float64, checked.

    ``batch_grads[k]`` is ∇ℓ at the k-th output tensor, ``example_grads[k]`` the
    gradient of Σ_i L_i there (both batched on dim 0; None for no gradient).
    w_i = ⟨a_i, b_i⟩ / ‖b_i‖² from a_i = ∇_{o_i} ℓ and b_i = ∇_{o_i} L_i
    (dot products summed in float64); an example whose L_i has no gradient
    there must have none in ℓ either (then w_i = 0). Every example is checked:
    ‖a_i − w_i b_i‖_∞ ≤ rtol · max(‖a_i‖_∞, ‖w_i b_i‖_∞), with rtol 1e-5 in
    float64, 1e-3 in float32 and 2e-2 in half precision.

    Raises:
        BatchLossMismatch: a_i is not a multiple of b_i for some example (the
            per-example losses do not describe ``what``), or a gradient is not finite.
    """
    present = [(a, b) for a, b in zip(batch_grads, example_grads) if a is not None or b is not None]
    pairs = [
        (
            torch.zeros_like(b) if a is None else a.detach(),  # type: ignore[arg-type]  # one of a, b is set
            torch.zeros_like(a) if b is None else b.detach(),  # type: ignore[arg-type]  # one of a, b is set
        )
        for a, b in present
    ]
    checks = HostChecks() if checks is None else checks
    if not pairs:
        checks.resolve()
        return torch.zeros(batch_size, dtype=torch.float64)
    rtol = _tolerance([t.dtype for pair in pairs for t in pair])
    device = pairs[0][0].device  # everything stays there; one host read at the end (HostChecks)
    dot = torch.zeros(batch_size, dtype=torch.float64, device=device)
    bb = torch.zeros(batch_size, dtype=torch.float64, device=device)
    largest = []  # (‖a_i‖_∞, ‖b_i‖_∞) per pair, read once: they also show whether a and b are finite
    for a, b in pairs:
        a2, b2 = a.reshape(batch_size, -1), b.reshape(batch_size, -1)
        a_max, b_max = _row_abs_max(a2), _row_abs_max(b2)
        largest.append((a_max, b_max))
        checks.add(~torch.isfinite(b_max).all(), functools.partial(_example_loss_not_finite, b2))
        checks.add(
            ~torch.isfinite(a_max).all(),
            lambda: NonFiniteExampleLoss(
                f"the gradient of {what} at the model output is not finite (inf/NaN)", code="BATCH_LOSS_NOT_FINITE"
            ),
        )
        dot += (a2 * b2).sum(1, dtype=torch.float64).to(device)
        bb += (b2 * b2).sum(1, dtype=torch.float64).to(device)
    w = torch.where(bb > 0, dot / bb.clamp_min(1e-300), torch.zeros_like(bb))
    residual = torch.zeros(batch_size, dtype=torch.float64, device=device)
    scale = torch.zeros(batch_size, dtype=torch.float64, device=device)
    for (a, b), (a_max, b_max) in zip(pairs, largest):
        a2, b2 = a.reshape(batch_size, -1), b.reshape(batch_size, -1)
        w_b = w.to(device=b2.device, dtype=b2.dtype)
        if a2.shape[1]:
            # a_i − w_i b_i in one pass (no w·b tensor); ‖w_i b_i‖_∞ = |w_i|·‖b_i‖_∞ (rounding is monotone)
            residual = torch.maximum(
                residual, _row_abs_max(torch.addcmul(a2, b2, w_b[:, None], value=-1)).double().to(device)
            )
            scale = torch.maximum(scale, torch.maximum(a_max, w_b.abs() * b_max).double().to(device))
    floor = 1e-12 * scale.max().clamp_min(1e-300)
    bad = residual > rtol * scale.clamp_min(floor)

    def mismatch() -> BatchLossMismatch:
        i = int(bad.nonzero().flatten()[0])
        return BatchLossMismatch(
            f"{what} is not a weighted sum Σ_i w_i L_i of the per-example losses L_i = "
            f"per_example(output_i, target_i): at example {i} its gradient at the model output is not a "
            f"multiple of L_i's (relative residual {(residual[i] / scale[i].clamp_min(1e-300)).item():.2e}). "
            "The statistics would be wrong. Pass the per-example loss that the batch loss combines, "
            "e.g. persample.BatchLoss(loss_fn, per_example=...) or persample.causal_lm_loss() for "
            "token losses, or pass the targets that the loss uses",
            code="BATCH_LOSS_MISMATCH",
        )

    checks.add(bad.any(), mismatch)
    return host_weights(checks.resolve(w))


def _example_losses_not_finite(losses: Tensor) -> NonFiniteExampleLoss:
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    return NonFiniteExampleLoss(
        f"the per-example losses of examples {bad[:5]} are not finite while the batch loss is: an "
        "example whose targets are all ignored gets NaN from a mean over its own tokens. Describe "
        "each example by a sum instead: persample.BatchLoss(loss_fn, per_example=<the same loss with "
        "reduction='sum'>), or persample.causal_lm_loss() for token losses",
        code="EXAMPLE_LOSS_NOT_FINITE",
    )


def _row_abs_max(t: Tensor) -> Tensor:
    """max_j |t[i, j]| per row of a ``[B, n]`` tensor; NaN in a row gives NaN, ±inf gives inf; 0 for rows of
    no element. A large tensor is read by ``amax`` and ``amin`` without writing |t| (``aminmax`` over a dim
    is 15-25x slower than the two on CPU)."""
    if t.shape[1] == 0:
        return t.new_zeros(t.shape[0])
    if t.numel() <= _SMALL:
        return t.abs().amax(1)
    return torch.maximum(t.amax(1), t.amin(1).neg_())


def _example_loss_not_finite(b2: Tensor) -> NonFiniteExampleLoss:
    bad_rows = (~torch.isfinite(b2)).any(1).nonzero().flatten().tolist()
    return NonFiniteExampleLoss(
        f"the per-example losses have non-finite gradients at the model output (examples {bad_rows[:5]}): "
        "an example whose targets are all ignored gets NaN from a mean over its own tokens. Describe "
        "each example by a sum instead: persample.BatchLoss(loss_fn, per_example=<the same loss with "
        "reduction='sum'>), or persample.causal_lm_loss() for token losses",
        code="EXAMPLE_LOSS_NOT_FINITE",
    )


#: The attribute of a weights tensor built on the host from values read off the device (``host_weights``)
#: that holds those values: :func:`common_weight` takes them instead of reading the tensor again.
_HOST_VALUES = "_persample_host_values"


def host_weights(values: list[float]) -> Tensor:
    """w_i as a float64 host tensor built from ``values`` (floats already read from the device), which
    keeps them: :func:`common_weight` of it reads nothing (no device copy, no sync; on a CPU run
    ``SyncCounter`` would count a ``.tolist()`` of a host tensor like a device read). Nothing modifies
    such a tensor in place (every consumer makes new tensors from it).

    >>> common_weight(host_weights([0.25, 0.25]))
    0.25
    """
    w = torch.tensor(values, dtype=torch.float64)
    setattr(w, _HOST_VALUES, list(values))
    return w


def common_weight(w: Tensor, rtol: float = 1e-6) -> float | None:
    """The one weight every example has (within ``rtol``), or None when they differ.

    Rounding is removed when 1/w is within ``rtol`` of an integer (B for a mean,
    N for a token mean, 1 for a sum): then exactly 1/round(1/w) is returned.
    """
    if w.numel() == 0:
        return None
    values = getattr(w, _HOST_VALUES, None)  # derive_weights' weights: already read, they live on the host
    if values is None:
        values = w.double().tolist()  # one host read; the rest is Python's builtins (no loop in Python)
    try:
        mean = math.fsum(values) / len(values)
    except (ValueError, OverflowError):  # inf - inf, or a sum beyond float64: no common weight
        return None
    if mean == 0 or not math.isfinite(mean):
        return 0.0 if mean == 0 and not any(values) else None
    if max(max(values) - mean, mean - min(values)) > rtol * abs(mean):
        return None
    inverse = 1.0 / mean
    nearest = round(inverse)
    if nearest != 0 and abs(inverse - nearest) <= rtol * abs(inverse):
        return 1.0 / nearest
    return mean


# ------------------------------------------------------------------------ at the model output


class NonFiniteExampleLoss(BatchLossMismatch):
    """A :class:`BatchLossMismatch` because a loss or its gradient at the output is not finite (an
    example whose targets are all ignored, say), rather than because the batch loss couples the examples."""


def check_batch_loss(loss_fn: Callable, output: Any, targets: Any, batch_size: int, at_output: Any = None) -> bool:
    """Raise :class:`BatchLossMismatch` where ``loss_fn`` on the whole batch is not Σ_i w_i L_i of
    L_i = ``loss_fn`` on example i alone (a loss that couples the examples: NT-Xent / SimCLR, CLIP,
    batch-hard triplets, a batch-centred MSE, a load-balancing term over the batch's router outputs).

    One evaluation of each loss and a loss-only backward of each at (a detached copy of) ``output``,
    the model's output on the batch (:func:`weights_at_output`); the model is not run. Any weights
    are allowed (means, sums, class weights). Where the loss cannot be read at the output (it is not
    finite there; it is not a scalar on the whole batch) nothing can be told, and nothing is raised.
    ``at_output``: the fast engine's per-example losses at this very output and their gradient there
    (:class:`persample.engines.fast.engine.AtOutput`), which the check then does not compute again.

    Returns:
        True where the loss is computed inside the model (``lambda out: out.loss``): its weights cannot
        be read at the output, and the caller checks it on the parameters' gradients instead
        (:func:`gradient_multiple`).
    """
    from .engines.fast.losses import traced_standard_loss

    batch_fn, per_example_fn = loss_parts(loss_fn)
    if batch_fn is per_example_fn and traced_standard_loss(batch_fn, output, targets, batch_size) is not None:
        return False  # one standard loss (cross-entropy, MSE, ...) of the output and targets: Σ_i w_i L_i by its form
    try:
        found = at_output if batch_fn is per_example_fn else None  # the engine evaluated loss_fn per example
        weights_at_output(batch_fn, per_example_fn, output, targets, batch_size, at_output=found)
    except OpaqueLoss:
        return True
    except (NonFiniteLoss, NonFiniteExampleLoss):
        return False
    except BatchLossMismatch:
        raise
    except Exception:  # the loss does not run on the whole batch as it is (or not to a scalar): cannot tell
        return False
    return False


def gradient_multiple(grad: dict[str, Tensor], mean: dict[str, Tensor]) -> tuple[float, float]:
    """(c, relative difference) of the batch loss's gradient ``grad`` = ∇_θ ℓ against c·ḡ, the multiple of
    the mean per-example gradient ``mean`` = ḡ = (1/B) Σ_i ∇_θ L_i closest to it (least squares):
    max |∇ℓ − c·ḡ| / max |∇ℓ|. A batch loss ℓ = w Σ_i L_i (a mean, a sum) gives c = w·B and a difference at
    rounding level; a loss that couples the examples, or weighs them unequally, gives O(1). A parameter
    missing from ``grad`` (unused by ℓ) counts as a zero gradient.

    >>> import torch
    >>> gradient_multiple({"w": torch.tensor([2.0, 4.0])}, {"w": torch.tensor([1.0, 2.0])})
    (2.0, 0.0)
    """
    names = list(mean)
    g = torch.cat(
        [
            grad[n].detach().reshape(-1).double() if n in grad else mean[n].new_zeros(mean[n].numel()).double()
            for n in names
        ]
    )
    m = torch.cat([mean[n].detach().reshape(-1).double() for n in names])
    c = (g @ m / (m @ m)).item() if (m @ m).item() > 0 else 0.0
    scale = g.abs().max().item() if g.numel() else 0.0
    return c, ((g - c * m).abs().max().item() / scale if scale > 0 else 0.0)


class OpaqueLoss(Exception):
    """Internal: the batch loss is not a function of the model's batched output tensors
    (say ``lambda out: out.loss``, a loss the model computed itself), so its weights cannot be read there.
    ``per_example``: neither are the per-example losses, so only an engine that runs the model on each
    example alone (vmap) can compute them."""

    def __init__(self, per_example: bool = False):
        super().__init__()
        self.per_example = per_example


def weights_at_output(
    batch_fn: Callable,
    per_example_fn: Callable,
    output: Any,
    targets: Any,
    batch_size: int,
    *,
    model: Any = None,
    inputs: Any = None,
    at_output: Any = None,
) -> tuple[Tensor, list[int]]:
    """Derive and check the weights w_i of ℓ = ``batch_fn(output, targets)`` over
    L_i = ``per_example_fn`` on example i, at (a detached copy of) ``output``.

    Costs one evaluation of each loss and one loss-only backward of each; the
    model is not run. Half-precision outputs are compared in float32.

    Returns:
        w (``[B]`` float64) and the indices of the output's pytree leaves that ℓ
        depends on.

    w_i = ∂ℓ/∂L_i at this output, so p.grad = Σ_i w_i g_i holds by the chain rule
    even when ℓ is not linear in the L_i (then w depends on the output, and
    the statistics' mean relates to p.grad by a factor that changes each step).

    Raises:
        BatchLossMismatch: ∇_{o_i} ℓ is not a multiple of ∇_{o_i} L_i.
        OpaqueLoss: ℓ does not depend on the batched output tensors alone.
        NonFiniteLoss: the output or ℓ is not finite.
        NotExact: ``MODEL_LOSS_NOT_RECOMPUTED`` (with ``model`` and ``inputs``, the keyword inputs of the
            batch): ℓ is a Hugging Face model's own ``out.loss`` that is not the loss of its head.

    With ``model`` and ``inputs``, a Hugging Face model's own loss (``lambda out: out.loss``, with
    ``labels=`` among ``inputs``) is read at ``output`` itself, whose graph from ``out.loss`` to the logits
    must still be there: the per-example losses are recomputed from the logits and the weights checked
    (:func:`persample.engines.fast.model_loss.model_losses`).

    ``at_output``: the per-example losses L_i = ``per_example_fn`` on example i of this very ``output``,
    and ∇_o (1/B) Σ_i L_i at its floating leaves, from the fast engine's own backward
    (:class:`persample.engines.fast.engine.AtOutput`): then they are not evaluated and differentiated
    again, and b_i = B · that gradient (w_i is derived against it, then divided by B).
    """
    from torch.utils._pytree import tree_unflatten

    from .errors import NotExact
    from .engines.fast import output_leaves, per_example_losses
    from .engines.fast.model_loss import model_losses

    if model is not None and batch_fn is per_example_fn:
        own = getattr(at_output, "own", None) or model_losses(model, per_example_fn, output, inputs, targets)
        if own is not None:
            return own.weights, list(own.leaves)

    leaves, spec, batched = output_leaves(output, batch_size)
    form = getattr(at_output, "form", None) if batch_fn is per_example_fn else None
    if form is not None and any(t is form[0] for t in leaves):
        return _weights_of_form(form, at_output.losses, leaves, batched)
    floating = [isinstance(t, Tensor) and t.is_floating_point() for t in leaves]
    detached = []
    for t, is_float in zip(leaves, floating):
        if is_float:
            t = t.detach()
            t = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t.clone()).requires_grad_(True)
        detached.append(t)
    out = tree_unflatten(detached, spec)
    differentiable = [i for i, f in enumerate(floating) if f]
    # The checks below are read from the device once, with the weights (HostChecks), in this order.
    checks = HostChecks()
    for i in differentiable:
        if batched[i]:
            checks.add(~all_finite(detached[i].detach()), NonFiniteLoss)
    try:
        with torch.enable_grad():
            example_grads: Sequence[Tensor | None]
            if at_output is not None and set(at_output.mean_grads) == set(differentiable):
                losses = at_output.losses  # the engine's: every floating leaf batched (AtOutput)
                example_grads = [at_output.mean_grads[i] for i in differentiable]
            else:
                at_output = None
                try:
                    losses = per_example_losses(per_example_fn, out, targets, batch_size)
                except NotExact as err:
                    raise OpaqueLoss(per_example=True) from err
                example_grads = (
                    torch.autograd.grad(losses.sum(), [detached[i] for i in differentiable], allow_unused=True)
                    if losses.requires_grad
                    else [None] * len(differentiable)
                )
                if not losses.requires_grad or any(
                    g is not None and not batched[i] for i, g in zip(differentiable, example_grads)
                ):
                    raise OpaqueLoss(per_example=True)
            ell = batch_fn(out) if targets is None else batch_fn(out, targets)
            if not isinstance(ell, Tensor) or ell.dim() != 0:
                raise ValueError(
                    "loss_fn on the whole batch must return a scalar (the batch loss), got "
                    + (f"shape {tuple(ell.shape)}" if isinstance(ell, Tensor) else type(ell).__name__)
                )
            checks.add(~torch.isfinite(ell.detach()), NonFiniteLoss)
            if not ell.requires_grad:
                raise OpaqueLoss()
            batch_grads = torch.autograd.grad(ell, [detached[i] for i in differentiable], allow_unused=True)
            if any(g is not None and not batched[i] for i, g in zip(differentiable, batch_grads)):
                raise OpaqueLoss()
            example_losses = losses.detach()
            checks.add(~torch.isfinite(example_losses).all(), lambda: _example_losses_not_finite(example_losses))
    except BaseException:
        checks.raise_first()  # a check added before the exception fails: its error, as when read in order
        raise
    on_batched = [i for i in differentiable if batched[i]]
    example_grads = [g for i, g in zip(differentiable, example_grads) if batched[i]]
    by_leaf = dict(zip(differentiable, batch_grads))
    w = derive_weights([by_leaf[i] for i in on_batched], example_grads, batch_size, checks=checks)
    if at_output is not None:  # derived against the gradient of the mean (1/B) Σ_i L_i
        read = getattr(w, _HOST_VALUES, None)  # already on the host: divided there, still no read
        w = w / batch_size if read is None else host_weights([v / batch_size for v in read])
    return w, [i for i, g in by_leaf.items() if g is not None]


def _weights_of_form(
    form: tuple[Tensor, Tensor], losses: Tensor, leaves: list, batched: list[bool]
) -> tuple[Tensor, list[int]]:
    """:func:`weights_at_output` of a standard loss, whose weights its form gives: w_i = D_i / Σ_j D_j for
    ``form`` = (the output tensor the loss reads, D) (:func:`persample.engines.fast.losses.example_weights`),
    ``losses`` the L_i at this output. The same outcomes as the derivation, in the same order: the output's
    batched floating leaves not finite, then the batch loss ℓ = Σ_i D_i L_i / Σ_j D_j not finite (every
    target ignored, or an L_i of an example it counts), raise :class:`NonFiniteLoss`; then an L_i that is
    not finite while ℓ is (an example whose targets are all ignored) raises ``EXAMPLE_LOSS_NOT_FINITE``.
    One host read, with the step's others (:class:`HostChecks`)."""
    source, denominators = form
    checks = HostChecks()
    for t, is_batched in zip(leaves, batched):
        if is_batched and t.is_floating_point():
            checks.add(~all_finite(t.detach()), NonFiniteLoss)
    weights: list[float] = []

    def read(values: list[float]) -> None:
        counts, finite = values[: len(values) // 2], values[len(values) // 2 :]
        total = math.fsum(counts)
        if total == 0 or any(d != 0 and not ok for d, ok in zip(counts, finite)):  # ℓ = 0/0, or an inf/NaN term
            raise NonFiniteLoss()
        if not all(finite):
            raise _example_losses_not_finite(losses)
        weights.extend(d / total for d in counts)

    flags = torch.isfinite(losses).to(device=denominators.device, dtype=torch.float64)
    checks.defer(torch.cat([denominators, flags]), read)
    checks.resolve()
    return host_weights(weights), [i for i, t in enumerate(leaves) if t is source]


class NonFiniteLoss(Exception):
    """Internal: the batch loss or the model output is inf/NaN at this step (a diverged or overflowing
    step): no weights, and no statistics, can be read from it."""


def reachable_leaves(roots: Sequence[Tensor]) -> set[int] | None:
    """ids of the leaf tensors (parameters, inputs) that autograd would reach from ``roots``:
    exactly those that ``backward()`` gives a ``.grad``; None when the graph hides some
    (re-entrant activation checkpointing builds the checkpointed part only during backward)."""
    leaves, hidden = graph_leaves(roots)
    return None if hidden else {id(t) for t in leaves}
