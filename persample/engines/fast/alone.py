"""The spot check against the definition: examples 0 and B − 1 computed alone, once per input signature.

The fast engine reads every g_i off ONE batched forward and backward. That is right only if the forward
treats each example as it would treat it alone, on a batch of one, which is the definition
(L_i = ``loss_fn(model(x_i[None]), y_i[None])``). The capture's watchers and the graph audit see ops that
mix rows (a roll, a reduction over dim 0, a cross-row index); they cannot see a forward that treats an
example by its *position* in the batch or by the batch's *size*, where no gradient crosses rows:
``x[0] = 0``, ``x / x.shape[0]``, ``h * torch.arange(B)[:, None]``, ``x + x[-1]`` (row 0's gradient is
its own), ``x.narrow(0, 0, 1)``, ``torch.stack(reversed(x.unbind(0)))``, ``index_fill`` of row 0.

:func:`check_alone` compares the engine's own per-example results for j ∈ {0, B − 1} with plain autograd
on example j alone (``torch.autograd.grad`` of ``loss_fn(model(x_j[None]), y_j[None])`` with respect to
the trainable parameters; no ``.grad`` is touched): the loss L_j and every parameter's g_j, at a tolerance
from the dtype (:func:`tolerance`). Both ends are needed: ``x + x[-1]`` changes only example 0 (example
B − 1 adds itself, as alone), ``h[-1] = 0`` only example B − 1. A difference, or an error when the model
runs example j alone, is the refusal ``EXAMPLE_DIFFERS_ALONE`` (``engine="auto"`` then computes each
example alone: vmap or the loop).

It runs where the per-model plan (:mod:`.plan`) has no verdict yet for the call's input signature
(:func:`signature`): a passed check is remembered there, so repeated calls pay nothing; the first pays two
batch-of-one forward + backward passes. Buffers are put back as the engine's call found them before each
example (every example of a batch forward sees the same buffers) and as the batch's forward left them at
the end. Random draws are never made by the check: a forward that draws (dropout under
``randomness="different"``) is not checked (its draws alone could not be those of the batch) and gets no
verdict; a draw seen only alone stops the check before it draws. No ``.grad`` is touched (never
``backward()``: a re-entrant checkpoint, which refuses ``torch.autograd.grad``, is not checked). Forward
hooks and parameter tensor hooks fire on the two passes alone too. What it cannot see (interior positions,
effects that appear only on later batches of a checked signature, ``Tracker.observe`` where the forward's
inputs are not all batched): ``docs/spot-check.md``. ``Tracker.observe`` runs it on the observed forward's
inputs (:mod:`.observe`).
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..._batch import Batch, flat_leaves
from ..._model import RandomCalls, RandomCallStop, autocast_state, buffer_state, restore_buffer_state
from ...contract import refusal
from .._autograd import dense_gradient, is_reentrant_checkpoint_error
from ..vmap import check_per_example_loss
from .pieces import Piece

__all__ = ["signature", "check_alone", "tolerance", "CheckedAlone", "without_spot_check", "spot_check_off"]

_OFF: ContextVar[bool] = ContextVar("persample_spot_check_off", default=False)


@contextlib.contextmanager
def without_spot_check() -> Iterator[None]:
    """No spot check inside the block: for callers that compare every example with the loop themselves
    (:func:`persample.check_rule`'s harness), where the check would only refuse first."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


def spot_check_off() -> bool:
    """Whether the caller is inside :func:`without_spot_check`."""
    return _OFF.get()


def _leaf_key(t: Any) -> tuple:
    if isinstance(t, Tensor):
        return (t.dtype, t.device.type, t.dim(), t.requires_grad)
    return (type(t).__name__,)


def signature(batch: Batch) -> tuple:
    """What a verdict of the spot check holds for: the batch size, the inputs' and targets' structure (the
    number of positional inputs, the keyword names, per tensor leaf its dtype, device type, number of dims
    and whether it requires grad; the options' values) and the autocast settings. Not the randomness mode
    (a forward that draws is never checked, so a verdict is about a forward that draws nothing, under
    any mode), nor the other sizes (sequence lengths: dynamic padding does not pay every step). The batch
    size is in: a forward may treat the examples by the batch size only at some sizes (``x * 2 if
    x.shape[0] >= 6``), which a verdict at another size would vouch for; each size seen pays its two
    batch-of-one passes once (a batch of one has no position to get wrong, and gets no verdict)."""
    return (
        batch.size,
        len(batch.args),
        tuple(batch.kwargs),
        tuple(_leaf_key(t) for t in batch.input_leaves),
        type(batch.targets).__name__,
        tuple(_leaf_key(t) for t in flat_leaves(batch.targets)),
        tuple(sorted((k, repr(v)) for k, v in batch.options.items())),
        autocast_state(),
    )


def tolerance(dtypes: list[torch.dtype], autocast: bool, device_types: set[str]) -> float:
    """Relative tolerance of the comparison, from the precision the forward ran in.

    A batch-of-one forward may reduce in another order than the batched one (other kernels), so the
    two agree to rounding only: float64 1e-5 (not 1e-9: some Hugging Face families compute norms and
    softmaxes in float32 inside a float64 model, which puts 1e-11 … 1.5e-7 relative between a batch and
    its examples alone; ``tests/real_models.py``, ``NOISE_FAMILIES``), float32 1e-3 (1e-2 on CUDA with
    TF32 matmuls allowed), half precision or autocast 5e-2. A position or batch-size effect changes an
    example's gradient by O(1) of itself (0.4 … 2.9 on the battery's forms)."""
    if autocast or any(d in (torch.float16, torch.bfloat16) for d in dtypes):
        return 5e-2
    if all(d == torch.float64 for d in dtypes):
        return 1e-5
    if "cuda" in device_types and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32):
        return 1e-2
    return 1e-3


