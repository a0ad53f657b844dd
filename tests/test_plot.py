"""persample.plot: the diagnostics figure, from rows or from a metrics file."""

import sys

import pytest

pytest.importorskip("matplotlib")

from persample import Tracker  # noqa: E402
from persample import plot  # noqa: E402
from persample.loggers import CSVLogger, Diagnostics, JSONLLogger  # noqa: E402

from zoo import CASE_IDS, CASES  # noqa: E402

PANEL_TITLES = [
    "Loss",
    "Gradient norms",
    "Simple noise scale",
    "Mean gradient signal-to-noise",
    "Batch-size tests",
    "Batch size each test asks for",
    "Per-layer noise scale",
    "Per-layer mean GSNR",
]


@pytest.fixture(scope="module")
def run_rows(tmp_path_factory):
    """Rows of a short tracked run, also written to CSV and JSONL, with an epoch row."""
    case = CASES[CASE_IDS.index("cnn_groupnorm_pool")]
    model, _, _ = case.instantiate()
    d = tmp_path_factory.mktemp("plot")
    diag = Diagnostics(CSVLogger(d / "m.csv"), JSONLLogger(d / "m.jsonl"), ema_beta=0.5)
    tracker = Tracker(model, case.loss_fn, inner_products=True)
    tracker.register_hook(diag)
    for _ in range(6):
        tracker.step(*case.make_batch(6))
    diag.log({"step": 6, "epoch": 1, "test_loss": 1.0, "test_acc": 0.5})
    diag.close()
    return diag.rows, d


def _titles(fig):
    return [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]


def test_figure_has_every_panel_and_saves(run_rows, tmp_path):
    rows, _ = run_rows
    fig = plot.plot_diagnostics(rows, tmp_path / "out" / "d.png", title="run")
    titles = _titles(fig)
    assert len(titles) == 8
    for want, got in zip(PANEL_TITLES, titles):
        assert got.startswith(want), (want, got)
    assert fig.get_suptitle() == "run"
    png = (tmp_path / "out" / "d.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # Log axes where ratios span decades; thresholds drawn as labelled lines.
    by_title = {ax.get_title(loc="left"): ax for ax in fig.axes if ax.get_title(loc="left")}
    tests_ax = next(ax for t, ax in by_title.items() if t.startswith("Batch-size tests"))
    assert tests_ax.get_yscale() == "log"
    assert any("threshold 0.9: norm & inner-product" in t.get_text() for t in tests_ax.texts)
    assert any("threshold 5.84: orthogonality" in t.get_text() for t in tests_ax.texts)
    noise_ax = next(ax for t, ax in by_title.items() if t.startswith("Simple noise scale"))
    assert noise_ax.get_yscale() == "log"
    assert any("batch size B = 6" in line.get_label() for line in noise_ax.lines)
    layer_ax = next(ax for t, ax in by_title.items() if t.startswith("Per-layer noise scale"))
    assert {"0", "1", "4", "7"} <= {line.get_label() for line in layer_ax.lines}
    plot.close(fig)


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_plot_from_a_metrics_file(run_rows, tmp_path, suffix):
    _, d = run_rows
    fig = plot.plot_diagnostics(d / f"m.{suffix}", tmp_path / "d.png")
    assert len(_titles(fig)) == 8 and (tmp_path / "d.png").exists()


def test_non_positive_values_are_counted_not_drawn():
    rows = [
        {"step": i, "n": 4.0, "loss": 1.0, "grad_sq": g, "trace_cov": 1.0, "b_simple": 1.0 / g, "b_simple_ema": 5.0}
        for i, g in enumerate([0.5, -0.5, 0.25, -1.0])
    ]
    fig = plot.plot_diagnostics(rows)
    noise_ax = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("Simple noise scale"))
    assert any("(2 below noise: |G|² estimate ≤ 0, not shown)" in line.get_label() for line in noise_ax.lines)
    # Panels without data say why instead of staying blank.
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("no batch-size tests" in t for t in texts) and any("var=False" in t for t in texts)


def test_no_statistics_is_an_error():
    with pytest.raises(ValueError, match="no rows with gradient statistics"):
        plot.plot_diagnostics([{"step": 0, "test_acc": 0.5}])


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[plot\]"'):
        plot.plot_diagnostics([{"step": 0, "grad_sq": 1.0}])


def test_layers_are_capped(run_rows):
    rows, _ = run_rows
    fig = plot.plot_diagnostics(rows, max_layers=2)
    layer_ax = next(ax for ax in fig.axes if ax.get_title(loc="left").startswith("Per-layer noise scale"))
    assert [line.get_label() for line in layer_ax.lines if not line.get_label().startswith("B =")] == ["0", "1"]
