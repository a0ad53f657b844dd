"""Detect sharded (FSDP) models and DTensors, cheaply, at persample's entry points.

Under FSDP each rank holds a shard, the forward all-gathers the parameters and
the backward reduce-scatters gradients in hooks that ``torch.autograd.grad``
never triggers. Computing statistics there with persample's own engines gave
all-zero results, and printing them ran DTensor collectives on one rank (a
hang). So the functional entry points (``grad_stats``, ``per_sample_grads``,
``check_mean``) refuse such a model with
:class:`~persample.errors.UnsupportedModelError`, before any work, and so does
everything for FSDP1. ``persample.Tracker`` supports FSDP2 (``fully_shard``) by
observing FSDP2's own forward and backward (:func:`unsharded`,
:func:`check_fsdp2`, and ``_data_parallel.fsdp2_step``).

Detection looks only at modules that are already imported (``sys.modules``):
a process that never imported FSDP or DTensor cannot hold one, and the check
costs nothing there.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, cast

from torch import Tensor, nn

from .errors import UnsupportedModelError

__all__ = [
    "dtensor_class",
    "is_dtensor",
    "sharding_of",
    "refuse_sharded",
    "refuse_wrapped",
    "local_tensor",
    "fsdp2_modules",
    "check_fsdp2",
    "unsharded",
    "unshard_all",
    "restore_sharding",
    "is_fsdp2_hook",
]

_FSDP2_FIX = (
    "For an FSDP2 model, persample.Tracker(fsdp_model, loss_fn).step(x, y) gives exact statistics of "
    "the global batch from FSDP2's own backward, and persample.grad_stats(fsdp_model, loss_fn, x, y) "
    "this rank's (then persample.distributed.all_reduce_stats); see docs/fsdp.md. Otherwise "
    "train with DistributedDataParallel."
)


def dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor`` if that module is imported (else no tensor can be one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a shard of an FSDP2 parameter)."""
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def sharding_of(model: nn.Module) -> str | None:
    """``"FSDP2"``, ``"FSDP1"`` or None: how ``model`` (or a module inside it) is sharded."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    dtensor = dtensor_class()
    if fsdp is None and dtensor is None:
        return None  # neither is imported: no module or parameter can be sharded (see the module docstring)
    if fsdp is not None:
        fsdp2_class = getattr(fsdp, "FSDPModule", None)
        fsdp1_class = getattr(fsdp, "FullyShardedDataParallel", None)
        for module in model.modules():
            if fsdp2_class is not None and isinstance(module, fsdp2_class):
                return "FSDP2"
            if fsdp1_class is not None and isinstance(module, fsdp1_class):
                return "FSDP1"
    for p in model.parameters():
        if dtensor is not None and isinstance(p, dtensor):
            return "FSDP2"
        if getattr(p, "_fsdp_flattened", False):
            return "FSDP1"
    return None


def is_fsdp2_hook(hook) -> bool:
    """Whether a module hook is FSDP2's own pre- or post-forward hook (``FSDPState._pre_forward`` /
    ``_post_forward``), which all-gathers, frees and casts (under a ``MixedPrecisionPolicy``)
    parameters and inputs but leaves every value of the forward as the module computes it. Fails
    closed: anything it cannot identify is not FSDP2's."""
    owner = getattr(hook, "__self__", None)
    module = sys.modules.get("torch.distributed.fsdp._fully_shard._fsdp_state")
    state = getattr(module, "FSDPState", None) if module is not None else None
    return (
        state is not None
        and isinstance(owner, state)
        and getattr(hook, "__name__", None) in ("_pre_forward", "_post_forward")
    )


