"""What the framework integrations share: which diagnostics they log, and under which names."""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..errors import SkippedStatisticsWarning
from ..loggers import Diagnostics
from ..stats import GradStats

#: The diagnostics columns logged by default (see :func:`persample.noise.diagnostics`).
DEFAULT_KEYS = (
    "b_simple",
    "b_simple_ema",
    "grad_sq",
    "trace_cov",
    "gsnr_mean",
    "norm_test",
    "norm_test_batch",
    "grad_norm",
    "norm_p50",
    "b_precond",
    "b_precond_ema",
)


def skip_block_statistics(tracker: Any, accumulation: Any, reason: str, stacklevel: int = 2) -> None:
    """The optimizer step under way (``accumulation``, the Tracker's open block) gets no statistics: it is
    added to ``tracker.skipped`` and, with ``reason``, to ``tracker.refused``, and ``reason`` is warned once
    (:class:`~persample.SkippedStatisticsWarning`); training goes on. Nothing happens outside a block with
    statistics, or where the block was already refused."""
    if accumulation is None or tracker is None or not accumulation.with_stats or accumulation.refused:
        return
    accumulation.refused = True
    tracker.skipped.append(tracker.steps)
    tracker.refused.append((tracker.steps, reason))
    if reason not in tracker._warned_reasons:
        tracker._warned_reasons.add(reason)
        warnings.warn(
            f"persample: the statistics of step {tracker.steps} were skipped (training goes on): {reason}",
            SkippedStatisticsWarning,
            stacklevel=stacklevel + 1,
        )


def snapshot_preconditioner(diagnostics: Diagnostics, optimizer: Any, model: Any) -> None:
    """Before the optimizer's step: Adam's preconditioner P as it stands (what the step divides by) for the
    preconditioned noise scale of this step's row (:func:`persample.noise.preconditioned_noise_scale`).
    Another optimizer: no such columns. Adam before its first step: NaN columns."""
    import torch

    from .. import noise
    from ..loggers import PRECONDITIONER_UNDEFINED

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer, Lightning's wrapper
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        diagnostics.preconditioner = None
        return
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not noise._optimizer_stepped(optimizer, trainable.values()):
        diagnostics.preconditioner = PRECONDITIONER_UNDEFINED
        return
    try:
        diagnostics.preconditioner = noise.adam_preconditioner(optimizer, list(trainable), model=trainable)
    except ValueError as err:  # diagnostics never stop training: no preconditioned columns, one warning
        diagnostics.preconditioner = None
        if "preconditioner" not in diagnostics._warned:
            diagnostics._warned.add("preconditioner")
            warnings.warn(f"persample: no preconditioned noise scale: {err}", stacklevel=2)


def diagnostics_row(
    diagnostics: Diagnostics, stats: GradStats, step: int, keys: tuple[str, ...] | None, prefix: str
) -> dict[str, float]:
    """The row of ``stats`` (through ``diagnostics``, which keeps the EMA and writes its sinks),
    restricted to ``keys`` (all when None), as ``{prefix + key: float}``."""
    row = diagnostics.row(stats, step)
    diagnostics.log(row)
    names = [k for k in row if k != "step"] if keys is None else [k for k in keys if k in row]
    return {
        f"{prefix}{k}": float(row[k])
        for k in names
        if isinstance(row[k], (int, float))
        and not isinstance(row[k], bool)
        and not (isinstance(row[k], float) and math.isnan(row[k]))
    }


def skipped_steps(tracker: Any) -> int:
    """How many statistics steps of ``tracker`` had no statistics (refused, or not finite)."""
    return len(set(tracker.skipped))


def require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f'this integration needs {module!r}: pip install -e ".[{extra}]" (from a source '
            f"checkout of persample) or pip install {module}"
        ) from err
