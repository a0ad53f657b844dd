"""Output that explains itself, and week-one edge cases: a corrupt example, a truncated metrics file, a
plot that would overwrite, missing demo extras, slow-path warnings that point at the user's line."""

import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.loggers import CSVLogger, read_metrics


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("engine", ["auto", "vmap", "loop"])
def test_a_nan_example_is_reported_once_with_its_index_and_the_skipped_count(engine):
    model = _mlp()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    x[3, 1] = math.nan
    tracker = persample.Tracker(model, F.cross_entropy, engine=engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tracker.step(x, y) is None  # this line is what the warning names
        line = sys._getframe().f_lineno - 1
        assert tracker.step(x, y) is None
    messages = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, [str(w.message) for w in messages]
    text = str(messages[0].message)
    assert "example 3 (0-based) of this batch of 6" in text and "1 step skipped so far" in text
    assert messages[0].filename == __file__ and messages[0].lineno == line
    assert tracker.skipped == [0, 1]


def test_the_tenth_skipped_step_is_warned_again():
    tracker = persample.Tracker(_mlp(), F.cross_entropy)
    x, y = torch.full((4, 4), math.nan), torch.randint(0, 3, (4,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            tracker.step(x, y)
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(texts) == 2 and "10 steps skipped so far" in texts[1]


# --------------------------------------------------------------------------- metrics files


def _write_rows(path, n=3):
    with CSVLogger(path) as log:
        for i in range(n):
            log.write(
                {
                    "step": i,
                    "n": 8,
                    "loss": 1.0 / (i + 1),
                    "grad_sq": 1.0,
                    "trace_cov": 10.0,
                    "b_simple": 10.0,
                    "b_simple_ema": 10.0,
                }
            )


def test_read_metrics_drops_a_truncated_last_row_with_a_warning(tmp_path):
    path = tmp_path / "m.csv"
    _write_rows(path)
    text = path.read_text()
    path.write_text(text[: text.rstrip("\n").rfind(",")])  # killed while writing the last row
    with pytest.warns(UserWarning, match="last row .* is incomplete"):
        rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    with pytest.warns(UserWarning, match="incomplete"):
        assert read_metrics(jsonl) == [{"step": 0, "loss": 1.0}]
    middle = tmp_path / "bad.csv"
    middle.write_text("step,loss\n0\n1,2.0\n")
    with pytest.raises(ValueError, match="incomplete rows before its last one"):
        read_metrics(middle)


@pytest.mark.slow
def test_plot_command_reads_a_truncated_file_and_never_overwrites_without_force(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from persample.cli import main

    path = tmp_path / "m.csv"
    _write_rows(path, 4)
    with open(path, "a") as f:
        f.write("4,8,0.2")
    first, second = tmp_path / "diagnostics.png", tmp_path / "diagnostics-1.png"
    with pytest.warns(UserWarning, match="incomplete"):
        assert main(["plot", str(path)]) == 0
    assert first.exists() and not second.exists()
    before = first.read_bytes()
    first.write_bytes(b"mine")
    with pytest.warns(UserWarning):
        assert main(["plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert first.read_bytes() == b"mine" and second.read_bytes()[:4] == before[:4]
    assert f"plot: {second}  ({first} exists; --force overwrites it)" in out
    assert "B_simple ≈ 10 examples against a batch of 8" in out
    with pytest.warns(UserWarning):
        assert main(["plot", str(path), "--force"]) == 0
    assert first.read_bytes()[:4] == before[:4] and not (tmp_path / "diagnostics-2.png").exists()


# --------------------------------------------------------------------------------- the demo


def test_demo_without_extras_names_the_one_extra_once(tmp_path, monkeypatch, capsys):
    from persample.cli import main

    for name in ("matplotlib", "matplotlib.pyplot", "sklearn", "sklearn.datasets"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "matplotlib and scikit-learn" in err and 'pip install -e ".[demo]"' in err


@pytest.mark.slow
def test_demo_output_in_a_file_has_no_progress_bar_and_its_summary_explains_itself(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from persample.cli import main

    assert (
        main(["demo", "--out", str(tmp_path), "--epochs", "1", "--train-examples", "96", "--batch-size", "32"]) == 0
    )  # progress on, but stderr is not a terminal
    captured = capsys.readouterr()
    assert "epoch 1/1" not in captured.err and "\r" not in captured.err
    assert f"epochs:  {tmp_path / 'epochs.csv'}" in captured.out
    assert "against a batch of 32" in captured.out


def test_noise_scale_in_words_and_below_noise_in_the_table():
    from persample.demo import EpochSummary, describe_b_simple, format_table

    assert describe_b_simple(120, 64) == (
        "B_simple ≈ 120 examples against a batch of 64: a larger batch would still cut the number of steps."
    )
    assert "about the noise scale" in describe_b_simple(60, 64)
    assert "mostly add compute" in describe_b_simple(8, 64)
    assert "below noise" in describe_b_simple(-30.0, 64) and "below noise" in describe_b_simple(math.nan, 64)
    line = format_table(EpochSummary(1, 0.5, 0.9, 0.8, -12.0, 0.1, 40.0, 1.0))
    assert "below noise" in line and "-12" not in line


# ------------------------------------------------------------------------------ warnings


def test_slow_path_warning_points_at_the_users_line_and_is_short():
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import real_models as rm

    case = next(c for c in rm.all_cases() if c.id == "hf-debertav2-own-loss")  # fast and vmap refuse it
    model, inputs, targets = case.instantiate()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        persample.grad_stats(model, case.loss_fn, inputs, targets)
        lines = [sys._getframe().f_lineno - 1]
        persample.per_sample_grads(model, case.loss_fn, inputs, targets)
        lines.append(sys._getframe().f_lineno - 1)
        persample.Tracker(model, case.loss_fn).step(inputs, targets)
        lines.append(sys._getframe().f_lineno - 1)
    slow = [w for w in caught if issubclass(w.category, persample.SlowPathWarning)]
    assert [(w.filename, w.lineno) for w in slow] == [(__file__, n) for n in lines]
    for w in slow:
        text = str(w.message)
        assert len(text) < 500 and text.count(". ") <= 2, text
        assert "It looks like you're" not in text and "per-example loop" in text
        assert any("It looks like you're" in r for r in w.message.reasons)  # the full text is kept


def test_the_grey_epoch_lines_are_labelled():
    pytest.importorskip("matplotlib")
    from persample import plot

    rows = [
        {
            "step": i,
            "epoch": 1 + i // 3,
            "n": 4.0,
            "loss": 1.0,
            "grad_sq": 1.0,
            "trace_cov": 2.0,
            "b_simple": 2.0,
            "b_simple_ema": 2.0,
        }
        for i in range(6)
    ]
    fig = plot.plot_diagnostics(rows)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plot.close(fig)
    assert "epoch boundary" in labels