def refuse_sharded(model: nn.Module, where: str, sharding: Callable[[nn.Module], str | None] | None = None) -> None:
    """Raise :class:`UnsupportedModelError` when ``model`` holds FSDP-sharded parameters (``sharding``:
    how to find out, :func:`sharding_of` by default; the fast engine's per-model plan knows it)."""
    kind = (sharding or sharding_of)(model)
    if kind is None:
        return
    if kind == "FSDP1":
        raise UnsupportedModelError(
            f"{where}: the model is sharded with FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel), "
            "which persample does not support: FSDP1 flattens each wrapped module's parameters into one "
            "sharded FlatParameter per rank, and its all-gather and reduce-scatter run in hooks that "
            "persample's engines never trigger, so statistics and gradients would be wrong. Shard with "
            "FSDP2 instead (torch.distributed.fsdp.fully_shard on the blocks and the root; "
            "persample.Tracker(fsdp_model, loss_fn).step(x, y) then runs FSDP2's own backward and hands "
            "every rank the statistics of the global batch), or train with DistributedDataParallel "
            "(persample.Tracker(ddp_model, loss_fn)). This refusal is raised on every rank, before any "
            "collective, and leaves the model as it was.",
            code="SHARDED_MODEL",
        )
    api = "torch.distributed.fsdp.fully_shard" if kind == "FSDP2" else "torch.distributed.fsdp.FullyShardedDataParallel"
    raise UnsupportedModelError(
        f"{where}: the model is sharded with {kind} ({api}), which this entry point does not support: "
        "each rank holds only a shard of every parameter, and FSDP's backward hooks (all-gather, "
        "reduce-scatter) would not run, so statistics and gradients would be wrong (all zeros). " + _FSDP2_FIX,
        code="SHARDED_MODEL",
    )


def refuse_wrapped(model: nn.Module, where: str, sharding: Callable[[nn.Module], str | None] | None = None) -> None:
    """Refuse FSDP-sharded models and DDP wrappers at the functional entry points (grad_stats & co.).

    A ``DistributedDataParallel`` forward prepares DDP's reducer for a backward
    that these functions never run; this rank's statistics come from
    ``ddp.module`` (then :func:`persample.distributed.all_reduce_stats`).
    """
    refuse_sharded(model, where, sharding)
    ddp_module = sys.modules.get("torch.nn.parallel.distributed")
    ddp = getattr(ddp_module, "DistributedDataParallel", None) if ddp_module is not None else None
    if ddp is not None and isinstance(model, ddp):
        raise UnsupportedModelError(
            f"{where}: got a DistributedDataParallel wrapper. Pass ddp_model.module for this rank's "
            "statistics and combine the ranks' with persample.distributed.all_reduce_stats(stats), or use "
            "persample.Tracker(ddp_model, loss_fn), which does both and averages p.grad as DDP does",
            code="DDP_WRAPPER",
        )


