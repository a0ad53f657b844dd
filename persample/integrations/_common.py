"""What the framework integrations share: which diagnostics they log, and under which names."""

from __future__ import annotations

import math
from typing import Any

from ..loggers import Diagnostics
from ..stats import GradStats

#: The diagnostics columns logged by default (see :func:`persample.noise.diagnostics`).
DEFAULT_KEYS = ("b_simple", "b_simple_ema", "grad_sq", "trace_cov", "gsnr_mean", "norm_test", "norm_test_batch",
                "grad_norm", "norm_p50")


def diagnostics_row(diagnostics: Diagnostics, stats: GradStats, step: int, keys: tuple[str, ...] | None,
                    prefix: str) -> dict[str, float]:
    """The row of ``stats`` (through ``diagnostics``, which keeps the EMA and writes its sinks),
    restricted to ``keys`` (all when None), as ``{prefix + key: float}``."""
    row = diagnostics.row(stats, step)
    diagnostics.log(row)
    names = [k for k in row if k != "step"] if keys is None else [k for k in keys if k in row]
    return {f"{prefix}{k}": float(row[k]) for k in names if isinstance(row[k], (int, float))
            and not isinstance(row[k], bool) and not (isinstance(row[k], float) and math.isnan(row[k]))}


def skipped_steps(tracker: Any) -> int:
    """How many statistics steps of ``tracker`` had no statistics (refused, or not finite)."""
    return len(set(tracker.skipped))


def require(module: str, extra: str) -> Any:
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this integration needs {module!r}: pip install -e \".[{extra}]\" (from a source "
                          f"checkout of persample) or pip install {module}") from err
