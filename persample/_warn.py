"""Warnings that point at the user's line: the first frame outside persample (and contextlib)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from types import FrameType

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SKIPPED = (_PACKAGE, os.path.dirname(os.path.abspath(contextlib.__file__)) + os.sep + "contextlib")


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the function that calls this: the first frame
    outside the persample package (and ``contextlib``, for ``with tracker.accumulate():``), so that
    the warning names the user's line, whatever the depth of the call inside persample."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
        level += 1
    return level


def short_reason(reason: str, limit: int = 200) -> str:
    """The first sentence of an engine's reason, without the text of an inner exception (vmap's own
    message quotes a paragraph of its internals), cut at ``limit`` characters."""
    hint = (
        " (data-dependent control flow, such as .item() on an attention mask)"
        if "calling .item()" in reason or "data-dependent control flow" in reason
        else ""
    )
    text = reason.strip().splitlines()[0] if reason.strip() else reason
    inner = re.search(r": [A-Za-z_.]*(Error|Exception)\b", text)
    if inner:
        text = text[: inner.start()]
    end = re.search(r"[.;](\s|$)", text)
    if end:
        text = text[: end.start()]
    text = text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
    return text + hint
