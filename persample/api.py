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

import contextlib
import warnings
from typing import Any, Callable, Literal, Mapping

import torch
from torch import Tensor, nn

from ._batch import Batch, as_batch
from ._model import (
    RandomCalls,
    check_clip_norm,
    check_supported,
    preserved_state,
    random_state,
    restore_as_found,
    restore_buffer_state,
    restore_module_attributes,
    set_random_state,
    trainable_parameters,
)
from .batch_loss import check_batch_loss, gradient_multiple, loss_parts
from .contract import PRECONDITIONS, refusal
from .errors import BatchLossMismatch
from ._host_reads import one_host_read, open_checks
from ._progress import progress_bar
from ._warn import short_reason, user_stacklevel
from .errors import NotExact, PersampleError
from .engines.fast import fast_grad_stats
from .engines.fast.grads import fast_per_example_grads
from .engines.fast.plan import planned_sharding
from .engines.fast.recurrent import has_recurrent_layers, output_checks_read_with_the_step
from .engines.loop import loop_grad_stats, loop_grads
from .engines.vmap import per_example_grads, vmap_grad_stats
from .errors import SlowPathWarning
from .stats import GradStats

__all__ = ["per_sample_grads", "grad_stats", "ENGINES"]

LossFn = Callable[..., Tensor]
Randomness = Literal["error", "different", "same"]
ENGINES = ("auto", "fast", "vmap", "loop")

#: The engines each ``engine=`` choice tries, in order; each one is exact or raises ``NotExact``.
#: ``"independent"`` (internal, for ``check_mean``) leaves out the fast engine, whose mean is
#: autograd's whole-batch gradient (or, for layers that form their g_i, their sum) and so cannot
#: test the invariant.
_CHAINS = {
    "auto": ("fast", "vmap", "loop"),
    "fast": ("fast",),
    "vmap": ("vmap",),
    "loop": ("loop",),
    "independent": ("vmap", "loop"),
}
_GRADS_CHAINS = {"auto": ("fast", "vmap", "loop"), "fast": ("fast",), "vmap": ("vmap",), "loop": ("loop",)}


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any = None,
    *,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    engine: str = "auto",
    batch_loss_check: bool = True,
) -> dict[str, Tensor]:
    """Per-example gradients ``{name: Tensor[B, *param.shape]}``; row i is dL_i/dθ, unscaled.

    >>> import torch, persample
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(5, 3), torch.randn(5, 2)
    >>> grads = persample.per_sample_grads(model, torch.nn.functional.mse_loss, x, y)
    >>> grads["weight"].shape                      # one gradient per example, never divided by B
    torch.Size([5, 2, 3])
    >>> torch.nn.functional.mse_loss(model(x), y).backward()
    >>> torch.allclose(grads["weight"].mean(0), model.weight.grad, atol=1e-6)  # the invariant
    True

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
            changes results (the fast engine forms at most ``2**23`` gradient
            numbers at a time besides the result). The ``B × P`` result is always materialised: use
            :func:`grad_stats` when statistics are enough.
        randomness: what random ops (dropout) do: ``"error"`` (default: refuse,
            naming the module), ``"different"`` (an independent draw per
            example) or ``"same"`` (one draw shared by all examples). The
            default refuses because a call here measures a function: with
            dropout on, each example's gradient is a random draw, and which
            draws (independent or shared, or none after ``model.eval()``) the
            numbers describe is the caller's choice to make, not a silent
            default. :class:`persample.Tracker`, which describes a training
            step, defaults to ``"different"``: the training forward's own draws.
        engine: ``"fast"`` (one forward + backward; each layer's g_i formed
            from its input and output gradient by its closed-form rule, or by
            ``torch.func`` on that module alone; raises :class:`~persample.NotExact`
            where it cannot show it is exact), ``"vmap"`` (``torch.func``:
            ``functional_call`` + ``vmap`` + ``grad``; buffers passed through,
            frozen parameters constants), ``"loop"`` (one forward + backward per
            example) or ``"auto"`` (the first of fast, vmap, loop that is exact;
            reaching the loop warns with :class:`~persample.SlowPathWarning`).
            Every engine gives the same numbers (up to rounding); the result
            is in each parameter's dtype.
        batch_loss_check: check first that ``loss_fn`` on the whole batch is a
            weighted sum Σ_i w_i L_i of the per-example losses (any weights), at
            the model's output on the batch: one more forward without gradients
            and a loss-only backward, never a model backward. A loss that couples
            the examples (NT-Xent / SimCLR, CLIP, batch-hard triplets,
            batch-centred errors, a load-balancing term over the batch) then
            raises :class:`~persample.BatchLossMismatch`, since its per-example
            gradients (of ``loss_fn`` on each example alone) describe a different
            loss than the batch's. ``False`` skips the check, for batch-of-one
            gradients on purpose. A loss computed inside the model (``out.loss``)
            cannot be checked at the output: :func:`persample.check_mean` tests it.
            The fast engine's own forward gives the output (no forward more).
    """
    batch = as_batch(inputs, targets)
    _check_chunk_size(chunk_size)
    chain = _engine_chain(engine, _GRADS_CHAINS)
    check_supported(model, randomness)
    first_forward: list = []  # the fast engine's forward of the batch: its output, for batch_loss_check
    # Without the fast engine's forward, one of the check's own: before the work where no random draw
    # is allowed, else after the engines (it must not move their draws).
    check_first = batch_loss_check and chain[0] != "fast" and randomness == "error"
    with preserved_state(model, rewind_rng=randomness != "error") as found:
        opaque = False
        if check_first:
            opaque = _check_loss_on_batch(model, loss_fn, batch, None, found, stop_random=True)

        def run(name: str):
            if name == "fast":
                keep = first_forward if batch_loss_check else None
                del first_forward[:]  # what a refused attempt kept (it runs again after a widening: _widening)
                return fast_per_example_grads(model, loss_fn, batch, randomness=randomness, keep_output=keep)
            if name == "vmap":
                return per_example_grads(model, loss_fn, batch, randomness=randomness, chunk_size=chunk_size)
            return loop_grads(model, loss_fn, batch, randomness=randomness)

        grads, _ = _first_exact(chain, run, reset=lambda: restore_as_found(found))
        if batch_loss_check and not check_first:
            opaque = _check_loss_at_kept_output(model, loss_fn, batch, first_forward, found)
        if opaque and randomness == "error":
            _check_loss_in_the_model(model, loss_fn, batch, {k: g.mean(0) for k, g in grads.items()}, found)
    return grads


