"""Loggers: Tracker hooks that write one row of diagnostics per statistics step.

Plug any of them into a :class:`persample.Tracker`::

    tracker = persample.Tracker(model, loss_fn, inner_products=True)
    tracker.register_hook(persample.loggers.CSVLogger("metrics.csv"))

A row is ``{"step": tracker.steps, **persample.noise.diagnostics(stats), "b_simple_ema": …}``
(see :func:`persample.noise.diagnostics` for its keys). To compute the row once
and send it to several sinks, and to keep it in memory for a plot, use
:class:`Diagnostics`::

    diag = Diagnostics(CSVLogger("metrics.csv"), TensorBoardLogger("runs/a"))
    tracker.register_hook(diag)
    ...
    persample.plot.plot_diagnostics(diag.rows, "diagnostics.png")

:class:`CSVLogger` and :class:`JSONLLogger` need only the standard library;
:class:`TensorBoardLogger` needs the ``tensorboard`` package
(``pip install -e ".[tensorboard]" (in a persample checkout), or pip install tensorboard``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import torch

from . import noise
from .stats import GradStats

__all__ = ["Diagnostics", "CSVLogger", "JSONLLogger", "TensorBoardLogger", "read_metrics", "tensorboard_tag"]

Row = dict[str, Any]

#: ``Diagnostics.preconditioner`` for a step whose optimizer has no preconditioner yet (before its first
#: step): the preconditioned columns are NaN. The framework integrations set it.
PRECONDITIONER_UNDEFINED: Any = object()

#: Rows that ``Diagnostics(keep=True)`` keeps (the most recent ones): about 3.3 KB each.
DEFAULT_KEEP = 10_000


class Diagnostics:
    """A Tracker hook that computes one diagnostics row per statistics step.

    Each row is ``{"step": …, **noise.diagnostics(stats, …), "b_simple_ema": …}``
    (with ``b_simple_ema_lo`` / ``…_hi``, the EMA's 90% interval, :meth:`persample.noise.NoiseScaleEMA.interval`)
    plus whatever ``extra(tracker, stats)`` returns. The row goes to every sink
    (anything with a ``write(row)`` method, such as the loggers below) and, with
    ``keep=True``, into :attr:`rows` (what :func:`persample.plot.plot_diagnostics`
    draws).

    Args:
        *sinks: objects with ``write(row)`` (and optionally ``close()``).
        ema_beta: decay of the :class:`~persample.noise.NoiseScaleEMA` behind
            ``b_simple_ema``.
        per_layer: include per-layer columns (``layer/<prefix>/…``).
        extra: a callable ``(tracker, stats) -> dict`` whose items are added to
            each row (e.g. the learning rate or the epoch).
        keep: keep rows in :attr:`rows`: ``True`` keeps the last
            :data:`DEFAULT_KEEP` (10 000, about 33 MB of rows), an int that many,
            ``False`` none.
        tests: the batch-size tests to run (names from :data:`persample.noise.TESTS`);
            only their columns are computed. Default: the norm test, and the
            inner-product and orthogonality tests when the statistics have inner
            products (their columns are NaN otherwise, without a warning).
        optimizer: an Adam / AdamW optimizer: adds the preconditioned noise
            scale (``b_precond``, ``b_precond_ema`` and its 90% interval
            ``b_precond_ema_lo`` / ``_hi``, ``precond_excluded``, …, see
            :func:`persample.noise.preconditioned_noise_scale`), NaN on steps
            before the optimizer's first step. Parameters are named through the
            Tracker's model. ``preconditioner={name: P}`` gives P directly.
        **thresholds: ``norm_threshold``, ``inner_threshold``,
            ``ortho_threshold`` for the batch-size tests.

    Columns that were asked for (``tests=``, ``optimizer=``) and that the
    statistics cannot give are NaN, with one warning naming the Tracker option
    that enables them; nothing else is warned about (without variance the GSNR
    columns are NaN, silently). A batch of one example (the last batch of an epoch with
    ``drop_last=False``) or non-finite statistics give a row whose diagnostics
    are NaN (``n`` and ``loss`` are kept), with one warning, and leave the EMA
    as it was: training goes on.
    """

    def __init__(
        self,
        *sinks: Any,
        ema_beta: float = noise.DEFAULT_EMA_BETA,
        per_layer: bool = True,
        extra: Callable[[Any, GradStats], Mapping[str, Any]] | None = None,
        keep: bool | int = True,
        norm_threshold: float = noise.DEFAULT_NORM_THRESHOLD,
        inner_threshold: float = noise.DEFAULT_INNER_THRESHOLD,
        ortho_threshold: float = noise.DEFAULT_ORTHO_THRESHOLD,
        tests: Sequence[str] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        preconditioner: Mapping[str, Any] | None = None,
        model: torch.nn.Module | None = None,
    ):
        self.tests = None if tests is None else noise._check_tests(tests)
        if optimizer is not None and preconditioner is not None:
            raise ValueError("Diagnostics: pass optimizer= or preconditioner=, not both")
        if optimizer is not None and not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(
                f"Diagnostics(optimizer=...) reads Adam's second moments: torch.optim.Adam or AdamW, "
                f"not {type(optimizer).__name__}; pass preconditioner={{name: P}} for another "
                f"preconditioned optimizer (B_simple is the noise scale of SGD)"
            )
        self.optimizer = optimizer
        self.preconditioner = preconditioner
        self.model = model
        self.ema_precond = noise.NoiseScaleEMA(ema_beta)
        for sink in sinks:
            if not callable(getattr(sink, "write", None)):
                raise TypeError(f"a sink needs a write(row) method; {type(sink).__name__} has none")
        self.sinks = list(sinks)
        self.ema = noise.NoiseScaleEMA(ema_beta)
        self.per_layer = per_layer
        self.extra = extra
        if not isinstance(keep, (bool, int)) or keep < 0:
            raise ValueError(f"keep must be True, False or a number of rows ≥ 0, got {keep!r}")
        self.keep = DEFAULT_KEEP if keep is True else int(keep)
        self.thresholds = dict(
            norm_threshold=norm_threshold, inner_threshold=inner_threshold, ortho_threshold=ortho_threshold
        )
        self.rows: list[Row] = []
        self._warned: set[str] = set()
        self._keys: list[str] = []

    def row(self, stats: GradStats, step: int) -> Row:
        """The row for ``stats`` at ``step`` (updates the EMA; writes nothing)."""
        problem = _undiagnosable(stats)
        if problem is not None:
            return self._nan_row(stats, step, problem)
        self._warn_missing(stats)
        tests = self.tests
        if tests is None:
            tests = noise.TESTS if stats.inner_products is not None else ("norm",)
        undefined = self.preconditioner is PRECONDITIONER_UNDEFINED
        options: dict[str, Any] = dict(per_layer=self.per_layer, tests=tests, **self.thresholds)
        try:
            values = noise.diagnostics(
                stats,
                optimizer=self.optimizer,
                model=self.model,
                preconditioner=None if undefined else self.preconditioner,
                **options,
            )
        except ValueError as err:
            if self.optimizer is None and (self.preconditioner is None or undefined):
                raise
            # The preconditioner does not fit these statistics (a parameter the optimizer does not hold, a
            # missing entry): diagnostics never stop training; the preconditioned columns are NaN.
            values = noise.diagnostics(stats, **options)
            undefined = True
            if "preconditioner" not in self._warned:
                self._warned.add("preconditioner")
                warnings.warn(
                    f"persample diagnostics: no preconditioned noise scale ({err}); its columns are NaN", stacklevel=3
                )
        if undefined:  # the optimizer had not stepped yet: P is undefined on this step
            values.update(
                b_precond=math.nan, grad_sq_precond=math.nan, trace_cov_precond=math.nan, precond_excluded=math.nan
            )
        if self.tests is None and stats.inner_products is None:  # the default's columns, NaN: nothing was asked
            for key in ("inner_test", "ortho_test"):
                values.update(
                    {
                        key: math.nan,
                        f"{key}_batch": math.nan,
                        f"{key}_threshold": float(self.thresholds[key.replace("test", "threshold")]),
                    }
                )
        row: Row = {"step": step, **values}
        row["b_simple_ema"] = self.ema.update(
            noise.NoiseScale(stats.n, values["grad_sq"], values["trace_cov"], values["b_simple"], math.nan, math.nan)
        )
        row["b_simple_ema_lo"], row["b_simple_ema_hi"] = self.ema.interval(0.9)
        if "b_precond" in values:
            if math.isnan(values["b_precond"]):
                row["b_precond_ema"] = self.ema_precond.value
            else:
                row["b_precond_ema"] = self.ema_precond.update(
                    noise.NoiseScale(
                        stats.n,
                        values["grad_sq_precond"],
                        values["trace_cov_precond"],
                        values["b_precond"],
                        math.nan,
                        math.nan,
                    )
                )
            row["b_precond_ema_lo"], row["b_precond_ema_hi"] = self.ema_precond.interval(0.9)
        return row

    def _nan_row(self, stats: GradStats, step: int, problem: str) -> Row:
        if problem not in self._warned:
            self._warned.add(problem)
            warnings.warn(
                f"persample diagnostics: {problem}; its row is NaN (the EMA skips it). Further such "
                "steps are not warned about",
                stacklevel=4,
            )
        keys = self._keys or ["n", "loss", "grad_norm", "grad_sq", "trace_cov", "b_simple"]
        row: Row = {"step": step, **{k: math.nan for k in keys if k != "step"}}
        row["n"] = float(stats.n)
        row["loss"] = float(stats.losses.detach().double().mean())
        row["b_simple_ema"] = self.ema.value
        return row

    def __call__(self, tracker: Any, stats: GradStats) -> Row:
        if self.model is None and self.optimizer is not None:
            self.model = getattr(tracker, "model", None)
        row = self.row(stats, tracker.steps)
        if self.extra is not None:
            row.update(self.extra(tracker, stats))
        self.log(row)
        return row

    def log(self, row: Mapping[str, Any]) -> None:
        """Send a row (from :meth:`row`, or any other dict of scalars) to every sink, and keep it."""
        row = dict(row)
        if not self._keys:
            self._keys = list(row)
        if self.keep:
            self.rows.append(row)
            if len(self.rows) > self.keep:
                del self.rows[: len(self.rows) - self.keep]
        for sink in self.sinks:
            sink.write(row)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to log the rows an uninterrupted run logs: the EMA behind
        ``b_simple_ema``, the columns seen and the warnings already given (JSON-safe). :attr:`rows`
        is not saved (the sinks' files hold them; :func:`read_metrics` reads them back)."""
        return {
            "ema": self.ema.state_dict(),
            "ema_precond": self.ema_precond.state_dict(),
            "keys": list(self._keys),
            "warned": sorted(self._warned),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.ema.load_state_dict(state["ema"])
        if "ema_precond" in state:
            self.ema_precond.load_state_dict(state["ema_precond"])
        self._keys = list(state.get("keys", []))
        self._warned = set(state.get("warned", []))

    def reopen(self) -> None:
        """Reopen the sinks that :meth:`close` closed and can write again (``reopen()``: the file loggers),
        before training starts again on the same trainer."""
        for sink in self.sinks:
            reopen = getattr(sink, "reopen", None)
            if callable(reopen):
                reopen()

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> "Diagnostics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _warn_missing(self, stats: GradStats) -> None:
        missing = []
        wants_precond = self.optimizer is not None or self.preconditioner is not None
        if stats.m2 is None and wants_precond and "var" not in self._warned:
            self._warned.add("var")
            missing.append("the preconditioned noise scale needs var=True")
        asked_inner = self.tests is not None and {"inner_product", "orthogonality"} & set(self.tests)
        if stats.inner_products is None and asked_inner and "inner" not in self._warned:
            self._warned.add("inner")
            missing.append("the inner-product and orthogonality tests need inner_products=True")
        if missing:
            warnings.warn(
                "persample diagnostics: "
                + "; ".join(missing)
                + " in persample.Tracker / grad_stats; those columns are NaN",
                stacklevel=3,
            )
        if (
            stats.inner_products is not None
            and "reference" not in self._warned
            and (self.tests is None or "orthogonality" in self.tests)
            and not noise._reference_is_mean(stats)
        ):
            self._warned.add("reference")
            warnings.warn(
                "persample diagnostics: these inner products are relative to a shared reference r, not "
                "to the batch's own mean (Tracker.accumulate(reference=...)): inner_test is the test "
                "along r (persample.noise.inner_product_test), and the orthogonality test columns are "
                "NaN",
                stacklevel=3,
            )


def _undiagnosable(stats: GradStats) -> str | None:
    """Why no diagnostics can be computed from ``stats`` (None when they can)."""
    if stats.n < 2:
        return "a batch of one example has no gradient variance (the last batch of an epoch?)"
    tensors = [*stats.mean.values(), *stats.param_sq_norms.values(), *(stats.m2 or {}).values()]
    if stats.inner_products is not None:
        tensors.append(stats.inner_products)
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        return "these statistics are not finite (inf/NaN: an overflowing half-precision step?)"
    return None


class _Sink:
    """A row writer that is also a Tracker hook (through its own :class:`Diagnostics`)."""

    def __init__(self, **diagnostics_options: Any):
        self._diagnostics_options = diagnostics_options
        self._hook: Diagnostics | None = None

    def __call__(self, tracker: Any, stats: GradStats) -> None:
        if self._hook is None:
            self._hook = Diagnostics(self, keep=False, **self._diagnostics_options)
        self._hook(tracker, stats)

    def write(self, row: Mapping[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The state of the :class:`Diagnostics` behind this logger as a Tracker hook (see there)."""
        if self._hook is None:
            self._hook = Diagnostics(self, keep=False, **self._diagnostics_options)
        return self._hook.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._hook is None:
            self._hook = Diagnostics(self, keep=False, **self._diagnostics_options)
        self._hook.load_state_dict(state)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scalar(value: Any) -> Any:
    """A Python scalar for a tensor / numpy scalar / number; strings pass through."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    return value


def _open_for_writing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if path.exists() and path.is_dir():
        raise IsADirectoryError(f"{what}: {str(path)!r} is a directory, expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _step_of(value: Any) -> float | None:
    """A row's step as a number (None when it has none or it does not parse)."""
    try:
        step = float(_scalar(value))
    except (TypeError, ValueError):
        return None
    return step if math.isfinite(step) else None


def _backup_path(path: Path) -> Path:
    """``metrics.replaced-1.csv``, ``…-2…``: the first name that does not exist yet."""
    k = 1
    while True:
        candidate = path.with_name(f"{path.stem}.replaced-{k}{path.suffix}")
        if not candidate.exists():
            return candidate
        k += 1


def _split_resumed(
    path: Path, kept: list[Any], dropped: list[Any], first_step: float | None, step_of: Callable[[Any], float | None]
) -> tuple[list[Any], list[Any]]:
    """Split an existing file's rows at a resumed run's first step: rows before it stay, the rest
    (written past the checkpoint the run resumed from, or by an earlier run) are replaced."""
    if first_step is None:
        return kept, dropped
    keep: list[Any]
    drop: list[Any]
    keep, drop = [], []
    for r in kept:
        s = step_of(r)
        (drop if s is not None and s >= first_step else keep).append(r)
    return keep, drop + dropped


def _warn_replaced(what: str, path: Path, n_dropped: int, partial: bool, first_step: Any, backup: Path | None) -> None:
    parts = []
    if n_dropped:
        parts.append(
            f"{n_dropped} row(s) from step {_scalar(first_step)} on, written by an earlier run (past the "
            f"checkpoint this run resumed from, or another run), are replaced by this run's rows; the old "
            f"ones are kept in {str(backup)!r}"
        )
    if partial:
        parts.append("an incomplete last line (a run killed mid-write) was dropped")
    warnings.warn(
        f"{what}({str(path)!r}) appends to an existing file: "
        + "; ".join(parts)
        + ". Pass a new path to keep runs apart",
        stacklevel=4,
    )


class CSVLogger(_Sink):
    """Write rows to a CSV file, one per statistics step, flushed after each row.

    The header is the union of the keys seen so far, in first-seen order; when a
    row brings a new key, the file is rewritten with the wider header (earlier
    rows get empty cells there). Floats are written with full precision; NaN
    and inf as ``nan`` / ``inf`` (``float()`` reads them back).

    An existing file is appended to, never overwritten, so a run resumed from a
    checkpoint continues its log: its rows before the first step this logger
    writes are kept (with their header), and rows from that step on (written
    past the checkpoint before the run stopped, or by another run) are replaced
    by the new ones, so no row is duplicated or lost; the replaced rows are kept
    in ``<name>.replaced-<k>.csv``, with one warning. An incomplete last line (a
    run killed mid-write) is dropped, with a warning.

    As a Tracker hook, it computes its rows with a :class:`Diagnostics`
    configured by ``**diagnostics_options``.
    """

    def __init__(self, path: str | os.PathLike, **diagnostics_options: Any):
        super().__init__(**diagnostics_options)
        self.path = _open_for_writing(path, "CSVLogger")
        self.fields: list[str] = []
        self._rows_written = 0
        self._resumed = False
        self._file: TextIO | None = open(self.path, "a", newline="", encoding="utf-8")

    def _resume(self, row: Mapping[str, Any]) -> None:
        """Before the first row: take over an existing file (its header and the rows before ``row``'s step)."""
        self._resumed = True
        if self.path.stat().st_size == 0:
            return
        with open(self.path, newline="", encoding="utf-8") as f:
            text = f.read()
        records = list(csv.reader(text.splitlines(keepends=True)))
        partial = not text.endswith(("\n", "\r"))
        if partial:
            records = records[:-1]
        if not records:
            header, body = [], []
        else:
            header, body = records[0], records[1:]
        col = header.index("step") if "step" in header else None
        first = _step_of(row.get("step"))
        step_of = (lambda r: _step_of(r[col]) if len(r) > col else None) if col is not None else (lambda r: None)
        keep, drop = _split_resumed(self.path, body, [], first, step_of)
        self.fields = list(header)
        self._rows_written = len(keep)
        if not drop and not partial:
            return
        backup = None
        if drop:
            backup = _backup_path(self.path)
            with open(backup, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([header, *drop])
        assert self._file is not None  # called from write(), which refuses a closed logger
        self._file.close()
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        if header:
            csv.writer(self._file).writerows([header, *keep])
        self._file.flush()
        _warn_replaced("CSVLogger", self.path, len(drop), partial, row.get("step"), backup)

    def write(self, row: Mapping[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"CSVLogger({str(self.path)!r}) is closed")
        if not self._resumed:
            self._resume(row)
        new = [k for k in row if k not in self.fields]
        if new:
            self.fields.extend(new)
            if self._rows_written:
                self._rewrite()
            else:
                self._file.seek(0)
                self._file.truncate()
                csv.writer(self._file).writerow(self.fields)
        csv.writer(self._file).writerow([_format_csv(row.get(k, "")) for k in self.fields])
        self._rows_written += 1
        self._file.flush()

    def reopen(self) -> None:
        """After :meth:`close`, write again: the file is taken over as by a new logger on it (rows from the
        next row's step on are replaced, the others kept). The integrations call it when training starts
        again on the same trainer (a second ``trainer.train()`` / ``trainer.fit()``). Open: nothing to do."""
        if self._file is None:
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            self.fields, self._rows_written, self._resumed = [], 0, False

    def _rewrite(self) -> None:
        assert self._file is not None  # called from write(), which refuses a closed logger
        self._file.close()
        with open(self.path, newline="", encoding="utf-8") as f:
            old = list(csv.DictReader(f))
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        writer = csv.writer(self._file)
        writer.writerow(self.fields)
        for r in old:
            writer.writerow([r.get(k, "") for k in self.fields])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _format_csv(value: Any) -> str:
    value = _scalar(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


class JSONLLogger(_Sink):
    """Write rows to a JSON Lines file (one JSON object per line), flushed after each row.

    NaN and ±inf are not valid JSON; they are written as ``null``. An existing
    file is appended to on resume exactly as by :class:`CSVLogger`.
    """

    def __init__(self, path: str | os.PathLike, **diagnostics_options: Any):
        super().__init__(**diagnostics_options)
        self.path = _open_for_writing(path, "JSONLLogger")
        self._resumed = False
        self._file: TextIO | None = open(self.path, "a", encoding="utf-8")

    def _resume(self, row: Mapping[str, Any]) -> None:
        """Before the first row: keep an existing file's rows before ``row``'s step (see :class:`CSVLogger`)."""
        self._resumed = True
        if self.path.stat().st_size == 0:
            return
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        partial = bool(lines) and not lines[-1].endswith("\n")
        if partial:
            lines = lines[:-1]

        def step_of(line: str) -> float | None:
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return _step_of(value.get("step")) if isinstance(value, dict) else None

        keep, drop = _split_resumed(self.path, lines, [], _step_of(row.get("step")), step_of)
        if not drop and not partial:
            return
        backup = None
        if drop:
            backup = _backup_path(self.path)
            backup.write_text("".join(drop), encoding="utf-8")
        assert self._file is not None  # called from write(), which refuses a closed logger
        self._file.close()
        self._file = open(self.path, "w", encoding="utf-8")
        self._file.write("".join(keep))
        self._file.flush()
        _warn_replaced("JSONLLogger", self.path, len(drop), partial, row.get("step"), backup)

    def write(self, row: Mapping[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"JSONLLogger({str(self.path)!r}) is closed")
        if not self._resumed:
            self._resume(row)
        clean = {}
        for k, v in row.items():
            v = _scalar(v)
            clean[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()

    def reopen(self) -> None:
        """After :meth:`close`, write again, as :meth:`CSVLogger.reopen`."""
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
            self._resumed = False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


#: Row keys whose TensorBoard tag says what they are (see :func:`tensorboard_tag`).
TAG_NAMES = {"loss": "example_loss_mean", "n": "batch_size_examples"}


def tensorboard_tag(key: str, prefix: str = "persample/") -> str:
    """The TensorBoard tag of a row key: ``prefix`` + the key, with its unit in the name.

    - ``loss`` → ``example_loss_mean``: the mean over the batch of each example's
      own loss L_i (for a causal LM, a sequence's **summed** token loss, not the
      token mean a Trainer reports as ``loss``);
    - ``n`` → ``batch_size_examples``;
    - batch sizes (``b_simple``, ``b_simple_ema``, ``b_precond…``, ``rank_b_simple``,
      the tests' ``…_batch``) get ``_examples``.

    >>> tensorboard_tag("loss"), tensorboard_tag("layer/fc/b_simple"), tensorboard_tag("norm_test_batch")
    ('persample/example_loss_mean', 'persample/layer/fc/b_simple_examples', 'persample/norm_test_batch_examples')
    """
    head, _, last = key.rpartition("/")
    if not head:
        last = TAG_NAMES.get(last, last)
    if last.startswith(("b_simple", "b_precond", "rank_b_simple")) or last.endswith("_batch"):
        last += "_examples"
    return f"{prefix}{head + '/' if head else ''}{last}"


class TensorBoardLogger(_Sink):
    """Write rows as TensorBoard scalars, through ``torch.utils.tensorboard.SummaryWriter``.

    Each numeric key except ``step`` becomes a scalar tag at global step
    ``row["step"]``, named by :func:`tensorboard_tag`: prefixed with ``prefix``
    (``persample/``, so the tags never collide with the training loop's own) and
    with its unit in the name (``persample/b_simple_examples``,
    ``persample/example_loss_mean``); per-layer keys
    (``persample/layer/<module>/b_simple_examples``) group by layer.
    Needs the ``tensorboard`` package: ``pip install -e ".[tensorboard]"`` in a persample checkout, or
    ``pip install tensorboard``.
    """

    def __init__(self, log_dir: str | os.PathLike, *, prefix: str = "persample/", **diagnostics_options: Any):
        super().__init__(**diagnostics_options)
        self.prefix = prefix
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "persample.loggers.TensorBoardLogger needs the 'tensorboard' package: "
                'pip install -e ".[tensorboard]" (in a persample checkout), or pip install tensorboard'
            ) from err
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self._count = 0

    def write(self, row: Mapping[str, Any]) -> None:
        step = _scalar(row.get("step", self._count))
        for key, value in row.items():
            value = _scalar(value)
            if key == "step" or isinstance(value, str) or value is None:
                continue
            self.writer.add_scalar(tensorboard_tag(key, self.prefix), float(value), global_step=int(step))
        self._count += 1

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def read_metrics(path: str | os.PathLike) -> list[Row]:
    """Read back a ``.csv`` or ``.jsonl`` file written by the loggers, as a list of dicts.

    Numbers come back as floats (``step`` as int); empty CSV cells and JSON
    ``null`` as NaN; other strings unchanged. A last row cut short (a run
    killed while writing it: too few CSV cells, or a line that is not JSON) is
    dropped with a warning; an incomplete row before the last raises ``ValueError``.
    """
    path = Path(path)
    rows: list[Row] = []
    incomplete: list[int] = []  # 1-based line numbers of rows cut short
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for r in reader:
                if None in r.values() or None in r:  # too few cells, or more cells than the header
                    incomplete.append(reader.line_num)
                    continue
                rows.append({k: _parse(v) for k, v in r.items()})
            last = reader.line_num
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            last = 0
            for last, line in enumerate(f, 1):
                if line.strip():
                    try:
                        parsed = json.loads(line)
                    except json.JSONDecodeError:
                        incomplete.append(last)
                        continue
                    rows.append({k: (math.nan if v is None else v) for k, v in parsed.items()})
    else:
        raise ValueError(f"read_metrics: expected a .csv or .jsonl file, got {str(path)!r}")
    if incomplete:
        if incomplete != [last]:
            raise ValueError(
                f"read_metrics: {str(path)!r} has incomplete rows before its last one (lines "
                f"{', '.join(map(str, incomplete[:5]))}): it is not a file the loggers wrote"
            )
        warnings.warn(
            f"read_metrics: the last row of {str(path)!r} (line {last}) is incomplete, as after a run "
            "killed while writing it; it was dropped",
            stacklevel=2,
        )
    for r in rows:
        if isinstance(r.get("step"), float) and math.isfinite(r["step"]):
            r["step"] = int(r["step"])
    return rows


def _parse(text: str) -> Any:
    if text == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return text
