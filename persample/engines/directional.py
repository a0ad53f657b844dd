"""Per-example inner products ⟨g_i, v⟩ with one direction v, from one forward-mode pass.

For a fixed direction v (a dict keyed like the trainable parameters),
⟨g_i, v⟩ = ⟨∇_θ L_i, v⟩ = d/dε L_i(θ + εv) at ε = 0: the directional
derivative of example i's loss. ``torch.func.jvp`` of the vector of
per-example losses [L_1, …, L_B] along v gives all B of them in one forward
pass with dual numbers, without forming any per-example gradient. g_i is
unscaled (example i's own loss), as everywhere in persample.

This is the "second B-sized pass" of :func:`persample.distributed.all_reduce_stats`:
inner products relative to the global mean ḡ, which is known only after the
ranks' statistics were reduced.

Assumptions, checked where they can be:

- the batched forward keeps examples apart (example i's output depends on
  input i only), as the fast engine assumes; train-mode BatchNorm is refused
  before (``check_supported``);
- no random ops: a second forward would draw different dropout masks from
  the pass that produced the statistics, so a model with active dropout is
  refused with :class:`~persample.errors.UnsupportedModelError`.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def _math_attention():
        return sdpa_kernel([SDPBackend.MATH])
except ImportError:  # pragma: no cover - older torch

    def _math_attention():
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)


from .._batch import Batch
from .._model import check_supported, detached_buffers, dropout_probability, preserved_state, trainable_parameters
from ..errors import UnsupportedModelError
from ._functional import vmap_friendly_modules

__all__ = ["per_example_directional_derivatives"]


def per_example_directional_derivatives(
    model: nn.Module, loss_fn: Callable[..., Tensor], batch: Batch, direction: Mapping[str, Tensor]
) -> Tensor:
    """p_i = ⟨g_i, v⟩ for every example of ``batch``: a tensor of shape ``[B]``.

    ``direction`` must have an entry for every trainable parameter (the keys
    of ``named_parameters()`` with ``requires_grad``), of that parameter's
    shape. The model is left as it was found.
    """
    from .fast import per_example_losses  # the fast engine's closed-form / vmapped losses

    random = [name or "<root>" for name, m in model.named_modules() if dropout_probability(m)]
    if random:
        raise UnsupportedModelError(
            f"module {random[0]} draws random numbers (dropout) in training mode: per-example inner "
            "products from a second forward pass would see other dropout masks than the statistics. "
            "Call model.eval(), or do without inner products (inner_products=False)",
            code="RANDOM_INNER_PRODUCTS",
            module=random[0],
        )
    check_supported(model, "error")
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(direction))
    if missing:
        raise ValueError(f"direction has no entry for the trainable parameters {missing}")
    primals = {n: p.detach() for n, p in params.items()}
    tangents = {}
    for n, p in primals.items():
        v = direction[n]
        if v.shape != p.shape:
            raise ValueError(f"direction[{n!r}] has shape {tuple(v.shape)}, but the parameter has {tuple(p.shape)}")
        tangents[n] = v.detach().to(device=p.device, dtype=p.dtype)
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    with preserved_state(model):
        buffers = detached_buffers(model)

        def losses_of(trainable):
            output = functional_call(model, (trainable, frozen, buffers), batch.args, {**batch.kwargs, **batch.options})
            return per_example_losses(loss_fn, output, batch.targets, batch.size)

        # The fused attention kernels have no forward-mode derivative; the math one is composite.
        with torch.no_grad(), vmap_friendly_modules(model), _math_attention():
            _, derivatives = jvp(losses_of, (primals,), (tangents,))  # type: ignore[misc]  # 2 without has_aux
    return derivatives.detach()