def grad_stats(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Any = None,
    *,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    engine: str = "auto",
    var: bool = True,
    inner_products: bool = False,
    clip_norm: float | None = None,
    progress: bool = False,
    reference: Mapping[str, Tensor] | None = None,
    batch_loss_check: bool = True,
) -> GradStats:
    """:class:`GradStats` of the per-example gradients, without keeping ``B × P`` of them.

    Mean (1/B) Σ_i g_i, unbiased per-element variance 1/(B−1) Σ_i (g_i − ḡ)², and the squared
    norms ‖g_i‖² of the unscaled per-example gradients g_i = dL_i/dθ.

    >>> import torch, persample
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> stats = persample.grad_stats(model, torch.nn.functional.mse_loss, torch.randn(6, 3), torch.randn(6, 2))
    >>> stats.n, stats.var["0.weight"].shape, stats.sq_norms.shape
    (6, torch.Size([4, 3]), torch.Size([6]))

    Same arguments and conventions as :func:`per_sample_grads`, plus:

    Args:
        chunk_size: examples whose gradients are alive at once. Peak extra
            memory is O(chunk_size × P + P). ``None`` picks a chunk that holds
            at most 2**25 gradient numbers.
        engine: ``"fast"`` (one forward + backward with closed-form layer
            rules; raises :class:`~persample.NotExact` where it cannot show it
            is exact), ``"vmap"`` (torch.func, streamed over chunks; raises
            ``NotExact`` where torch.func cannot run the model), ``"loop"``
            (one forward + backward per example: exact for any model, slow) or
            ``"auto"`` (the first of fast, vmap, loop that is exact; reaching
            the loop warns with :class:`~persample.SlowPathWarning`).
        var: compute the per-element variance (``m2``); ``False`` gives mean
            and norms only.
        inner_products: also compute p_i = ⟨g_i, ḡ⟩ (needed by the
            inner-product and orthogonality tests). Costs a second streamed
            pass when the batch spans several chunks.
        reference: a fixed direction r, ``{name: tensor}`` over every
            trainable parameter (the keys of ``named_parameters()`` with
            ``requires_grad``, each of its parameter's shape): the inner
            products are then p_i = ⟨g_i, r⟩ (implies ``inner_products``; one
            pass), and ``stats.reference`` is r. Records computed against equal
            references merge with their inner products (:meth:`GradStats.merge`),
            so micro-batches or ranks give the whole batch's p_i; see
            :func:`persample.noise.inner_product_test` for tests against such r.
        clip_norm: also compute ``clipped_mean`` = (1/B) Σ_i min(1, C/‖g_i‖) g_i
            for C = ``clip_norm`` (per-example clipping, as in DP-SGD).
        progress: show a tqdm progress bar over examples (if tqdm is installed).
        batch_loss_check: check that ``loss_fn`` on the whole batch is Σ_i w_i L_i
            of the per-example losses, at the model's output (a loss-only
            backward; the fast engine's own forward gives the output, the other
            engines one more forward without gradients). Losses that couple the
            examples raise :class:`~persample.BatchLossMismatch`; ``False`` skips
            the check, for batch-of-one gradients on purpose (see
            :func:`per_sample_grads`).

    On an FSDP2 model (``fully_shard``) this is a collective: one FSDP2 forward and backward,
    observed by the fast engine, gives this rank's statistics (full-size ``mean`` and ``m2`` of its
    own examples), with ``p.grad`` put back; :func:`persample.distributed.all_reduce_stats` then
    gives the global batch's.
    """
    _engine_chain(engine, _CHAINS, ENGINES)
    sharding = planned_sharding(model)
    if sharding == "FSDP2":  # FSDP2's own forward and backward, observed (a collective)
        from ._data_parallel import fsdp2_grad_stats

        return fsdp2_grad_stats(  # validates the batch itself: every rank raises alike (a collective)
            model,
            loss_fn,
            inputs,
            targets,
            var=var,
            inner_products=inner_products,
            reference=prepare_reference(model, reference) if reference is not None else None,
            engine=engine,
            clip_norm=clip_norm,
        )
    return compute_stats(
        model,
        loss_fn,
        as_batch(inputs, targets),
        sharding=lambda _: sharding,  # (found just now)
        chunk_size=chunk_size,
        randomness=randomness,
        engine=engine,
        var=var,
        inner_products=inner_products,
        clip_norm=clip_norm,
        progress=progress,
        reference=reference,
        batch_loss_check=batch_loss_check,
    )


