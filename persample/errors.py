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

Every refusal (the first four classes) carries a machine-readable ``code``
declared in :mod:`persample.contract`, with the statement of the precondition
that failed, the ``module`` it concerns where there is one, and the ``fix``.
Match on ``err.code``, never on the prose::

    >>> from persample.errors import NotExact
    >>> err = NotExact("module 0 (Linear): ...", code="MODIFIED_IN_PLACE", module="0 (Linear)")
    >>> err.code, err.module
    ('MODIFIED_IN_PLACE', '0 (Linear)')
"""

from __future__ import annotations

from typing import Callable, Sequence

__all__ = [
    "PersampleError",
    "MeanMismatchError",
    "UnsupportedModelError",
    "NotExact",
    "ObservationError",
    "BatchLossMismatch",
    "OtherRankFailed",
    "SlowPathWarning",
    "SkippedStatisticsWarning",
]


class PersampleError(Exception):
    """Base of persample's refusals: ``code`` (see :mod:`persample.contract`), ``module`` and ``fix``.

    The message is the first argument, as for any exception; ``str(err)`` ends
    with ``[code]`` when the error has a code, so logs show it too.
    """

    def __init__(
        self, message: str = "", *, code: str | None = None, module: str | None = None, fix: str | None = None
    ):
        super().__init__(message)
        self.code = code if code is not None else getattr(message, "code", None)  # a contract.Finding
        self.module = module if module is not None else getattr(message, "module", None)
        self.fix = fix if fix is not None or self.code is None else _declared_fix(self.code)

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} [{self.code}]" if self.code else text

    def __reduce__(self):  # picklable across processes (multiprocessing, torch.distributed workers)
        return _rebuild, (type(self), super().__str__(), self.code, self.module, self.fix)


def _no_declared_fix(code: str) -> str | None:
    return None


#: The fix declared for a code: set by :mod:`persample.contract` when it is imported (errors sits below
#: the registry and does not import it).
declared_fix: Callable[[str], str | None] = _no_declared_fix


def _declared_fix(code: str) -> str | None:
    return declared_fix(code)


def _rebuild(cls, message, code, module, fix):
    return cls(message, code=code, module=module, fix=fix)


class MeanMismatchError(PersampleError, AssertionError):
    """The mean of the per-example gradients differs from autograd's gradient of the mean loss.

    Raised by :func:`persample.check_mean` (and ``Tracker(check_every=k)``). Its
    ``report`` attribute is the :class:`persample.MeanCheck` that failed.
    """

    def __init__(self, message: str, report=None, *, code: str | None = "MEAN_MISMATCH", **kwargs):
        super().__init__(message, code=code, **kwargs)
        self.report = report

    def __reduce__(self):
        return MeanMismatchError, (super(PersampleError, self).__str__(), self.report)


class UnsupportedModelError(PersampleError, ValueError):
    """The model's per-example gradients are undefined as configured (the message names the fix)."""


class NotExact(PersampleError, RuntimeError):
    """An engine cannot give exact statistics for this model or batch (the message says why).

    ``engine="auto"`` catches it and moves on to the next exact engine; with an
    explicit ``engine=`` it reaches the caller.
    """


class ObservationError(PersampleError, RuntimeError):
    """The observed backward does not match the declared per-example loss (the message says how)."""


class BatchLossMismatch(PersampleError, ValueError):
    """The batch loss is not Σ_i w_i L_i of the declared per-example losses (the message says how)."""


class OtherRankFailed(PersampleError, RuntimeError):
    """Another rank of the process group raised in the same collective step; this rank raises too
    (code ``OTHER_RANK_FAILED``).

    Raised by :func:`persample.distributed.agree` (``Tracker.step``, ``Tracker.observe`` and
    ``accumulate`` under ``torch.distributed``) on every rank that did not fail itself, so that a step's
    outcome is the same on every rank. ``ranks`` lists the ranks that failed; their own exceptions are in
    their own logs. Picklable with its ``ranks`` and ``code``.

    >>> import pickle
    >>> err = pickle.loads(pickle.dumps(OtherRankFailed("rank 1 of 2 raised", ranks=[1])))
    >>> err.code, err.ranks, isinstance(err, RuntimeError)
    ('OTHER_RANK_FAILED', (1,), True)
    """

    def __init__(self, message: str = "", ranks: Sequence[int] = (), **kwargs):
        kwargs.setdefault("code", "OTHER_RANK_FAILED")
        super().__init__(message, **kwargs)
        self.ranks = tuple(ranks)

    def __reduce__(self):
        return _rebuild_other_rank_failed, (super(PersampleError, self).__str__(), self.ranks, self.module, self.fix)


def _rebuild_other_rank_failed(message, ranks, module, fix):
    return OtherRankFailed(message, ranks, module=module, fix=fix)


class SlowPathWarning(UserWarning):
    """``engine="auto"`` used the exact per-example loop: correct, but B forward + backward passes."""

    #: the refused engines' reasons, ``"engine: message"`` (set by ``grad_stats``)
    reasons: list[str]


class SkippedStatisticsWarning(UserWarning):
    """A step's statistics could not be computed exactly and ``on_refusal`` said not to stop training: the
    step is counted as skipped (``Tracker.refused``), ``p.grad`` is what the backward made it. Warned once
    per reason."""
