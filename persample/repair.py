"""``fix(model)``: replace the modules whose per-example gradients are undefined by ones whose are.

A train-mode BatchNorm normalises each channel with the mean and variance of the
whole batch, so example i's output (and loss) depends on every other example and
its "own" gradient is undefined. GroupNorm (Wu & He, 2018) normalises each
example over groups of its own channels, so it is per-example by construction,
and it trains about as well as BatchNorm at the batch sizes where BatchNorm is
at its best (and better at small ones). This is what Opacus's
``ModuleValidator.fix`` does; after ``fix`` every persample entry point works
on the model in training mode.

The replacement changes the architecture: a network trained with BatchNorm and
then fixed computes a different function (there are no running statistics to
carry over). Fix the model before training it. To keep BatchNorm and still
measure the gradient noise, see :meth:`persample.Tracker.accumulate`'s
micro-batch estimator instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Replacement", "fix", "group_count"]


@dataclass(frozen=True)
class Replacement:
    """One module ``fix`` replaced (or would replace, with ``dry_run=True``): its qualified
    name in the model, and the old and new modules in short (``BatchNorm2d(64)``, ``GroupNorm(32, 64)``:
    groups, channels)."""

    name: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.name}: {self.old} -> {self.new}"


def group_count(channels: int, max_groups: int = 32) -> int:
    """The number of GroupNorm groups ``fix`` uses for ``channels`` channels: the largest divisor
    of ``channels`` that is at most ``max_groups`` (32 is Wu & He's default; GroupNorm needs a
    divisor).

    >>> group_count(64), group_count(48), group_count(24), group_count(37)
    (32, 24, 24, 1)
    """
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels!r}")
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def _group_norm_for(bn: _BatchNorm, max_groups: int) -> nn.GroupNorm:
    """The GroupNorm that replaces ``bn``: same channels, eps, affine parameters (copied), device
    and dtype. BatchNorm1d gets one group: its input is often ``(N, C)``, where groups of a few
    channels would normalise a handful of numbers each (one channel per group: to exactly 0)."""
    channels = bn.num_features
    groups = 1 if isinstance(bn, nn.BatchNorm1d) else group_count(channels, max_groups)
    weight = bn.weight if bn.affine else None
    gn = nn.GroupNorm(
        groups,
        channels,
        eps=bn.eps,
        affine=bn.affine,
        device=None if weight is None else weight.device,
        dtype=None if weight is None else weight.dtype,
    )
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    gn.train(bn.training)
    return gn


def fix(model: nn.Module, *, dry_run: bool = False, max_groups: int = 32) -> list[Replacement]:
    """Replace, in place, every BatchNorm of ``model`` by a GroupNorm; returns what it replaced.

    Covers ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and their subclasses (any
    ``torch.nn.modules.batchnorm._BatchNorm``, lazy ones once initialised). The
    GroupNorm has the BatchNorm's channels C, ``eps``, ``affine`` and its γ, β
    (copied, so a freshly initialised model starts identical up to the
    normalisation), on the same device and dtype, in the same training mode:

    - ``BatchNorm2d``/``3d``/``SyncBatchNorm``: G = the largest divisor of C that
      is at most ``max_groups`` (:func:`group_count`; 32 by default, Wu & He's
      choice), so each example is normalised over groups of C/G channels and
      all positions;
    - ``BatchNorm1d``: G = 1 (each example over all its features, like a
      LayerNorm), since its input is often ``(N, C)``.

    Running statistics are dropped (GroupNorm has none). A module used at
    several places is replaced by one GroupNorm at all of them. Build the
    optimizer after ``fix``: the replaced parameters are new tensors.

    Args:
        model: the model to change in place.
        dry_run: only list what would be replaced.
        max_groups: the most groups a GroupNorm gets.

    Returns:
        one :class:`Replacement` per replaced module (each reused one once, under its
        first name); ``print(*fix(model), sep="\\n")`` shows them. Empty when
        there is nothing to replace.

    Raises:
        TypeError: ``model`` itself is a BatchNorm (there is no parent to put the
            GroupNorm in: build ``nn.GroupNorm`` yourself).
        ValueError: a lazy BatchNorm is not initialised yet (run one forward first).

    >>> import torch, persample
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> print(*persample.fix(net), sep="\\n")
    1: BatchNorm2d(8) -> GroupNorm(8, 8)
    >>> stats = persample.grad_stats(net.train(), lambda out: out.sum(), torch.randn(4, 3, 6, 6))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(max_groups, int) or isinstance(max_groups, bool) or max_groups < 1:
        raise ValueError(f"max_groups must be a positive integer, got {max_groups!r}")
    if isinstance(model, _BatchNorm):
        raise TypeError(
            "fix(model) replaces the BatchNorms inside a model, and this model is itself a "
            f"{type(model).__name__}: use nn.GroupNorm({group_count(model.num_features, max_groups)}, "
            f"{model.num_features}) in its place"
        )
    replaced: dict[int, tuple[nn.Module, Replacement]] = {}
    slots = []  # (parent, attribute name, the BatchNorm)
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in list(parent._modules.items()):  # (named_children drops repeats)
            if not isinstance(child, _BatchNorm):
                continue
            if isinstance(child, nn.modules.lazy.LazyModuleMixin) and child.has_uninitialized_params():
                raise ValueError(
                    f"{parent_name + '.' if parent_name else ''}{child_name} "
                    f"({type(child).__name__}) is not initialised yet: run one forward of the model "
                    "before fix(model)"
                )
            slots.append((parent, child_name, child))
            if id(child) not in replaced:
                new = _group_norm_for(child, max_groups)
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                replaced[id(child)] = (
                    new,
                    Replacement(
                        name,
                        f"{type(child).__name__}({child.num_features})",
                        f"GroupNorm({new.num_groups}, {new.num_channels})",
                    ),
                )
    if not dry_run:
        for parent, child_name, child in slots:
            setattr(parent, child_name, replaced[id(child)][0])
    return [r for _, r in replaced.values()]
