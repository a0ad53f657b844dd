"""The ``vmap`` engine: exact per-example gradients for any ``nn.Module``.

For example i with inputs x_i and target y_i, the per-example loss is
L_i(θ) = loss_fn(model(x_i[None]), y_i[None]) and g_i = ∇_θ L_i (unscaled).
The engine evaluates ``vmap(grad(L))`` with ``torch.func.functional_call``:
trainable parameters are the differentiated argument, frozen parameters are
constants, and buffers are passed through as clones (so in-place updates never
reach the model). Recurrent modules and train-mode InstanceNorms are routed
through equivalent forwards (:mod:`persample.engines._functional`) so that
``vmap`` supports them.

Where ``vmap`` cannot run a model (data-dependent branches on attention masks,
checkpointing, backward hooks, tensor hooks on parameters) the engine raises
:class:`~persample.errors.NotExact` rather than guess; the ``loop`` engine is exact there.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .._batch import Batch, one_example
from .._model import (
    backward_hooked_module,
    detached_buffers,
    first_random_module,
    has_gradient_hooks,
    hooked_parameters,
    is_vmap_randomness_error,
    randomness_error,
    restore_rng,
    rng_snapshot,
    trainable_parameters,
    cuda_devices,
)
from ..contract import PRECONDITIONS, refusal
from ..errors import NotExact
from ..stats import GradStats
from ._functional import ParameterReads, vmap_friendly_modules
from .streaming import stream_grad_stats

__all__ = [
    "per_example_grads",
    "vmap_grad_stats",
    "auto_chunk_size",
    "refuse_module_backward_hooks",
    "refuse_unseen_hooks",
    "refuse_compiled_sharing",
    "check_per_example_loss",
    "example_loss",
]

LossFn = Callable[..., Tensor]

#: Default gradient budget per chunk: chunk_size × P ≤ this many elements.
CHUNK_ELEMENTS = 1 << 25


def auto_chunk_size(num_params: int, batch_size: int) -> int:
    """Examples per chunk so that one chunk's gradients hold ≤ ``CHUNK_ELEMENTS`` numbers."""
    return max(1, min(batch_size, CHUNK_ELEMENTS // max(num_params, 1)))


def check_per_example_loss(loss) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            "loss_fn must return a scalar for ONE example: persample calls it on a batch of one, "
            f"loss_fn(model(x_i[None]), y_i[None]), but it returned shape {tuple(loss.shape)}. "
            "Use a reduction such as 'mean' or 'sum' (the PyTorch default 'mean' works as it is), "
            "not reduction='none'."
        )
    return loss


def example_loss(loss_fn: LossFn, output, target) -> Tensor:
    """L_i = loss_fn(output, target_i[None]) (or ``loss_fn(output)`` without targets) for ONE
    example whose ``output`` is already a batch of one; checked to be a scalar."""
    return check_per_example_loss(loss_fn(output) if target is None else loss_fn(output, one_example(target)))


def _example_loss_fn(model: nn.Module, loss_fn: LossFn, frozen: dict, buffers: dict, options: dict):
    """L(trainable, args, kwargs, target) for ONE example, returning (loss, loss) for has_aux;
    ``options`` (keyword inputs without tensors) are passed as they are."""

    def loss_of_example(trainable, args, kwargs, target):
        out = functional_call(
            model, (trainable, frozen, buffers), one_example(args), {**one_example(kwargs), **options}
        )
        loss = example_loss(loss_fn, out, target)
        return loss, loss.detach()

    return loss_of_example


def refuse_unseen_hooks(model: nn.Module, engine: str) -> None:
    """Raise :class:`NotExact` for hooks that change gradients but that ``engine`` cannot apply per
    example: tensor hooks on parameters, and module backward hooks (the ``loop`` engine honours both)."""
    if not has_gradient_hooks(model):
        return
    hooked = hooked_parameters(model)
    if hooked:
        raise NotExact(
            f"parameter {hooked[0]!r} has a gradient hook (p.register_hook), which the {engine} "
            "engine cannot apply to each example's gradient",
            code="PARAMETER_GRADIENT_HOOK",
        )
    refuse_module_backward_hooks(model, engine)


def refuse_compiled_sharing(model: nn.Module) -> None:
    """Raise ``VMAP_CANNOT_RUN`` (:class:`NotExact`) where a parameter is reached both inside a
    ``torch.compile``d submodule and outside it (``self.l1`` and ``torch.compile(nn.Sequential(self.l1, ...))``).
    ``torch.func.functional_call`` on such a model leaves the compiled module's cached graph without that
    parameter's gradient for every later call, the user's own training included (torch 2.13; a whole model
    compiled, or a compiled submodule whose parameters are its own, is fine)."""
    inside: set[int] = set()
    outside: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if "_orig_mod" in name.split("."):
            inside.add(id(p))
        else:
            outside.setdefault(id(p), name)
    shared = [outside[i] for i in inside if i in outside]
    if shared:
        raise refusal(
            "VMAP_CANNOT_RUN",
            f"parameter {shared[0]!r} is used both inside a torch.compile'd submodule and outside it: "
            "torch.func.functional_call would leave the compiled module without its gradient for every later "
            f"call. Fix: {PRECONDITIONS['VMAP_CANNOT_RUN'].fix}",
        )


def refuse_module_backward_hooks(model: nn.Module, engine: str) -> None:
    """Raise ``MODULE_BACKWARD_HOOK`` (:class:`NotExact`) where a module backward hook (its own or global)
    may change the gradients reaching every module before it, per example, which ``engine`` cannot apply."""
    owner = backward_hooked_module(model)
    if owner is not None:
        raise NotExact(
            f"{owner} has a backward hook, which the {engine} engine cannot apply per example",
            code="MODULE_BACKWARD_HOOK",
            module=owner,
        )


@contextlib.contextmanager
def _engine_context(model: nn.Module, loss_fn: LossFn, batch: Batch, randomness: str = "error") -> Iterator[None]:
    """What every vmap call runs under: no outer graph, vmap-friendly modules, clear errors.

    Random ops under ``randomness="error"`` raise :class:`UnsupportedModelError` naming the
    module; any other failure of ``torch.func`` to run the model (data-dependent control flow on
    masks, checkpointing, ops without a batching rule) becomes :class:`NotExact`, so that
    ``engine="auto"`` can move on to the per-example loop. So does a draw that vmap refuses under
    ``randomness="different"`` or ``"same"`` (an in-place draw on an unbatched tensor: a module built
    in the forward, as BigBird's first short batch does): the draw was allowed, torch.func cannot make
    it, and the loop can.
    """
    with torch.no_grad(), vmap_friendly_modules(model):
        try:
            yield
        except RuntimeError as err:
            if isinstance(err, NotExact) and err.code is not None:  # a refusal of its own (ParameterReads)
                raise
            if is_vmap_randomness_error(err) and randomness == "error":
                raise randomness_error(
                    first_random_module(model, lambda: batch.slice(0, 1).call(model, loss_fn))
                ) from err
            raise NotExact(
                f"torch.func.vmap cannot run this model: {type(err).__name__}: {_first_line(err)}",
                code="VMAP_CANNOT_RUN",
            ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def _grads_function(model: nn.Module, loss_fn: LossFn, batch: Batch, randomness: str):
    """``fn(b)``: (per-example gradients, losses) of the examples of ``b``. Every call (one per chunk)
    starts from fresh copies of the buffers as found, so that a forward that updates a buffer it reads
    (spectral norm's power iteration) computes every chunk's examples from the same state, as one batch
    forward would; under ``randomness="same"`` from the same RNG state too (one draw for all examples)."""
    parameters = trainable_parameters(model)
    trainable = {n: p.detach() for n, p in parameters.items()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    target_dim = None if batch.targets is None else 0
    shared_rng = rng_snapshot(model) if randomness == "same" else None

    def grads_of(b: Batch):
        if shared_rng is not None:
            restore_rng(model, shared_rng)
        # the model's own buffers never change here: functional_call writes into these clones
        loss_of_example = _example_loss_fn(model, loss_fn, frozen, detached_buffers(model), b.options)
        fn = vmap(grad(loss_of_example, has_aux=True), in_dims=(None, 0, 0, target_dim), randomness=randomness)
        with ParameterReads(parameters):
            return fn(trainable, b.args, b.kwargs, b.targets)

    return grads_of


def per_example_grads(
    model: nn.Module, loss_fn: LossFn, batch: Batch, *, randomness: str = "error", chunk_size: int | None = None
) -> tuple[dict[str, Tensor], Tensor]:
    """Materialised per-example gradients ``{name: [B, *shape]}`` and losses ``[B]``.

    ``chunk_size`` is passed to ``vmap``: it bounds the working memory of the
    computation, not the ``B × P`` result.
    """
    refuse_unseen_hooks(model, "vmap")
    refuse_compiled_sharing(model)
    with _engine_context(model, loss_fn, batch, randomness):
        grads_fn = _grads_function(model, loss_fn, batch, randomness)
        if chunk_size is None or chunk_size >= batch.size:
            return grads_fn(batch)
        parts = [grads_fn(chunk) for chunk in batch.chunks(chunk_size)]
        return (
            {n: torch.cat([grads[n] for grads, _ in parts]) for n in parts[0][0]},
            torch.cat([losses for _, losses in parts]),
        )


def vmap_grad_stats(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    *,
    randomness: str = "error",
    chunk_size: int | None = None,
    var: bool = True,
    inner_products: bool = False,
    clip_norm: float | None = None,
    progress: Callable[[int], None] | None = None,
    reference: Mapping[str, Tensor] | None = None,
) -> GradStats:
    """:class:`GradStats` streamed over chunks: peak extra memory O(chunk_size × P + P).

    Each chunk's per-example gradients are reduced to statistics and merged
    exactly, then dropped (:func:`.streaming.stream_grad_stats`).
    ``chunk_size=None`` picks :func:`auto_chunk_size`.
    """
    refuse_unseen_hooks(model, "vmap")
    refuse_compiled_sharing(model)
    num_params = sum(p.numel() for p in trainable_parameters(model).values())
    size = chunk_size or auto_chunk_size(num_params, batch.size)
    with _engine_context(model, loss_fn, batch, randomness):
        grads_fn = _grads_function(model, loss_fn, batch, randomness)
        return stream_grad_stats(
            grads_fn,
            batch,
            size,
            var=var,
            inner_products=inner_products,
            clip_norm=clip_norm,
            progress=progress,
            rng_devices=cuda_devices(model),
            reference=reference,
            replay_rng=randomness != "error",
        )