def compute_stats(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    *,
    chunk_size: int | None = None,
    randomness: str = "error",
    engine: str = "auto",
    var: bool = True,
    inner_products: bool = False,
    clip_norm: float | None = None,
    progress: bool = False,
    fork_rng: bool = True,
    reference: Mapping[str, Tensor] | None = None,
    batch_loss_check: bool = False,
    sharding: Callable[[nn.Module], str | None] = planned_sharding,
    engine_output: list | None = None,
    engine_output_form: bool = False,
    engine_used: list | None = None,
) -> GradStats:
    """:func:`grad_stats` on a validated :class:`Batch`.

    ``fork_rng=False`` lets random ops advance the global RNG as a training
    step would (what :class:`persample.Tracker` wants). ``batch_loss_check``:
    see :func:`grad_stats` (off here: the Tracker derives and checks its weights itself). ``sharding``:
    how :func:`check_supported` finds how the model is sharded (the per-model plan's, where it holds).
    ``engine_output``: without ``batch_loss_check``, a list that gets what the fast engine keeps of its
    forward (``keep_output`` of :func:`~persample.engines.fast.engine.fast_grad_stats`), for the
    caller's own check at the output; ``engine_output_form``: that check's batch loss is ``loss_fn`` itself,
    so a standard loss's weights by its form suffice (the backward is not asked for its gradient at the
    output). ``engine_used``: a list that gets ``(name, code)`` for each engine
    that refused, then the name of the engine whose statistics are returned.
    """
    _check_chunk_size(chunk_size)
    chain = _engine_chain(engine, _CHAINS)
    check_clip_norm(clip_norm)
    check_supported(model, randomness, sharding)
    options: dict[str, Any] = dict(
        randomness=randomness,
        var=var,
        inner_products=inner_products,
        clip_norm=clip_norm,
        reference=prepare_reference(model, reference),
    )

    first_forward: list = []  # the fast engine's forward of the batch: its output, for batch_loss_check
    kept = first_forward if batch_loss_check else engine_output

    def run(name: str) -> GradStats:
        try:
            if name == "fast":
                if kept is not None:  # what a refused attempt kept (it runs again after a widening: _widening)
                    del kept[:]
                # (the Tracker's check at the output reads a standard loss's L_i off the backward too)
                at_output = kept is not None and kept is engine_output
                stats = fast_grad_stats(
                    model,
                    loss_fn,
                    batch,
                    keep_output=kept,
                    closed_form_at_output=at_output,
                    form_suffices=at_output and engine_output_form,
                    **options,
                )
            else:
                streamed = vmap_grad_stats if name == "vmap" else loop_grad_stats
                with progress_bar(batch.size, f"per-example grads ({name})", progress) as update:
                    stats = streamed(model, loss_fn, batch, chunk_size=chunk_size, progress=update, **options)
        except NotExact as err:
            if engine_used is not None:
                engine_used.append((name, err.code))
            raise
        if engine_used is not None:
            engine_used.append(name)
        return stats

    # Without the fast engine's forward, one of the check's own: before the work where no random draw
    # is allowed, else after the engines (it must not move their draws).
    check_first = batch_loss_check and chain[0] != "fast" and randomness == "error"
    # The generators are rewound only where the model may draw: other threads share them.
    with preserved_state(model, fork_rng=fork_rng, rewind_rng=fork_rng and randomness != "error") as found:
        opaque = False
        if check_first:
            opaque = _check_loss_on_batch(model, loss_fn, batch, None, found, stop_random=True)

        def statistics() -> GradStats:
            stats = _first_exact(chain, run, reset=lambda: restore_as_found(found))
            if batch_loss_check and not check_first:
                opaque_loss = _check_loss_at_kept_output(model, loss_fn, batch, first_forward, found)
            else:
                opaque_loss = opaque
            if opaque_loss and randomness == "error":
                _check_loss_in_the_model(model, loss_fn, batch, stats.mean, found)
            return stats

        # (inside a step that gathers its host reads, the step reads the check and runs again: statistics_step)
        if "fast" not in chain or open_checks() is not None or not has_recurrent_layers(model):
            return statistics()
        # A recurrent layer's check of its output is read with the call's other host reads (one read in all);
        # where it fails, the call runs again from the model and random generators as found
        generators, used_before = random_state(), None if engine_used is None else len(engine_used)

        def read_once() -> GradStats:
            with one_host_read():
                return statistics()

        def reset() -> None:
            restore_as_found(found)
            set_random_state(generators)
            del first_forward[:]
            if engine_used is not None:
                del engine_used[used_before:]

        return output_checks_read_with_the_step(read_once, reset)


