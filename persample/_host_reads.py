"""Host reads of values that live on the device, gathered so that a step reads them all at once.

On a GPU every ``.item()``, ``bool(t)`` or ``.tolist()`` of a device tensor stalls the host until the
device has caught up (a host-device synchronisation). persample's checks (a weight that must be finite,
a sum that must match) and its choices (the one-pass second moment M2 = Σ g∘g − B ḡ∘ḡ or the two-pass
form where the first may have cancelled) each need one such read. :class:`HostChecks` gathers them:

- :meth:`HostChecks.add` a check: a boolean tensor (True: it failed) and the error it raises;
- :meth:`HostChecks.defer` a value the host needs later: a tensor and what to do with its values;
- :meth:`HostChecks.resolve` reads every pending flag and value in one device-to-host copy, then acts
  on them in the order they were added, as if each had been read where it was added.

:func:`one_host_read` opens such a collector for a whole step (``Tracker.step``'s statistics step,
``Tracker.observe``): code deep inside the engines that would read a flag defers it there instead
(:func:`open_checks`), and the next :meth:`HostChecks.resolve` anywhere in the step, or the end of the
block, reads it together with everything else pending.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Union

import torch
from torch import Tensor

__all__ = ["HostChecks", "one_host_read", "open_checks"]

_OPEN: contextvars.ContextVar[HostChecks | None] = contextvars.ContextVar("persample_open_checks", default=None)

Error = Union[Callable[[], BaseException], "type[BaseException]"]  # (a runtime alias: no `|` before 3.10)


class HostChecks:
    """Checks and values whose outcome lives on the device, read to the host at once: each :meth:`add`
    gives a boolean tensor (True: the check fails) and the error it raises; each :meth:`defer` a tensor
    and a function of its values (a list of floats). :meth:`resolve` reads every pending flag and value
    (and the values it is given) in one device-to-host copy, then runs the deferred functions and raises
    the error of the first failing check, in the order they were added, as if each had been read where it
    was added. Inside :func:`one_host_read`, the step's open collector's entries, added earlier, are read
    in the same copy and come first. Code that runs between an :meth:`add` and the :meth:`resolve` must
    not depend on the check having passed, except through an exception: there, call :meth:`raise_first`
    first, so that an earlier failing check wins as before.

    >>> checks = HostChecks()
    >>> checks.add(torch.tensor(False), ValueError)
    >>> checks.resolve(torch.tensor([0.5, 2.0]))
    [0.5, 2.0]
    """

    def __init__(self) -> None:
        # (the tensor read, the error of a check or None, the function of a deferred value or None)
        self._entries: list[tuple[Tensor, Error | None, Callable[[list[float]], None] | None]] = []

    def add(self, failed: Tensor, error: Error) -> None:
        self._entries.append((failed.reshape(()), error, None))

    def defer(self, values: Tensor, then: Callable[[list[float]], None]) -> None:
        """``then(values as floats)`` at the next :meth:`resolve`, in order with the checks."""
        self._entries.append((values.reshape(-1), None, then))

    def __len__(self) -> int:
        return len(self._entries)

    def _take(self) -> list:
        """This collector's entries, after the open step collector's (which are taken out of it)."""
        outer = _OPEN.get()
        entries = []
        if outer is not None and outer is not self:
            entries, outer._entries = outer._entries, []
        entries += self._entries
        self._entries = []
        return entries

    def resolve(self, values: Tensor | None = None) -> list[float]:
        """Act on every pending entry (raising the first failing check's error); return ``values``
        (a 1-d tensor) as floats. One host read in all."""
        entries = self._take()
        parts = [t.to(dtype=torch.float64) for t, _, _ in entries]
        if values is not None:
            parts.append(values.reshape(-1).to(torch.float64))
        if not parts:
            return []
        device = parts[0].device
        host = torch.cat([p.reshape(-1).to(device) for p in parts]).tolist()  # the one host read
        start = 0
        for tensor, error, then in entries:
            n = tensor.numel()
            read, start = host[start : start + n], start + n
            if then is not None:
                then(read)
            elif read[0]:
                raise error()  # type: ignore[misc]  # a check: error is set
        return host[start:]

    def raise_first(self) -> None:
        """Raise the first failing check's error, if any (after an exception, before letting it go):
        the checks of this collector and of the open step collector; deferred values stay pending."""
        outer = _OPEN.get()
        entries = (outer._entries if outer is not None and outer is not self else []) + self._entries
        checks = [(t, error) for t, error, then in entries if then is None]
        if not checks:
            return
        flags = torch.stack([t.to(device=checks[0][0].device, dtype=torch.bool) for t, _ in checks]).tolist()
        for failed, (_, error) in zip(flags, checks):
            if failed:
                self._entries.clear()
                if outer is not None and outer is not self:
                    outer._entries.clear()
                raise error()  # type: ignore[misc]  # a check: error is set


def open_checks() -> HostChecks | None:
    """The collector of the step under way (:func:`one_host_read`), or None outside one."""
    return _OPEN.get()


@contextlib.contextmanager
def one_host_read() -> Iterator[HostChecks]:
    """Gather the host reads of the block into as few as possible: checks and values deferred to the
    yielded collector (by this code, or by the engines through :func:`open_checks`) are read with the
    next :meth:`HostChecks.resolve` of any collector in the block, and what is still pending when the
    block ends is read then (in one copy). On an exception, pending entries are dropped unread.

    >>> with one_host_read() as checks:
    ...     checks.defer(torch.tensor([3.0]), print)
    [3.0]
    """
    checks = HostChecks()
    token = _OPEN.set(checks)
    try:
        yield checks
    finally:
        _OPEN.reset(token)
    checks.resolve()
