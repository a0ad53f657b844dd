"""Exceptions raised by persample."""

from __future__ import annotations

__all__ = ["MeanMismatchError", "UnsupportedModelError"]


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
