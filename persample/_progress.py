"""An optional progress bar: tqdm when it is installed and asked for, otherwise nothing."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """Yield ``update(k)`` for a bar of ``total`` units, or ``None`` when disabled or tqdm is missing."""
    if not enabled:
        yield None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra
        yield None
        return
    bar = tqdm(total=total, desc=desc, unit="ex", leave=False)
    try:
        yield bar.update
    finally:
        bar.close()
