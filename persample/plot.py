"""Plots of gradient-noise diagnostics over training (needs matplotlib: ``pip install -e ".[plot]"``).

:func:`plot_diagnostics` draws the rows that :class:`persample.loggers.Diagnostics`
collects (or a ``metrics.csv`` / ``.jsonl`` written by the loggers) as one
figure of eight panels, each against the training step:

1. loss: per-batch training loss, and test loss / accuracy where the rows have them;
2. gradient norms: ‖ḡ‖ and the 10–50–90 % quantiles of the per-example norms ‖g_i‖;
3. the simple noise scale B_simple: per step (raw) and from the bias-corrected
   EMAs of tr Σ and |G|², against the batch size;
4. mean GSNR;
5. the norm, inner-product and orthogonality tests against their thresholds;
6. the batch size each test suggests, against the batch size used;
7. per-layer noise scale (EMA of each layer's tr Σ over EMA of its |G|²);
8. per-layer mean GSNR.

Ratios that span decades are on log axes; non-positive values (a negative |G|²
estimate makes B_simple negative) cannot be drawn there and are counted in the
panel's legend instead.

The figure is a plain :class:`matplotlib.figure.Figure` (no pyplot, no GUI
backend), so this works on headless machines and from threads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .noise import DEFAULT_EMA_BETA

__all__ = ["plot_diagnostics", "require_matplotlib", "close"]

_HINT = 'pip install -e ".[plot]" (in a persample checkout), or: pip install matplotlib'

# Colour-blind-safe palette (Okabe & Ito).
_BLUE, _ORANGE, _GREEN, _RED, _PURPLE, _SKY, _YELLOW, _GREY = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#555555",
)
_CYCLE = [_BLUE, _ORANGE, _GREEN, _RED, _PURPLE, _SKY, "#000000", _YELLOW]


def require_matplotlib():
    """Import matplotlib, or raise an ImportError that names the extra to install."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as err:
        raise ImportError(f"persample.plot needs matplotlib: {_HINT}") from err
    import matplotlib

    return matplotlib


def close(fig) -> None:
    """Release a figure made by :func:`plot_diagnostics` (it is not registered with pyplot)."""
    fig.clear()


