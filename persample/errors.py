"""Every exception and warning persample raises on purpose, in one place.

- :class:`UnsupportedModelError`: per-example gradients are undefined for the
  model as configured (train-mode BatchNorm, random ops under
  ``randomness="error"``, …); no engine can help, the message names the fix.
- :class:`NotExact`: one engine cannot give the exact answer for this model
  (``engine="auto"`` then moves on to the next engine); the message says why.
- :class:`ObservationError`: the backward observed by ``Tracker.observe`` does
  not match the declared per-example loss.
- :class:`BatchLossMismatch`: the batch loss is not Σ_i w_i L_i of the
  declared per-example losses (``Tracker``, :mod:`persample.batch_loss`).
- :class:`MeanMismatchError`: :func:`persample.check_mean` found
  (1/B) Σ_i g_i ≠ autograd's gradient of the mean loss.
- :class:`SlowPathWarning`: ``engine="auto"`` fell back to the per-example
  loop, which is exact but costs B forward + backward passes.
- :class:`SkippedStatisticsWarning`: a ``Tracker(on_refusal="skip" | "fallback")``
  step had no exact statistics; training went on, the step was counted as skipped.
"""

from __future__ import annotations

__all__ = ["MeanMismatchError", "UnsupportedModelError", "NotExact", "ObservationError", "BatchLossMismatch",
           "SlowPathWarning", "SkippedStatisticsWarning"]


class MeanMismatchError(AssertionError):
    """The mean of the per-example gradients differs from autograd's gradient of the mean loss.

    Raised by :func:`persample.check_mean` (and ``Tracker(check_every=k)``). Its
    ``report`` attribute is the :class:`persample.MeanCheck` that failed.
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class UnsupportedModelError(ValueError):
    """The model's per-example gradients are undefined as configured (the message names the fix)."""


class NotExact(RuntimeError):
    """An engine cannot give exact statistics for this model or batch (the message says why).

    ``engine="auto"`` catches it and moves on to the next exact engine; with an
    explicit ``engine=`` it reaches the caller.
    """


class ObservationError(RuntimeError):
    """The observed backward does not match the declared per-example loss (the message says how)."""


class BatchLossMismatch(ValueError):
    """The batch loss is not Σ_i w_i L_i of the declared per-example losses (the message says how)."""


class SlowPathWarning(UserWarning):
    """``engine="auto"`` used the exact per-example loop: correct, but B forward + backward passes."""


class SkippedStatisticsWarning(UserWarning):
    """A step's statistics could not be computed exactly and ``on_refusal`` said not to stop training: the
    step is counted as skipped (``Tracker.refused``), ``p.grad`` is what the backward made it. Warned once
    per reason."""
