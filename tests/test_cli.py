"""``persample demo`` end to end, in a subprocess, and its one-line errors for bad arguments."""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from persample.loggers import read_metrics

# Only the tests that train or draw need the demo extra; argument checks, --help and the errors run without it.
_missing = [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]
needs_demo = pytest.mark.skipif(bool(_missing), reason=f"needs the demo extra ({', '.join(_missing)} missing)")
needs_matplotlib = pytest.mark.skipif("matplotlib" in _missing, reason="needs matplotlib")

TINY = ["--epochs", "1", "--train-examples", "96", "--batch-size", "32", "--no-progress"]


def _persample(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, "-m", "persample", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=env,
    )


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@needs_demo
@pytest.mark.slow
def test_demo_end_to_end_csv(tmp_path):
    out_dir = tmp_path / "demo out"
    code, out, err = _finish(_persample("demo", "--out", str(out_dir), *TINY))
    assert code == 0, err
    metrics, png = out_dir / "metrics.csv", out_dir / "diagnostics.png"
    assert f"metrics: {metrics}" in out and f"plot:    {png}" in out and f"epochs:  {out_dir / 'epochs.csv'}" in out
    assert "check_mean OK" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("epoch"))
    assert lines[header].split()[:3] == ["epoch", "train", "loss"]
    assert lines[header + 1].split()[0] == "1" and len(lines[header + 1]) == len(lines[header])  # aligned
    rows = read_metrics(metrics)
    assert len(rows) == 3 and all(r["b_simple"] == r["b_simple"] for r in rows)  # 96 / 32, one kind of row
    assert {"b_simple_ema", "gsnr_mean", "norm_test_batch", "inner_test", "ortho_test"} <= rows[0].keys()
    assert all(r["epoch"] == 1 for r in rows)
    epochs = read_metrics(out_dir / "epochs.csv")
    assert len(epochs) == 1 and 0 <= epochs[0]["test_acc"] <= 1 and 0 <= epochs[0]["train_acc"] <= 1
    with open(metrics, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_demo
@pytest.mark.slow
def test_demo_with_adam_logs_and_summarises_the_preconditioned_noise_scale(tmp_path):
    code, out, err = _finish(_persample("demo", "--out", str(tmp_path), "--optimizer", "adam", *TINY))
    assert code == 0, err
    assert "Adam lr 0.002" in out and "Adam-aware B^P" in out
    rows = read_metrics(tmp_path / "metrics.csv")
    assert {"b_precond", "b_precond_ema", "grad_sq_precond", "trace_cov_precond"} <= rows[-1].keys()
    assert rows[0]["b_precond"] != rows[0]["b_precond"]  # NaN: Adam has no second moments before its first step
    assert all(r["trace_cov_precond"] > 0 for r in rows[1:])


def test_demo_quiet_jsonl_mlp_every_2(tmp_path):
    code, out, err = _finish(
        _persample(
            "demo", "--out", str(tmp_path), "--quiet", "--format", "jsonl", "--model", "mlp", "--every", "2", *TINY
        )
    )
    assert code == 0, err
    assert out.splitlines() == [
        f"metrics: {tmp_path / 'metrics.jsonl'}  (one row per statistics step)",
        f"epochs:  {tmp_path / 'epochs.jsonl'}  (one row per epoch: train/test loss and accuracy)",
        f"plot:    {tmp_path / 'diagnostics.png'}",
    ]
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 2]
    assert "layer/fc3/b_simple" in rows[0] and rows[-1]["epoch"] == 1
    assert (tmp_path / "diagnostics.png").stat().st_size > 10_000


def _check_one_line_error(code, out, err, expected):
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("persample demo: error: "), err
    assert expected in lines[0], err
    assert "Traceback" not in err


