"""Loggers: Diagnostics rows, CSV / JSONL / TensorBoard sinks, and their optional dependencies."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from persample import Tracker, noise
from persample.loggers import CSVLogger, Diagnostics, JSONLLogger, TensorBoardLogger, read_metrics

from zoo import CASE_IDS, CASES


def _tracked_run(*hooks, steps=4, every=1, inner_products=True, var=True):
    case = CASES[CASE_IDS.index("mlp")]
    model, _, _ = case.instantiate()
    tracker = Tracker(model, case.loss_fn, every=every, inner_products=inner_products, var=var)
    for hook in hooks:
        tracker.register_hook(hook)
    seen = []
    tracker.register_hook(lambda t, s: seen.append((t.steps, s)))
    for _ in range(steps):
        tracker.step(*case.make_batch(5))
    return seen


def test_diagnostics_rows_follow_the_tracker():
    diag = Diagnostics(ema_beta=0.5, extra=lambda t, s: {"lr": 0.1})
    seen = _tracked_run(diag, steps=5, every=2)
    assert [r["step"] for r in diag.rows] == [step for step, _ in seen] == [0, 2, 4]
    ema = noise.NoiseScaleEMA(0.5)
    for row, (_, stats) in zip(diag.rows, seen):
        expected = noise.diagnostics(stats)
        for key, value in expected.items():
            assert row[key] == value or (math.isnan(row[key]) and math.isnan(value)), key
        assert row["b_simple_ema"] == pytest.approx(ema.update(stats), rel=1e-12)
        assert row["lr"] == 0.1


def test_missing_options_asked_for_warn_once_and_give_nan():
    diag = Diagnostics(tests=("norm", "inner_product"), optimizer=torch.optim.Adam([torch.zeros(1)]))
    with pytest.warns(UserWarning, match="inner_products=True") as record:
        _tracked_run(diag, steps=3, inner_products=False, var=False)
    assert len([w for w in record if "persample diagnostics" in str(w.message)]) == 1
    assert "var=True" in str(record[0].message)
    assert all(
        math.isnan(r["inner_test"]) and math.isnan(r["gsnr_mean"]) and math.isnan(r["b_precond"]) for r in diag.rows
    )
    assert all(math.isfinite(r["norm_test"]) for r in diag.rows)
    assert all("ortho_test" not in r for r in diag.rows)  # not asked: not computed


def test_diagnostics_warns_about_nothing_it_was_not_asked_for():
    import warnings

    for diag in (Diagnostics(), Diagnostics(tests=("norm",))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _tracked_run(diag, steps=2, inner_products=False, var=False)
        assert all(math.isfinite(r["norm_test"]) for r in diag.rows)
    assert set(diag.rows[0]).isdisjoint({"inner_test", "ortho_test", "inner_test_batch", "ortho_test_batch"})


def test_csv_logger_round_trip(tmp_path):
    path = tmp_path / "sub" / "metrics.csv"
    with CSVLogger(path) as log:
        diag = Diagnostics(log)
        _tracked_run(diag, steps=3)
    rows = read_metrics(path)
    assert len(rows) == 3
    for got, want in zip(rows, diag.rows):
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == v or (math.isnan(got[k]) and math.isnan(v)), k  # repr keeps every digit
    assert isinstance(rows[0]["step"], int)
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header[:3] == ["step", "n", "loss"] and "layer/0/b_simple" in header


def test_csv_logger_widens_its_header(tmp_path):
    path = tmp_path / "m.csv"
    log = CSVLogger(path)
    log.write({"step": 0, "a": 1.5})
    log.write({"step": 1, "a": math.nan, "b": math.inf})
    log.write({"step": 2, "b": -2.0, "note": "x"})
    log.close()
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["step", "a", "b", "note"], ["0", "1.5", "", ""], ["1", "nan", "inf", ""], ["2", "", "-2.0", "x"]]
    back = read_metrics(path)
    assert back[1]["b"] == math.inf and math.isnan(back[0]["b"]) and back[2]["note"] == "x"
    with pytest.raises(ValueError, match="closed"):
        log.write({"step": 3})


def test_jsonl_logger_writes_valid_json_with_null_for_non_finite(tmp_path):
    path = tmp_path / "m.jsonl"
    with JSONLLogger(path) as log:
        log.write({"step": 0, "x": math.nan, "y": math.inf, "z": torch.tensor(2.5), "ok": True})
        _tracked_run(log, steps=2)
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first == {"step": 0, "x": None, "y": None, "z": 2.5, "ok": 1}
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    rows = read_metrics(path)
    assert math.isnan(rows[0]["x"]) and rows[1]["step"] == 0 and "b_simple_ema" in rows[1]


def test_a_logger_is_itself_a_tracker_hook(tmp_path):
    path = tmp_path / "m.csv"
    log = CSVLogger(path, ema_beta=0.9, per_layer=False)
    _tracked_run(log, steps=3, every=1)
    log.close()
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert not any(k.startswith("layer/") for k in rows[0])


def test_logger_paths_must_be_files(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        CSVLogger(tmp_path)
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        read_metrics(tmp_path / "m.txt")
    with pytest.raises(TypeError, match="write"):
        Diagnostics(object())


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    log = TensorBoardLogger(tmp_path / "tb")
    diag = Diagnostics(log)
    _tracked_run(diag, steps=2)
    diag.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {
        "persample/b_simple_examples",
        "persample/b_simple_ema_examples",
        "persample/norm_test",
        "persample/layer/0/b_simple_examples",
        "persample/example_loss_mean",
    } <= set(tags)
    assert all(t.startswith("persample/") for t in tags) and "persample/loss" not in tags
    values = acc.Scalars("persample/b_simple_examples")
    assert [v.step for v in values] == [0, 1]
    assert values[1].value == pytest.approx(diag.rows[1]["b_simple"], rel=1e-6)


def test_tensorboard_missing_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[tensorboard\]"'):
        TensorBoardLogger(tmp_path / "tb")


def test_noise_and_csv_loggers_import_with_only_torch_and_numpy():
    code = (
        "import sys\n"
        "for m in ('matplotlib', 'tensorboard', 'tqdm', 'sklearn', 'pandas', 'scipy'):\n"
        "    sys.modules[m] = None\n"
        "import persample, persample.noise, persample.loggers\n"
        "assert 'persample.plot' not in sys.modules\n"
        "import tempfile, os\n"
        "d = tempfile.mkdtemp()\n"
        "log = persample.loggers.CSVLogger(os.path.join(d, 'm.csv')); log.write({'step': 0}); log.close()\n"
        "try:\n"
        "    import persample.plot as p; p.plot_diagnostics([])\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'IMPORT-ERROR: persample.plot needs matplotlib: pip install -e ".[plot]"' in out.stdout