def _check_loss_at_kept_output(model: nn.Module, loss_fn: LossFn, batch: Batch, kept: list, found) -> bool:
    """:func:`_check_loss_on_batch` after the engines, on what the fast engine kept of its forward (``kept``:
    ``[output, standard_loss, at_output]``, as many as it kept; nothing where another engine ran)."""
    output, standard, at_output = kept + [None, False, None][len(kept) :]
    return _check_loss_on_batch(model, loss_fn, batch, output, found, standard_loss=standard, at_output=at_output)


def _check_loss_on_batch(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    output: Any,
    found,
    stop_random: bool = False,
    standard_loss: bool = False,
    at_output: Any = None,
) -> bool:
    """``batch_loss_check``: raise :class:`BatchLossMismatch` where ``loss_fn`` couples the examples
    (:func:`persample.batch_loss.check_batch_loss`), at ``output`` or, without one, at the output of
    one more forward of the batch without gradients (buffers then put back as ``found``). A model
    that cannot run the whole batch at once leaves nothing to check. ``standard_loss``: the fast engine
    found ``loss_fn`` to be one standard loss on this ``output`` (a weighted sum by its form), so the
    check, which would trace it again to find the same, has nothing to do. ``at_output``: what the fast
    engine's backward left at ``output`` (:class:`persample.engines.fast.engine.AtOutput`), which the check
    then need not compute again.

    Returns True where the loss is computed inside the model (its weights cannot be read at the output):
    the caller then checks it on the gradients (:func:`_check_loss_in_the_model`)."""
    batch_fn, per_example_fn = loss_parts(loss_fn)
    if standard_loss and output is not None and batch_fn is per_example_fn:
        return False
    if output is None:
        try:  # under randomness="error", stopped before a random draw (the engines refuse such a model)
            with torch.no_grad(), RandomCalls(stop=True) if stop_random else contextlib.nullcontext():
                output = batch.forward(model)
        except Exception:  # a forward stopped midway may have changed some of the model's state, not all
            restore_module_attributes(getattr(found, "attributes", []))
            return False
        finally:
            restore_buffer_state(found)
    try:
        return check_batch_loss(loss_fn, output, batch.targets, batch.size, at_output=at_output)
    except BatchLossMismatch as err:
        raise refusal(
            "BATCH_LOSS_COUPLED",
            f"loss_fn couples the examples of the batch: {err}. Per-example gradients are those of loss_fn "
            "on each example alone, which is not the loss your batch computes (contrastive losses such as "
            "NT-Xent / SimCLR or CLIP, batch-hard triplets, batch-centred errors, a load-balancing term over "
            "the batch). Pass batch_loss_check=False if you want those batch-of-one gradients on purpose",
        ) from None