def local_tensor(t: Tensor) -> Tensor:
    """The rank-local tensor of a DTensor (no communication); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]  # a DTensor here (is_dtensor)


# ------------------------------------------------------------------------------------ FSDP2


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to (``FSDPModule`` instances)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def fsdp2_sharded_slots(model: nn.Module) -> dict[tuple[int, str], Tensor]:
    """``{(id(owner module), parameter name): sharded parameter}`` for every parameter FSDP2 manages in
    ``model`` (empty without FSDP2): the DTensor FSDP2 puts back in that slot when it reshards, which is
    the slot's own parameter, not a substitute. Reads FSDP2's parameter groups (fail closed: an
    unfamiliar layout raises ``NotExact``, code ``TORCH_INTERNALS_UNKNOWN``)."""
    slots: dict[tuple[int, str], Tensor] = {}
    for m in fsdp2_modules(model):
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None  # type: ignore[operator]  # FSDPModule method
        groups = getattr(state, "_fsdp_param_groups", None)
        try:
            for group in groups:  # type: ignore[union-attr]  # None raises TypeError: caught below (fail closed)
                for fsdp_param in group.fsdp_params:
                    info = fsdp_param._module_info
                    slots[(id(info.module), info.param_name)] = fsdp_param.sharded_param
        except (AttributeError, TypeError):
            from .contract import refusal

            raise refusal(
                "TORCH_INTERNALS_UNKNOWN",
                "persample: this torch version's FSDP2 parameter groups are "
                "unfamiliar (no fsdp_params with _module_info and sharded_param), so persample cannot "
                "tell FSDP2's resharding from a substituted parameter. Use DDP",
            ) from None
    return slots


def check_fsdp2(model: nn.Module, where: str) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is sharded in the one FSDP2 layout persample
    handles: ``fully_shard`` applied to the root module (and to any submodules), every sharded
    parameter a DTensor ``Shard(0)`` over a 1-D device mesh (no HSDP, no tensor parallelism)."""
    mods = fsdp2_modules(model)
    if not mods or mods[0] is not model:
        raise UnsupportedModelError(
            f"{where}: fully_shard was applied to submodules of this model but not to the model itself; "
            "apply it to the root module too (fully_shard(model) after the blocks, as torchtitan does), so "
            "that one FSDP2 root drives the forward and the backward",
            code="SHARDED_MODEL",
        )
    dtensor = dtensor_class()
    for name, param in model.named_parameters():
        if dtensor is None or not isinstance(param, dtensor):
            continue
        p: Any = param  # a DTensor
        placements = tuple(type(pl).__name__ + str(getattr(pl, "dim", "")) for pl in p.placements)
        if p.device_mesh.ndim != 1 or placements != ("Shard0",):
            raise UnsupportedModelError(
                f"{where}: parameter {name!r} is a DTensor with placements {p.placements} on a "
                f"{p.device_mesh.ndim}-D mesh; persample supports FSDP2's Shard(0) over a 1-D mesh only "
                "(no HSDP, no tensor parallelism). Use fully_shard over a 1-D mesh, or DDP",
                code="SHARDED_MODEL",
            )


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 module of ``model`` unsharded for the block (:func:`unshard_all`), and resharded as
    FSDP2's backward would have left it when the block ends (:func:`restore_sharding`), also on error.

    Inside, ``named_parameters()`` yields the full parameters under their usual names, and they stay
    allocated until the block ends, also after a backward (whose reshard is deferred to the end of
    the block), so that what reads them after the backward (the fast engine's fallbacks) reads them.
    """
    saved = unshard_all(model)
    try:
        yield
    finally:
        restore_sharding(model, saved)


def unshard_all(model: nn.Module) -> list:
    """``unshard()`` every FSDP2 module of ``model`` (all-gathers: a collective on every rank), and keep
    them unsharded until :func:`restore_sharding`: no reshard after forward (so nothing the capture
    recorded in the forward is freed before the backward reads it, and the backward all-gathers
    nothing again) and none after backward. Returns what :func:`restore_sharding` needs to undo it.

    Reads and restores each module's parameter groups' ``reshard_after_backward`` and
    ``post_forward_mesh_info`` and its state's ``_auto_reshard_after_forward`` (FSDP2 internals, fail
    closed: an unfamiliar layout raises ``NotExact``, code ``TORCH_INTERNALS_UNKNOWN``), and sets them
    with FSDP2's public ``set_reshard_after_backward`` / ``set_reshard_after_forward``."""
    saved = []
    for m in fsdp2_modules(model):
        m = cast(Any, m)  # an FSDPModule
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        groups = getattr(state, "_fsdp_param_groups", None)
        if (
            groups is None
            or not hasattr(state, "_auto_reshard_after_forward")
            or any(not isinstance(getattr(g, "reshard_after_backward", None), bool) for g in groups)
            or any(not hasattr(g, "post_forward_mesh_info") for g in groups)
        ):
            from .contract import refusal

            raise refusal(
                "TORCH_INTERNALS_UNKNOWN",
                f"persample: this torch version's FSDP2 internals are unfamiliar ({type(m).__name__} has "
                "no parameter groups with reshard_after_backward and post_forward_mesh_info), so "
                "persample cannot show that its statistics are exact. Use the torch versions persample "
                "is tested with, or DDP",
            )
        saved.append(
            (
                m,
                [g.reshard_after_backward for g in groups],
                [g.post_forward_mesh_info for g in groups],
                state._auto_reshard_after_forward,  # type: ignore[union-attr]  # checked above
            )
        )
    for m, *_ in saved:
        m.set_reshard_after_backward(False, recurse=False)
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    return saved


def restore_sharding(model: nn.Module, saved: list) -> None:
    """Undo :func:`unshard_all`: each module's resharding settings as they were, and the modules that
    reshard after backward resharded (what FSDP2's backward would have done)."""
    for m, flags, post_forward, auto in saved:
        m = cast(Any, m)
        state = m._get_fsdp_state()
        for group, flag, info in zip(state._fsdp_param_groups, flags, post_forward):
            group.reshard_after_backward = flag
            group.post_forward_mesh_info = info
        state._auto_reshard_after_forward = auto
        if any(flags):
            with contextlib.suppress(Exception):
                m.reshard()