def _rows(source: Any) -> Sequence[Mapping[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        from .loggers import read_metrics

        return read_metrics(source)
    if hasattr(source, "rows"):
        return list(source.rows)
    return list(source)


def _series(rows: Sequence[Mapping[str, Any]], key: str, *, positive: bool = False):
    """(steps, values, n_dropped) of the rows that have a finite ``key`` (and > 0 with ``positive``)."""
    xs: list[float]
    ys: list[float]
    xs, ys, dropped = [], [], 0
    for r in rows:
        v = r.get(key)
        if v is None or isinstance(v, str):
            continue
        v = float(v)
        if math.isnan(v):
            continue
        if not math.isfinite(v) or (positive and v <= 0):
            dropped += 1
            continue
        xs.append(float(r.get("step", len(xs))))
        ys.append(v)
    return xs, ys, dropped


def _band(rows: Sequence[Mapping[str, Any]], key: str):
    """(steps, lower, upper) of ``key``'s interval columns ``key_lo`` / ``key_hi`` where both are finite and
    the value is positive; a lower end ≤ 0 (the interval reaches "no signal") is drawn at value/100, the
    bottom of a log axis' useful range."""
    xs: list[float]
    lo: list[float]
    hi: list[float]
    xs, lo, hi = [], [], []
    v: Any
    a: Any
    b: Any
    for r in rows:
        v, a, b = (r.get(k) for k in (key, f"{key}_lo", f"{key}_hi"))
        if not all(_is_number(x) and math.isfinite(float(x)) for x in (v, a, b)) or float(v) <= 0:
            continue
        xs.append(float(r.get("step", len(xs))))
        lo.append(max(float(a), float(v) / 100))
        hi.append(max(float(b), float(v)))
    return xs, lo, hi


def _ema_ratio(rows: Sequence[Mapping[str, Any]], num_key: str, den_key: str, beta: float):
    """Steps and bias-corrected EMA(num) / EMA(den), as persample.noise.NoiseScaleEMA computes it."""
    xs, ys = [], []
    s_num = s_den = 0.0
    t = 0
    for r in rows:
        num, den = r.get(num_key), r.get(den_key)
        if num is None or den is None:
            continue
        num, den = float(num), float(den)
        if not (math.isfinite(num) and math.isfinite(den)):
            continue
        t += 1
        s_num = beta * s_num + (1 - beta) * num
        s_den = beta * s_den + (1 - beta) * den
        # The bias corrections 1/(1 − β^t) of numerator and denominator cancel in the ratio.
        if s_den > 0:
            xs.append(float(r.get("step", t)))
            ys.append(s_num / s_den)
    return xs, ys


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _layers(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k.startswith("layer/") and k.endswith("/grad_sq"):
                seen.setdefault(k[len("layer/") : -len("/grad_sq")], None)
    return list(seen)


def _batch_size(rows: Sequence[Mapping[str, Any]]) -> float | None:
    ns = [float(r["n"]) for r in rows if isinstance(r.get("n"), (int, float)) and math.isfinite(r["n"])]
    if not ns:
        return None
    return max(set(ns), key=ns.count)


def _style(ax, title: str, ylabel: str, *, log: bool = False) -> None:
    ax.set_title(title, fontsize=11, fontweight="bold", loc="left")
    ax.set_ylabel(ylabel, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=9)
    ax.grid(True, which="major", alpha=0.3)
    if log:
        ax.set_yscale("log")
        ax.grid(True, which="minor", alpha=0.08)


def _legend(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, framealpha=0.85, **kw)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color=_GREY, wrap=True)


def _dropped_label(label: str, dropped: int) -> str:
    return f"{label} ({dropped} values ≤ 0 not shown)" if dropped else label


def plot_diagnostics(
    source: Any,
    path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
    ema_beta: float = DEFAULT_EMA_BETA,
    batch_size: float | None = None,
    dpi: int = 110,
    figsize: tuple[float, float] = (13.0, 14.0),
    max_layers: int = 8,
):
    """Draw the diagnostics of a training run as one multi-panel figure.

    Args:
        source: a list of rows (dicts, as :class:`persample.loggers.Diagnostics`
            collects them), a ``Diagnostics`` object, or the path of a ``.csv``
            / ``.jsonl`` file written by the loggers.
        path: where to save the figure (PNG, PDF, SVG… by extension); not saved
            when None.
        title: the figure's title.
        ema_beta: decay of the EMAs behind the per-layer noise scale panel (the
            global EMA is the logged ``b_simple_ema`` column).
        batch_size: the batch size drawn for reference; by default the most
            common ``n`` of the rows.
        dpi, figsize: passed to matplotlib.
        max_layers: draw at most this many layers (the first ones) per panel.

    Returns:
        the :class:`matplotlib.figure.Figure`.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: there are no rows with statistics to draw.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    rows = _rows(source)
    stat_rows = [r for r in rows if _is_number(r.get("grad_sq"))]
    if not stat_rows:
        raise ValueError(
            "plot_diagnostics: no rows with gradient statistics to draw "
            "(expected rows from persample.loggers.Diagnostics or its CSV/JSONL files)"
        )
    batch = batch_size if batch_size is not None else _batch_size(stat_rows)

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    axes = fig.subplots(4, 2, sharex=True)
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")

    # Epoch boundaries, drawn faintly behind every panel.
    epoch_steps = []
    last_epoch = None
    for r in stat_rows:
        e = r.get("epoch")
        if isinstance(e, (int, float)) and not math.isnan(float(e)):
            if last_epoch is not None and e != last_epoch:
                epoch_steps.append(float(r["step"]))
            last_epoch = e
    for ax in axes.flat:
        for i, s in enumerate(epoch_steps):  # labelled once, in the loss panel's legend
            ax.axvline(
                s,
                color=_GREY,
                lw=0.6,
                alpha=0.25,
                zorder=0,
                label="epoch boundary" if i == 0 and ax is axes.flat[0] else None,
            )

    # 1. loss
    ax = axes[0, 0]
    _style(ax, "Loss", "cross-entropy", log=True)
    xs, ys, _ = _series(stat_rows, "loss", positive=True)
    ax.plot(xs, ys, color=_BLUE, lw=1.0, alpha=0.75, label="train (batch)")
    xs, ys, _ = _series(rows, "test_loss", positive=True)
    if xs:
        ax.plot(xs, ys, "o-", color=_RED, ms=4, lw=1.5, label="test")
    xs, ys, _ = _series(rows, "test_acc")
    if xs:
        acc_ax = ax.twinx()
        acc_ax.plot(xs, ys, "s--", color=_GREEN, ms=4, lw=1.2, label="test accuracy")
        acc_ax.set_ylabel("accuracy", fontsize=10, color=_GREEN)
        acc_ax.tick_params(labelsize=9, colors=_GREEN)
        acc_ax.set_ylim(0, 1.02)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = acc_ax.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, framealpha=0.85, loc="lower left")
    else:
        _legend(ax, loc="lower left")

    # 2. gradient norms
    ax = axes[0, 1]
    _style(ax, "Gradient norms", "L2 norm", log=True)
    x10, y10, _ = _series(stat_rows, "norm_p10", positive=True)
    x90, y90, _ = _series(stat_rows, "norm_p90", positive=True)
    if x10 and len(x10) == len(x90):
        ax.fill_between(x10, y10, y90, color=_SKY, alpha=0.35, lw=0, label="per-example ‖g_i‖, 10–90 %")
    xs, ys, _ = _series(stat_rows, "norm_p50", positive=True)
    ax.plot(xs, ys, color=_SKY, lw=1.2, label="per-example ‖g_i‖, median")
    xs, ys, _ = _series(stat_rows, "grad_norm", positive=True)
    ax.plot(xs, ys, color=_BLUE, lw=1.4, label="batch mean ‖ḡ‖")
    _legend(ax, loc="lower left")

    # 3. B_simple
    ax = axes[1, 0]
    _style(ax, "Simple noise scale  B_simple = tr Σ / |G|²", "examples", log=True)
    xs, ys, dropped = _series(stat_rows, "b_simple", positive=True)
    ax.plot(
        xs,
        ys,
        ".",
        color=_ORANGE,
        ms=3,
        alpha=0.6,
        label=f"per step ({dropped} below noise: |G|² estimate ≤ 0, not shown)" if dropped else "per step",
    )
    xs, ys, _ = _series(stat_rows, "b_simple_ema", positive=True)
    ax.plot(xs, ys, color=_RED, lw=2.0, label="EMA(tr Σ) / EMA(|G|²): the number to read")
    band = _band(stat_rows, "b_simple_ema")
    if band[0]:
        ax.fill_between(*band, color=_RED, alpha=0.15, lw=0, label="EMA, 90 % interval")
    px, py, _ = _series(stat_rows, "b_precond_ema", positive=True)
    if px:
        ax.plot(px, py, color=_PURPLE, lw=1.6, ls="-.", label="preconditioned (Adam) B^P, EMA")
        band = _band(stat_rows, "b_precond_ema")
        if band[0]:
            ax.fill_between(*band, color=_PURPLE, alpha=0.12, lw=0, label="B^P EMA, 90 % interval")
    if batch:
        ax.axhline(batch, color="black", ls="--", lw=1.0, label=f"batch size B = {batch:g}")
    _legend(ax, loc="upper left")

    # 4. mean GSNR
    ax = axes[1, 1]
    _style(ax, "Mean gradient signal-to-noise ratio (GSNR)", "ḡ_j² / Var(g_ij), mean over j", log=True)
    xs, ys, _ = _series(stat_rows, "gsnr_mean", positive=True)
    if xs:
        ax.plot(xs, ys, color=_PURPLE, lw=1.0, alpha=0.5, label="per step")
        sx, sy = _smooth(xs, ys, ema_beta)
        ax.plot(sx, sy, color=_PURPLE, lw=2.0, label=f"EMA (β = {ema_beta:g})")
        _legend(ax, loc="upper right")
    else:
        _empty(ax, "no GSNR: statistics computed with var=False")

    # 5. batch-size tests
    ax = axes[2, 0]
    _style(ax, "Batch-size tests (a test passes below its dashed threshold)", "θ, ν", log=True)
    tests = [
        ("norm_test", "norm θ (Byrd et al. 2012)", _BLUE),
        ("inner_test", "inner-product θ (Bollapragada et al. 2018)", _ORANGE),
        ("ortho_test", "orthogonality ν (Bollapragada et al. 2018)", _GREEN),
    ]
    any_test = False
    thresholds: dict[float, list[tuple[str, str]]] = {}
    for key, label, color in tests:
        xs, ys, dropped = _series(stat_rows, key, positive=True)
        if not xs:
            continue
        any_test = True
        ax.plot(xs, ys, color=color, lw=1.1, alpha=0.9, label=_dropped_label(label, dropped))
        thr = _series(stat_rows, f"{key}_threshold", positive=True)[1]
        if thr:
            thresholds.setdefault(thr[-1], []).append((label.split(" (")[0].rsplit(" ", 1)[0], color))
    for value, entries in thresholds.items():
        # Tests sharing a threshold share one line, dashed in alternating colours.
        k = len(entries)
        for i, (_, color) in enumerate(entries):
            ax.axhline(value, color=color, lw=1.4, ls=(4 * i, (4, 4 * (k - 1) if k > 1 else 3)))
        ax.annotate(
            f"threshold {value:g}: " + " & ".join(name for name, _ in entries),
            xy=(0.99, value),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=8,
            color=entries[0][1],
            bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85),
        )
    if any_test:
        _legend(ax, loc="upper left")
    else:
        _empty(ax, "no batch-size tests in these rows")

    # 6. suggested batch sizes
    ax = axes[2, 1]
    _style(ax, "Batch size each test asks for", "examples", log=True)
    drew = False
    for key, label, color in tests:
        xs, ys, dropped = _series(stat_rows, f"{key}_batch", positive=True)
        if xs:
            drew = True
            ax.plot(xs, ys, color=color, lw=1.1, alpha=0.9, label=label.split(" (")[0])
    if batch:
        ax.axhline(batch, color="black", ls="--", lw=1.0, label=f"batch size used, B = {batch:g}")
    if drew:
        _legend(ax, loc="upper left")
    else:
        _empty(ax, "no batch-size tests in these rows")

    # 7. per-layer noise scale
    layers = _layers(stat_rows)[:max_layers]
    ax = axes[3, 0]
    _style(ax, "Per-layer noise scale (EMA of tr Σ / EMA of |G|²)", "examples", log=True)
    for i, layer in enumerate(layers):
        xs, ys = _ema_ratio(stat_rows, f"layer/{layer}/trace_cov", f"layer/{layer}/grad_sq", ema_beta)
        ax.plot(xs, ys, color=_CYCLE[i % len(_CYCLE)], lw=1.4, label=layer)
    if batch and layers:
        ax.axhline(batch, color="black", ls="--", lw=1.0, label=f"B = {batch:g}")
    if layers:
        _legend(ax, loc="upper left", ncol=2)
    else:
        _empty(ax, "no per-layer columns (per_layer=False)")

    # 8. per-layer GSNR
    ax = axes[3, 1]
    _style(ax, "Per-layer mean GSNR (EMA)", "ḡ_j² / Var(g_ij)", log=True)
    drew = False
    for i, layer in enumerate(layers):
        xs, ys, _ = _series(stat_rows, f"layer/{layer}/gsnr", positive=True)
        if xs:
            drew = True
            sx, sy = _smooth(xs, ys, ema_beta)
            ax.plot(sx, sy, color=_CYCLE[i % len(_CYCLE)], lw=1.4, label=layer)
    if drew:
        _legend(ax, loc="upper right", ncol=2)
    else:
        _empty(ax, "no per-layer GSNR")

    for ax in axes[:-1].flat:
        ax.set_xlabel("")
    for ax in axes[-1]:
        ax.set_xlabel("training step", fontsize=10)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def _smooth(xs: Sequence[float], ys: Sequence[float], beta: float):
    """Bias-corrected EMA of a series (for display)."""
    out, s = [], 0.0
    for t, y in enumerate(ys, 1):
        s = beta * s + (1 - beta) * y
        out.append(s / (1 - beta**t))
    return list(xs), out