def _check_loss_in_the_model(
    model: nn.Module, loss_fn: LossFn, batch: Batch, mean: Mapping[str, Tensor], found
) -> None:
    """``batch_loss_check`` for a loss computed inside the model (``lambda out: out.loss``), whose weights
    cannot be read at the output: one more forward and backward of the batch (no ``.grad`` written,
    buffers put back as ``found``), and ∇_θ ℓ must be c·ḡ, a multiple of the mean per-example gradient
    ḡ = ``mean`` (:func:`persample.batch_loss.gradient_multiple`), as for ℓ = w·Σ_i L_i. An in-model loss
    that couples the examples (NT-Xent over the batch) or weighs them unequally (a token mean over padded
    examples) raises :class:`BatchLossMismatch` (``BATCH_LOSS_COUPLED``). Only under
    ``randomness="error"``: a forward that draws would differ from the engines'. A model that cannot run
    the whole batch at once leaves nothing to check."""
    batch_fn, _ = loss_parts(loss_fn)
    params = trainable_parameters(model)
    try:
        with torch.enable_grad(), RandomCalls(stop=True):
            output = batch.forward(model)
            ell = batch_fn(output) if batch.targets is None else batch_fn(output, batch.targets)
            used = [(n, p) for n, p in params.items() if n in mean]
            grads = torch.autograd.grad(ell, [p for _, p in used], allow_unused=True)
    except Exception:
        return
    finally:
        restore_buffer_state(found)
    grad = {n: g for (n, _), g in zip(used, grads) if g is not None}
    _, difference = gradient_multiple(grad, {n: mean[n] for n, _ in used})
    # Equal weights give rounding-level differences (models that compute parts in float32 inside: ~1e-7)
    rtol = 1e-5 if all(mean[n].dtype == torch.float64 for n, _ in used) else 1e-3
    if difference > rtol:
        raise refusal(
            "BATCH_LOSS_COUPLED",
            "loss_fn returns a loss computed inside the model, whose weights cannot be read at the model's "
            "output, and its gradient on the whole batch is not a multiple of the mean per-example gradient "
            f"(relative difference {difference:.2e}): the loss couples the examples of the batch (NT-Xent / "
            "SimCLR, CLIP, batch-hard triplets, a term over the batch) or weighs them unequally (a token "
            "mean over padded examples). Per-example gradients are those of the loss on each example alone. "
            "Compute the loss from the model's output in loss_fn (persample.causal_lm_loss() for token "
            "losses), or pass batch_loss_check=False if you want those batch-of-one gradients on purpose",
        )


