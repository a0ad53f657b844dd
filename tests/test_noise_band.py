"""The diagnostics figure draws the EMA's interval as a band and the preconditioned noise scale as a line."""

import pytest

pytest.importorskip("matplotlib")

from persample import plot  # noqa: E402


def test_noise_panel_draws_the_interval_band_and_the_preconditioned_line():
    rows = []
    for step in range(12):
        ema = 20.0 + step
        rows.append(
            {
                "step": step,
                "n": 8.0,
                "loss": 1.0,
                "grad_norm": 1.0,
                "norm_p10": 0.5,
                "norm_p50": 1.0,
                "norm_p90": 2.0,
                "grad_sq": 1.0,
                "trace_cov": ema,
                "b_simple": ema,
                "b_simple_ema": ema,
                "b_simple_ema_lo": float("nan") if step < 3 else (ema - 30.0 if step == 5 else ema - 5),
                "b_simple_ema_hi": float("nan") if step < 3 else ema + 5,
                "b_precond_ema": ema / 2,
                "b_precond_ema_lo": float("nan") if step < 3 else ema / 2 - 4,
                "b_precond_ema_hi": float("nan") if step < 3 else ema / 2 + 4,
            }
        )
    fig = plot.plot_diagnostics(rows)
    ax = next(a for a in fig.axes if a.get_title(loc="left").startswith("Simple noise scale"))
    bands = [c for c in ax.collections if c.get_label() == "EMA, 90 % interval"]
    assert len(bands) == 1
    ys = bands[0].get_paths()[0].vertices[:, 1]
    assert ys.min() > 0  # a lower end ≤ 0 is drawn on the log axis, not dropped
    assert any(line.get_label().startswith("preconditioned") for line in ax.lines)
    precond = [c for c in ax.collections if c.get_label() == "B^P EMA, 90 % interval"]
    assert len(precond) == 1
    ys = precond[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(11.5 - 4) and ys.max() == pytest.approx(31.0 / 2 + 4)
    plot.close(fig)
