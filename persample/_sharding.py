"""Detect sharded (FSDP) models and DTensors, cheaply, at persample's entry points.

persample does not support sharded parameters yet (see README, "Distributed
training"): under FSDP each rank holds a shard, the forward all-gathers the
parameters and the backward reduce-scatters gradients in hooks that
``torch.autograd.grad`` never triggers. Computing statistics there gave
all-zero results, and printing them ran DTensor collectives on one rank (a
hang). So every entry point refuses such a model with
:class:`~persample.errors.UnsupportedModelError`, before any work.

Detection looks only at modules that are already imported (``sys.modules``):
a process that never imported FSDP or DTensor cannot hold one, and the check
costs nothing there.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from .errors import UnsupportedModelError

__all__ = ["dtensor_class", "is_dtensor", "sharding_of", "refuse_sharded", "refuse_wrapped", "local_tensor"]

_FSDP2_FIX = ("persample computes per-example statistics of replicated parameters only. Train with "
              "DistributedDataParallel (which persample.Tracker supports), or compute statistics on an "
              "unsharded copy of the model (for example one rank's model built without fully_shard and "
              "loaded with the full state dict).")


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


def refuse_sharded(model: nn.Module, where: str) -> None:
    """Raise :class:`UnsupportedModelError` when ``model`` holds FSDP-sharded parameters."""
    kind = sharding_of(model)
    if kind is None:
        return
    api = ("torch.distributed.fsdp.fully_shard" if kind == "FSDP2"
           else "torch.distributed.fsdp.FullyShardedDataParallel")
    raise UnsupportedModelError(
        f"{where}: the model is sharded with {kind} ({api}), which persample does not support: "
        "each rank holds only a shard of every parameter, and FSDP's backward hooks (all-gather, "
        "reduce-scatter) would not run, so statistics and gradients would be wrong (all zeros). "
        + _FSDP2_FIX, code="SHARDED_MODEL")


def refuse_wrapped(model: nn.Module, where: str) -> None:
    """Refuse FSDP-sharded models and DDP wrappers at the functional entry points (grad_stats & co.).

    A ``DistributedDataParallel`` forward prepares DDP's reducer for a backward
    that these functions never run; this rank's statistics come from
    ``ddp.module`` (then :func:`persample.distributed.all_reduce_stats`).
    """
    refuse_sharded(model, where)
    ddp_module = sys.modules.get("torch.nn.parallel.distributed")
    ddp = getattr(ddp_module, "DistributedDataParallel", None) if ddp_module is not None else None
    if ddp is not None and isinstance(model, ddp):
        raise UnsupportedModelError(
            f"{where}: got a DistributedDataParallel wrapper. Pass ddp_model.module for this rank's "
            "statistics and combine the ranks' with persample.distributed.all_reduce_stats(stats), or use "
            "persample.Tracker(ddp_model, loss_fn), which does both and averages p.grad as DDP does",
            code="DDP_WRAPPER")


def local_tensor(t: Tensor) -> Tensor:
    """The rank-local tensor of a DTensor (no communication); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t
