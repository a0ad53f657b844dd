"""persample: per-example gradients, their statistics, and gradient-noise diagnostics for PyTorch.

The flow, from batch to diagnostics::

    batch ─▶ engine ─▶ GradStats ─▶ Tracker ─▶ p.grad, hooks ─▶ diagnostics

- :func:`per_sample_grads`: materialised per-example gradients ``{name: [B, *shape]}``.
- :func:`grad_stats`: streamed statistics (:class:`GradStats`: mean, unbiased
  variance, per-example norms, losses) with an exact ``merge``.
- :class:`Tracker`: a drop-in replacement for ``loss.backward()`` in a training
  loop that writes ḡ into ``p.grad`` and calls hooks with the batch's GradStats.
- :mod:`persample.distributed`: ``all_reduce_stats`` (the statistics of all
  ranks' batches together) and the Tracker's DDP support.
- :class:`BatchLoss`, :func:`causal_lm_loss`: batch losses that are not the
  mean of the per-example losses (token means, sums, class weights), ℓ = Σ_i w_i L_i.
- :func:`fix`: replace train-mode BatchNorms by GroupNorms, so that per-example
  gradients exist (as Opacus's ``ModuleValidator.fix``).
- :func:`explain`: per module its rule or fallback, every refusal with its code
  (:mod:`persample.contract`), and the engine each entry point takes.
- :func:`check_mean`: asserts mean(per-example gradients) == autograd's gradient
  of the mean loss, raising :class:`MeanMismatchError` otherwise.

Per-example gradients are unscaled: row i is dL_i/dθ, never divided by B.
"""

from .api import grad_stats, per_sample_grads
from .batch_loss import BatchLoss, BatchLossMismatch, causal_lm_loss
from .check import MeanCheck, check_mean
from .errors import (
    MeanMismatchError,
    NotExact,
    ObservationError,
    PersampleError,
    SkippedStatisticsWarning,
    SlowPathWarning,
    UnsupportedModelError,
)
from .explain import Explanation, explain
from .custom_rules import check_rule, register_rule, unregister_rule
from .stats import GradStats
from .tracker import Tracker
from .repair import Replacement, fix
from . import noise  # noqa: E402  (persample.plot stays lazy: matplotlib is an optional extra)
from . import distributed  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "per_sample_grads",
    "grad_stats",
    "check_mean",
    "GradStats",
    "Tracker",
    "MeanCheck",
    "MeanMismatchError",
    "UnsupportedModelError",
    "NotExact",
    "ObservationError",
    "SlowPathWarning",
    "SkippedStatisticsWarning",
    "__version__",
    "noise",
    "distributed",
    "BatchLoss",
    "BatchLossMismatch",
    "causal_lm_loss",
    "fix",
    "Replacement",
    "PersampleError",
    "explain",
    "Explanation",
    "register_rule",
    "unregister_rule",
    "check_rule",
]
