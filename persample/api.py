"""The public functions: ``per_sample_grads`` and ``grad_stats``.

Conventions (shared by every engine):

- g_i = ∇_θ loss_fn(model(x_i[None]), y_i[None]) is example i's own gradient,
  never divided by the batch size; (1/B) Σ_i g_i is autograd's gradient of the
  mean loss.
- Keys are the names from ``model.named_parameters()`` whose parameter has
  ``requires_grad``; a tied parameter appears once and sums over every use.
- Variance is unbiased, 1/(B−1) Σ_i (g_i − ḡ)², per element.
- The model is left as it was found: buffers, training flags, ``p.grad`` and
  the RNG state are unchanged afterwards, also after an error.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from torch import Tensor, nn

from ._batch import Batch, as_batch
from ._model import check_clip_norm, check_supported, preserved_state
from ._progress import progress_bar
from .engines.capture import NotExact
from .engines.fast import fast_grad_stats
from .engines.vmap import per_example_grads, vmap_grad_stats
from .stats import GradStats

__all__ = ["per_sample_grads", "grad_stats", "ENGINES"]

LossFn = Callable[..., Tensor]
Randomness = Literal["error", "different", "same"]
ENGINES = ("auto", "vmap", "fast")


def per_sample_grads(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any = None, *,
                     chunk_size: int | None = None, randomness: Randomness = "error") -> dict[str, Tensor]:
    """Per-example gradients ``{name: Tensor[B, *param.shape]}``; row i is dL_i/dθ, unscaled.

    Args:
        model: any ``nn.Module``, on any device and dtype.
        loss_fn: ``loss_fn(output, target)`` (or ``loss_fn(output)`` when
            ``targets`` is None), called on a batch of ONE example; returns that
            example's scalar loss. Standard losses with their default ``mean``
            reduction work as they are. ``output`` is whatever the model
            returns (tensor, tuple, dict, Hugging Face ``ModelOutput``).
        inputs: a tensor, a tuple of tensors (positional arguments) or a dict of
            tensors (keyword arguments), each batched on dim 0.
        targets: a tensor (or tuple/dict of tensors) batched on dim 0, or None.
        chunk_size: examples per ``vmap`` chunk; bounds working memory, never
            changes results. The ``B × P`` result is always materialised: use
            :func:`grad_stats` when statistics are enough.
        randomness: ``torch.func.vmap``'s randomness mode for random ops such as
            dropout: ``"error"`` (default), ``"different"`` or ``"same"``.

    Built on ``torch.func.functional_call`` + ``vmap`` + ``grad``: buffers are
    passed through, frozen parameters are constants.
    """
    batch = as_batch(inputs, targets)
    _check_chunk_size(chunk_size)
    check_supported(model, randomness)
    with preserved_state(model):
        grads, _ = per_example_grads(model, loss_fn, batch, randomness=randomness, chunk_size=chunk_size)
    return grads


def grad_stats(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any = None, *,
               chunk_size: int | None = None, randomness: Randomness = "error", engine: str = "auto",
               var: bool = True, inner_products: bool = False, clip_norm: float | None = None,
               progress: bool = False) -> GradStats:
    """:class:`GradStats` of the per-example gradients, without keeping ``B × P`` of them.

    Same arguments and conventions as :func:`per_sample_grads`, plus:

    Args:
        chunk_size: examples whose gradients are alive at once. Peak extra
            memory is O(chunk_size × P + P). ``None`` picks a chunk that holds
            at most 2**25 gradient numbers.
        engine: ``"vmap"`` (torch.func, exact for any model, streamed over
            chunks), ``"fast"`` (one forward + backward with closed-form layer
            rules; raises :class:`~persample.engines.capture.NotExact` where it
            cannot be exact) or ``"auto"`` (fast when exact, otherwise vmap).
        var: compute the per-element variance (``m2``); ``False`` gives mean
            and norms only.
        inner_products: also compute p_i = ⟨g_i, ḡ⟩ (needed by the
            inner-product and orthogonality tests). Costs a second streamed
            pass when the batch spans several chunks.
        clip_norm: also compute ``clipped_mean`` = (1/B) Σ_i min(1, C/‖g_i‖) g_i
            for C = ``clip_norm`` (per-example clipping, as in DP-SGD).
        progress: show a tqdm progress bar over examples (if tqdm is installed).
    """
    return compute_stats(model, loss_fn, as_batch(inputs, targets), chunk_size=chunk_size,
                         randomness=randomness, engine=engine, var=var, inner_products=inner_products,
                         clip_norm=clip_norm, progress=progress)


def compute_stats(model: nn.Module, loss_fn: LossFn, batch: Batch, *, chunk_size: int | None = None,
                  randomness: str = "error", engine: str = "auto", var: bool = True,
                  inner_products: bool = False, clip_norm: float | None = None, progress: bool = False,
                  fork_rng: bool = True) -> GradStats:
    """:func:`grad_stats` on a validated :class:`Batch`.

    ``fork_rng=False`` lets random ops advance the global RNG as a training
    step would (what :class:`persample.Tracker` wants).
    """
    _check_chunk_size(chunk_size)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    check_clip_norm(clip_norm)
    check_supported(model, randomness)
    with preserved_state(model, fork_rng=fork_rng):
        if engine in ("auto", "fast"):
            try:
                return fast_grad_stats(model, loss_fn, batch, randomness=randomness, var=var,
                                       inner_products=inner_products, clip_norm=clip_norm)
            except NotExact:
                if engine == "fast":
                    raise
        with progress_bar(batch.size, "per-example grads", progress) as update:
            return vmap_grad_stats(model, loss_fn, batch, randomness=randomness, chunk_size=chunk_size,
                                   var=var, inner_products=inner_products, clip_norm=clip_norm,
                                   progress=update)


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