class CheckedAlone:
    """The outcome of :func:`check_alone`: ``verdict`` True where the check ran and passed (remember it),
    False where it could not run (a random draw, a non-finite value): nothing to remember."""

    def __init__(self, verdict: bool, reason: str = ""):
        self.verdict, self.reason = verdict, reason


def check_alone(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batch: Batch,
    params: dict[str, nn.Parameter],
    pieces: dict[str, Piece],
    losses: Tensor,
    buffers_found: list,
) -> CheckedAlone:
    """Compare the engine's L_j and g_j (``losses[j]``; per parameter ‖g_j‖² and ⟨g_j, g_j alone⟩ from the
    pieces, :func:`_norms_and_inner`) with autograd on example j alone, for j ∈ {0, B − 1}; raise
    ``EXAMPLE_DIFFERS_ALONE`` (:class:`NotExact`) on a difference beyond :func:`tolerance` or where the
    model fails on example j alone.

    ``buffers_found``: the buffers as the engine's call found them (:func:`.._model.buffer_state`); every
    example runs from them, and the buffers end as the batch's forward left them."""
    after = buffer_state(model)
    try:
        for j in sorted({0, batch.size - 1}):
            restore_buffer_state(buffers_found)
            outcome = _check_one(model, loss_fn, batch, params, pieces, losses, j)
            if outcome is not None:
                return CheckedAlone(False, outcome)
    finally:
        restore_buffer_state(after)
    return CheckedAlone(True)


def _norms_and_inner(piece: Piece, alone: Tensor, j: int, form: bool) -> tuple[float, float, float, float]:
    """(‖a‖², ‖b‖², ⟨b, a⟩, ‖b − a‖²) in float64 for a = ``alone`` and b = the piece's g_j: with ``form``, or
    where the piece has no closed forms, from row j formed (one row: as many numbers as ``alone``), so that
    ‖b − a‖ is read directly; else from the closed forms (``sq_norms`` and ``inner``, no row formed), where
    ‖b − a‖² = ‖a‖² − 2⟨b, a⟩ + ‖b‖²."""
    a = alone.double()
    a2 = float(a.square().sum())
    if not form and type(piece).inner is not Piece.inner:  # a closed form (outer products, rows, sums, zeros)
        norms = piece.sq_norms()
        ref = alone.reshape(piece.shape).to(device=norms.device, dtype=norms.dtype)
        b2, ab = float(norms[j].double()), float(piece.inner(ref)[j].double())
        return a2, b2, ab, max(a2 - 2 * ab + b2, 0.0)
    b = piece.materialize(j, j + 1).reshape(a.shape).to(device=a.device, dtype=torch.float64)
    return a2, float(b.square().sum()), float((a * b).sum()), float((b - a).square().sum())