def prepare_reference(model: nn.Module, reference: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
    """``reference`` checked against the trainable parameters (same names, same shapes, finite) and
    detached, on each parameter's device in its dtype (at least float32). Tensors already so are
    kept as they are, so that records computed against one prepared reference share it."""
    if reference is None:
        return None
    if not isinstance(reference, Mapping):
        raise TypeError(f"reference must be a dict {{parameter name: tensor}}, got {type(reference).__name__}")
    params = trainable_parameters(model)
    missing, extra = sorted(set(params) - set(reference)), sorted(set(reference) - set(params))
    if missing or extra:
        problems = [f"missing {missing}"] if missing else []
        problems += [f"not trainable parameters {extra}"] if extra else []
        raise ValueError(
            "reference must have one tensor per trainable parameter (the names "
            f"model.named_parameters() yields with requires_grad): {'; '.join(problems)}"
        )
    prepared = {}
    for name, p in params.items():
        r = reference[name]
        if not isinstance(r, Tensor) or tuple(r.shape) != tuple(p.shape):
            what = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise ValueError(
                f"reference[{name!r}] must be a tensor of the parameter's shape {tuple(p.shape)}, got {what}"
            )
        r = r.detach() if r.requires_grad else r
        r = r.to(device=p.device, dtype=torch.promote_types(p.dtype, torch.float32))
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"reference[{name!r}] has non-finite values (inf/NaN)")
        prepared[name] = r
    return prepared


def _engine_chain(engine: str, chains: dict, public: tuple | None = None) -> tuple:
    public = tuple(chains) if public is None else public
    if engine not in public:
        raise ValueError(f"engine must be one of {public}, got {engine!r}")
    return chains[engine]


def _first_exact(chain: tuple, run: Callable[[str], Any], reset: Callable[[], None] = lambda: None) -> Any:
    """``run(name)`` for the engines of ``chain`` in order, until one does not raise ``NotExact``.

    ``reset()`` runs before each engine after the first, so that every engine starts from the
    model as found (the buffers), not as a refused engine's forward left it. The last engine's
    ``NotExact`` reaches the caller; reaching the loop after others warns.
    """
    reasons: list[str] = []
    mixed = ""  # why an engine refused with BATCH_MIXED: the later ones run the model on a batch of one
    for position, name in enumerate(chain):
        if position:
            reset()
        if name == "loop" and reasons:
            warning = SlowPathWarning(
                "persample: using the exact per-example loop (B forward + backward passes, slower) because "
                + "; ".join(short_reason(r) for r in reasons)
                + ". The engines' full reasons: this warning's .reasons"
            )
            warning.reasons = list(reasons)
            warnings.warn(warning, stacklevel=user_stacklevel())
        try:
            return _widening(run, reset) if name == "fast" else run(name)
        except NotExact as err:
            if position == len(chain) - 1:
                raise
            reasons.append(f"{name}: {err}")
            # an example that differs alone (not one that fails alone: that error is the model's, raised as it is
            # by the engines that run each example alone)
            code = getattr(err, "code", None)
            if code == "BATCH_MIXED" or (code == "EXAMPLE_DIFFERS_ALONE" and err.__cause__ is None):
                mixed = short_reason(reasons[-1])
        except Exception as err:
            if not mixed or isinstance(err, PersampleError):
                raise
            # The fast engine saw the forward combine the examples; on a batch of one the model itself fails
            # (an index of the batch's rows, a train-mode batch norm): no per-example reading exists.
            raise refusal(
                "BATCH_OF_ONE_FAILS",
                f"engine='auto' computes each example alone because {mixed}, but the model (or loss_fn) fails "
                f"on a batch of one ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Fix: {PRECONDITIONS['BATCH_OF_ONE_FAILS'].fix}",
            ) from err
    raise AssertionError("unreachable: an engine chain is never empty")


#: Runs of the fast engine in one call at most, each after it widened a fallback unit to the parent of a module
#: whose parameter is used outside it (:func:`persample.engines.fast.plan.widen`): a module tree this deep.
MAX_WIDENINGS = 8


def _widening(run: Callable[[str], Any], reset: Callable[[], None]) -> Any:
    """``run("fast")``, run again (from the model as found) while its refusal widened a unit
    (``PARAMETER_USED_OUTSIDE``: the parent of the module whose parameter another module uses becomes
    one fallback unit). The widening is kept in the model's plan, so later calls take it at once."""
    for _ in range(MAX_WIDENINGS):
        try:
            return run("fast")
        except NotExact as err:
            if not getattr(err, "widened", False):
                raise
            reset()
    return run("fast")


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