def test_bad_arguments_in_a_subprocess_give_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cases = {
        "unknown device": (["--device", "tpu", "--out", str(tmp_path / "o")], "unknown device 'tpu'"),
        "unwritable out": (["--out", str(blocker / "sub")], "is not a writable directory"),
    }
    if not torch.cuda.is_available():
        cases["cuda absent"] = (
            ["--device", "cuda", "--out", str(tmp_path / "o")],
            "CUDA was requested but is not available",
        )
    procs = {name: _persample("demo", *args) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        _check_one_line_error(*_finish(proc, timeout=120), cases[name][1])
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--device", "cuda:x"], "unknown device 'cuda:x'"),
        (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["--epochs", "two"], "expected a positive integer, got 'two'"),
        (["--batch-size", "1"], "must be at least 2"),
        (["--lr", "-1"], "expected a positive number"),
        (["--lr", "nan"], "expected a positive number"),
        (["--every", "0"], "expected a positive integer"),
        (["--threads", "-1"], "expected a non-negative integer"),
        (["--ema-beta", "1"], "expected a number in [0, 1)"),
        (["--model", "resnet"], "invalid choice: 'resnet'"),
        (["--format", "xml"], "invalid choice: 'xml'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_arguments_in_process(args, expected, tmp_path, capsys):
    from persample.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path / "o"), *args])
    captured = capsys.readouterr()
    _check_one_line_error(exc.value.code, captured.out, captured.err, expected)


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    from persample.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(blocker)])
    captured = capsys.readouterr()
    _check_one_line_error(exc.value.code, captured.out, captured.err, "it exists and is not a directory")


def test_help_explains_every_option(capsys):
    from persample.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for option in (
        "--out",
        "--epochs",
        "--device",
        "--model",
        "--batch-size",
        "--lr",
        "--every",
        "--seed",
        "--no-progress",
        "--quiet",
        "--ema-beta",
        "--train-examples",
        "--format",
        "--tensorboard",
        "--threads",
    ):
        assert option in out
    assert "8x8" in out and "check_mean" in out
    assert main([]) == 2 and "demo" in capsys.readouterr().err


def test_console_script_runs():
    script = shutil.which("persample", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the 'persample' console script is not installed next to this Python")
    out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("persample "), out.stderr


@needs_matplotlib
def test_plot_subcommand_redraws_from_metrics(tmp_path, capsys):
    from persample.cli import main
    from persample.loggers import CSVLogger

    rows = [
        {
            "step": i,
            "n": 8,
            "loss": 1.0 / (i + 1),
            "grad_sq": 1.0,
            "trace_cov": 10.0 + i,
            "b_simple": 10.0 + i,
            "b_simple_ema": 10.0 + i,
        }
        for i in range(5)
    ]
    with CSVLogger(tmp_path / "m.csv") as log:
        for r in rows:
            log.write(r)
    assert main(["plot", str(tmp_path / "m.csv"), "-o", str(tmp_path / "p.png")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"plot: {tmp_path / 'p.png'}" and (tmp_path / "p.png").exists()
    assert printed[1].startswith("B_simple ≈ 14 examples against a batch of 8: a larger batch would still cut")
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(tmp_path / "missing.csv")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "is not a file" in err


@needs_demo
def test_a_failed_check_mean_exits_1_and_tensorboard_is_written(tmp_path, monkeypatch, capsys):
    """In process, with check_mean forced to fail: exit status 1 and the report on stderr."""
    pytest.importorskip("tensorboard")
    import persample.demo
    from persample import MeanMismatchError
    from persample.cli import main

    def failing_check(*args, **kwargs):
        raise MeanMismatchError("mean of per-example gradients differs from autograd's gradient (forced)")

    monkeypatch.setattr(persample.demo, "check_mean", failing_check)
    code = main(["demo", "--out", str(tmp_path), "--tensorboard", "--quiet", *TINY])
    captured = capsys.readouterr()
    assert code == 1
    assert "check_mean FAILED" in captured.err and "(forced)" in captured.err
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "metrics.csv").exists()


@needs_matplotlib  # without matplotlib the demo names the plot extra first
def test_missing_demo_extra_names_it(tmp_path, monkeypatch, capsys):
    from persample.cli import main

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["demo", "--out", str(tmp_path), *TINY]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and 'pip install -e ".[demo]"' in err and "scikit-learn" in err


@needs_demo
def test_a_diverging_run_fails_with_a_message_not_a_traceback(tmp_path, capsys):
    from persample.cli import main

    assert main(["demo", "--out", str(tmp_path), "--lr", "1e6", "--quiet", *TINY]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "non-finite values in stats." in err and "Try a smaller --lr" in err


@needs_demo
@pytest.mark.slow
def test_a_batch_size_larger_than_the_data_set_is_reported_as_used(tmp_path):
    code, out, err = _finish(
        _persample(
            "demo",
            "--out",
            str(tmp_path),
            "--epochs",
            "1",
            "--train-examples",
            "40",
            "--batch-size",
            "1000",
            "--no-progress",
        )
    )
    assert code == 0, err
    assert "batch 40 (asked for 1000, more than the 40 training examples)" in out