def _failed_alone(j: int, err: BaseException) -> Exception:
    first = str(err).splitlines()[0] if str(err) else ""
    return refusal(
        "EXAMPLE_DIFFERS_ALONE",
        f"example {j} of the batch could not be computed alone, on a batch of one, to check the fast "
        f"engine's reading of it ({type(err).__name__}: {first}); per-example gradients are those of "
        "loss_fn on each example alone. engine='auto' computes each example alone (vmap or the loop)",
    )


def _check_one(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batch: Batch,
    params: dict[str, nn.Parameter],
    pieces: dict[str, Piece],
    losses: Tensor,
    j: int,
) -> str | None:
    """None where example j agrees; a reason where the check could not be made; raises on a difference."""
    example = batch.slice(j, j + 1)
    try:
        with torch.enable_grad(), RandomCalls(stop=True):
            loss = check_per_example_loss(example.call(model, loss_fn))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    except RandomCallStop:
        return "the forward draws random numbers alone"
    except RuntimeError as err:  # backward() would be needed, which writes .grad of leaves it cannot all name
        if is_reentrant_checkpoint_error(err):
            return "a re-entrant checkpoint refuses torch.autograd.grad"
        raise _failed_alone(j, err) from err
    except Exception as err:
        raise _failed_alone(j, err) from err
    alone = {name: dense_gradient(g, p).detach() for (name, p), g in zip(params.items(), grads)}
    dtypes = [p.dtype for p in params.values()] + [loss.dtype]
    autocast = any(enabled for _, enabled, _ in autocast_state())
    rtol = tolerance(dtypes, autocast, {p.device.type for p in params.values()})
    # float64 sums leave ‖b − a‖² = ‖a‖² − 2⟨b, a⟩ + ‖b‖² accurate to ~1e-15 of ‖a‖², far below rtol². In
    # lower precision the pieces' rounding is too close to rtol² to read it there (float32: ~1e-7 of ‖a‖²
    # against 1e-6), and the squares alone miss a turn of g_j: b = a + δ with δ ⟂ a moves ‖b‖² and ⟨b, a⟩ by
    # ‖δ‖² only, so a 4 % turn passed in float32 and a 30 % one under autocast; row j is formed instead and
    # ‖b − a‖ read directly (float32 rounding ~1e-6 of ‖a‖; a bf16 autocast batch and its example alone
    # differ by ~3e-3, against 5e-2)
    form = autocast or not all(d == torch.float64 for d in dtypes)
    # per parameter (‖a‖², ‖b‖², ⟨b, a⟩, ‖b − a‖²) of a = g_j alone, b = the engine's g_j: b = a iff both are ‖a‖²
    found = {name: _norms_and_inner(pieces[name], alone[name], j, form) for name in params}
    la, lb = float(loss.detach().double()), float(losses[j].double())
    if not all(math.isfinite(v) for v in (la, lb, *(v for four in found.values() for v in four))):
        return "a value is not finite"
    worst: tuple[float, str] | None = None
    if abs(la - lb) > rtol * max(abs(la), abs(lb)):
        worst = (abs(la - lb) / max(abs(la), abs(lb)), f"its loss is {lb:.6g} in the batch, {la:.6g} alone")
    floor = 1e-6 * max((max(a2, b2) for a2, b2, _, _ in found.values()), default=0.0)  # (1e-3 of a norm)²
    for name, (a2, b2, ab, d2) in found.items():
        scale = max(a2, b2, floor)
        differs = max(abs(b2 - a2), abs(ab - a2)) / (2 * scale) if scale > 0 else 0.0
        if scale > 0:  # ‖b − a‖ / ‖a‖ itself: a difference orthogonal to a shows only squared above
            differs = max(differs, math.sqrt(d2 / scale))
        if differs > rtol and (worst is None or differs > worst[0]):
            worst = (
                differs,
                f"for {name}, ‖g_j‖² is {b2:.6g} in the batch and {a2:.6g} alone, ⟨g_j batch, g_j alone⟩ {ab:.6g}",
            )
    if worst is not None:
        raise refusal(
            "EXAMPLE_DIFFERS_ALONE",
            f"example {j}'s gradient in the batch differs from its gradient alone ({worst[1]}; tolerance "
            f"{rtol:g}): the forward treats an example by its position in the batch or by the batch size "
            "(x[0], x.shape[0], arange(B), narrow/split/unbind along dim 0), which no gradient shows, or a "
            "custom rule (persample.register_rule) gives wrong per-example gradients (persample.check_rule "
            "names it). engine='auto' computes each example alone (vmap or the loop: loss_fn on a batch of one)",
        )
    return None
