"""Materialised per-example gradients from the fast engine (:func:`persample.per_sample_grads`).

The same forward + backward and the same refusals as :func:`.engine.fast_grad_stats`; then each
parameter's piece forms g_i for every example (:meth:`.pieces.Piece.materialize_all`): for a
Linear on sequences g_i = s·Σ_t b_it a_itᵀ (one batched matmul written into the result), for an
Embedding a scatter of the output gradients into the rows of the ids, for a fallback module the
gradients ``torch.func`` formed. Autograd skips the weight gradients of layers with a built-in rule
(their sum would be wasted work); fallbacks and user rules keep theirs, which check them.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..._batch import Batch
from ..._model import autocast_as
from .engine import fast_pieces

__all__ = ["fast_per_example_grads"]


def fast_per_example_grads(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    batch: Batch,
    *,
    randomness: str = "error",
    keep_output: list | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """``({name: g [B, *param.shape]}, losses [B])`` with g_i unscaled (example i's own gradient), in
    each parameter's dtype, keys in ``named_parameters()`` order; or :class:`~persample.NotExact`.

    Memory: the B × P result plus the fast engine's captured activations and output gradients (one
    chunk of at most ``pieces.CHUNK_ELEMENTS`` numbers more where a piece forms g_i in chunks).
    ``keep_output``: as for :func:`.engine.fast_grad_stats`.
    """
    found = fast_pieces(model, loss_fn, batch, randomness=randomness, var=False, keep_output=keep_output, form_all=True)
    grads = {}
    with autocast_as(None):
        for name, p in found.params.items():
            g = found.pieces[name].materialize_all()
            grads[name] = g if g.dtype == p.dtype else g.to(p.dtype)
    return grads, found.losses
