"""Gradient accumulation for :class:`persample.Tracker`: the state of one ``accumulate`` block, and the
micro-batch noise estimator for models whose per-example gradients are undefined.

:class:`Accumulation` is what ``Tracker.accumulate`` yields. Its micro-batches' statistics are merged
exactly on exit (:meth:`persample.GradStats.merge_all`); with ``estimator="micro-batch"``, each
micro-batch's gradient per unit weight G_m feeds McCandlish et al.'s two-batch estimator
(:func:`micro_batch_noise`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .stats import GradStats


@dataclass
class Accumulation:
    """What :meth:`Tracker.accumulate` yields: ``stats``, the merged statistics (set on exit;
    None on steps without statistics), the micro-batches' own statistics in ``parts``, and
    ``reference``, the shared direction r of their inner products (None until known, or without)."""

    with_stats: bool
    parts: list = field(default_factory=list)
    stats: GradStats | None = None
    reference: dict | None = None
    shared: bool = False  # accumulate(reference=...) was given
    first: bool = False  # reference="first": r is the first micro-batch's mean
    refused: bool = False  # a micro-batch had no statistics (refused, or not finite): none for the block
    estimator: str = "per-example"
    micro: list = field(default_factory=list)  # estimator="micro-batch": (b_m, ‖G_m‖²), or None if not finite
    micro_sum: dict = field(default_factory=dict)  # Σ_m b_m G_m (float64)
    noise: Any = None  # estimator="micro-batch": the block's NoiseScale (set on exit)

    def add_micro_batch(self, part) -> None:
        """One micro-batch's (b_m, G_m, ‖G_m‖²) (None: not finite) into the running sums."""
        if part is None:
            self.micro.append(None)
            return
        size, grad, sq = part
        for name, g in grad.items():
            self.micro_sum[name] = self.micro_sum[name] + g * size if name in self.micro_sum else g * size
        self.micro.append((size, sq))


def micro_batch_part(update: dict[str, Tensor], weights: Tensor | None, opaque: bool, size: int):
    """(b_m, G_m, ‖G_m‖²) of one micro-batch for the micro-batch noise estimator: G_m = ∇ℓ_m / Σ_i w_i
    (float64, the unreached parameters left out as zeros), the gradient per unit weight of its batch
    loss ℓ_m = Σ_i w_i L_i; None when the loss or the gradient is not finite."""
    if opaque or weights is None:
        raise ValueError(
            "accumulate(estimator='micro-batch') reads the loss's weights at the model output, and this loss is "
            "computed inside the model: compute it from the output in loss_fn (e.g. persample.causal_lm_loss() "
            "for token losses), not `lambda out: out.loss`"
        )
    total = float(weights.double().sum())
    if not math.isfinite(total):
        return None
    if total <= 0:
        raise ValueError(
            f"accumulate(estimator='micro-batch'): the batch loss's weights sum to {total:g}; the "
            "micro-batch gradient per unit weight needs a positive sum (a mean or sum loss)"
        )
    grad = {name: g.detach().double() / total for name, g in update.items()}
    sq = math.fsum(float(g.pow(2).sum()) for g in grad.values())
    return None if not math.isfinite(sq) else (size, grad, sq)


def micro_batch_noise(parts: list, weighted_sum: dict[str, Tensor]):
    """The two-batch :class:`~persample.noise.NoiseScale` (``estimator="micro-batch"``) of the
    micro-batches' (b_m, ‖G_m‖²) and Σ_m b_m G_m; None, with a warning, when it cannot be computed."""
    import warnings

    from .noise import two_batch_noise_scale

    if any(p is None for p in parts):
        warnings.warn(
            "persample: a micro-batch gradient was not finite (inf/NaN), so this accumulate block has "
            "no micro-batch noise estimate (acc.noise is None; see tracker.skipped)",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    if len(parts) < 2:
        warnings.warn(
            f"persample: accumulate(estimator='micro-batch') needs at least 2 micro-batches to estimate "
            f"the noise, this block had {len(parts)}; acc.noise is None",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    big_n = sum(b for b, _ in parts)
    big = math.fsum(float((total / big_n).pow(2).sum()) for total in weighted_sum.values())
    small = math.fsum(sq for _, sq in parts) / len(parts)
    b_small = len(parts) / math.fsum(1.0 / b for b, _ in parts)
    return dataclasses.replace(two_batch_noise_scale(b_small, small, big_n, big), estimator="micro-batch")


def refuse_with_micro_batches(**conflicts: bool) -> None:
    why = {
        "reference": "accumulate(reference=...) (inner products need per-example gradients)",
        "clip_norm": "clip_norm (clipping needs per-example gradients)",
        "check_every": "check_every > 0 (the check compares per-example gradients with the batch gradient)",
        "distributed": "torch.distributed (each rank's micro-batches would give only a local estimate)",
    }
    found = [why[name] for name, present in conflicts.items() if present]
    if found:
        raise ValueError(
            "accumulate(estimator='micro-batch') is for models without per-example gradients and "
            f"cannot be combined with {'; '.join(found)}"
        )
