"""Resumable state: loggers append, and a run interrupted and resumed in a new process logs what an
uninterrupted run logs, to the last digit (plain loop here; the HF Trainer and Lightning in
test_resume_integrations.py)."""

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from persample import Tracker, noise
from persample.loggers import CSVLogger, JSONLLogger, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(logger, steps):
    with logger as log:
        for s in steps:
            log.write({"step": s, "b_simple": s / 3, "loss": 1.0 + s})


@pytest.mark.parametrize("cls,suffix", [(CSVLogger, "csv"), (JSONLLogger, "jsonl")])
def test_loggers_append_and_replace_rows_past_the_checkpoint(tmp_path, cls, suffix):
    path = tmp_path / f"m.{suffix}"
    _rows(cls(path), range(6))  # the first run logged steps 0..5, then stopped
    with pytest.warns(UserWarning, match="2 row.*step 4") as record:
        _rows(cls(path), range(4, 8))  # resumed from the checkpoint at step 4
    assert len(record) == 1
    assert [r["step"] for r in read_metrics(path)] == list(range(8))  # nothing lost, nothing twice
    backup = tmp_path / f"m.replaced-1.{suffix}"
    assert [r["step"] for r in read_metrics(backup)] == [4, 5]
    uninterrupted = tmp_path / f"u.{suffix}"
    _rows(cls(uninterrupted), range(8))
    assert path.read_bytes() == uninterrupted.read_bytes()


@pytest.mark.parametrize("cls,suffix", [(CSVLogger, "csv"), (JSONLLogger, "jsonl")])
def test_loggers_append_without_warning_when_nothing_is_replaced(tmp_path, cls, suffix):
    path = tmp_path / f"m.{suffix}"
    _rows(cls(path), range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _rows(cls(path), range(3, 5))
    assert [r["step"] for r in read_metrics(path)] == list(range(5))


def test_csv_logger_drops_a_truncated_last_line_when_it_appends(tmp_path):
    path = tmp_path / "m.csv"
    _rows(CSVLogger(path), range(3))
    with open(path, "a") as f:
        f.write("3,1.0")  # killed mid-write
    with pytest.warns(UserWarning, match="incomplete last line"):
        _rows(CSVLogger(path), range(3, 5))
    assert [r["step"] for r in read_metrics(path)] == list(range(5))


def test_state_dicts_round_trip_through_json():
    ema = noise.NoiseScaleEMA(0.9)
    for k in range(3):
        ema.update(noise.NoiseScale(8, 1.0 + k, 10.0 * k + 1, 0.0, 0.0, 0.0))
    again = noise.NoiseScaleEMA(0.9)
    again.load_state_dict(json.loads(json.dumps(ema.state_dict())))
    assert (again.steps, again.value, again.trace_cov, again.grad_sq) == (
        ema.steps,
        ema.value,
        ema.trace_cov,
        ema.grad_sq,
    )
    with pytest.raises(ValueError, match="beta=0.9"):
        noise.NoiseScaleEMA(0.5).load_state_dict(ema.state_dict())
    tracker = Tracker(torch.nn.Linear(2, 1), torch.nn.functional.mse_loss, every=2)
    tracker.load_state_dict({"steps": 5, "skipped": [2]})
    assert tracker.state_dict() == {"steps": 5, "skipped": [2]} and not tracker.wants_stats()
    tracker.step(torch.randn(4, 2), torch.randn(4, 1))
    assert tracker.steps == 6 and tracker.wants_stats()


SCRIPT = textwrap.dedent("""
    import sys, torch
    import persample
    from persample.loggers import CSVLogger, Diagnostics, JSONLLogger

    def run(out, steps, resume=None, save_at=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        tracker = persample.Tracker(model, torch.nn.functional.mse_loss, every=2)
        diag = Diagnostics(CSVLogger(out + ".csv"), JSONLLogger(out + ".jsonl"), ema_beta=0.7)
        tracker.register_hook(diag)
        start = 0
        if resume is not None:
            ckpt = torch.load(resume, weights_only=True)
            model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"])
            tracker.load_state_dict(ckpt["tracker"]); diag.load_state_dict(ckpt["diag"])
            start = tracker.steps
        for step in range(start, steps):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(6, 4, generator=g); y = x.sum(1, keepdim=True) + torch.randn(6, 1, generator=g)
            opt.zero_grad()
            tracker.step(x, y)
            opt.step()
            if save_at is not None and tracker.steps == save_at:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "tracker": tracker.state_dict(), "diag": diag.state_dict()}, out + ".pt")
        diag.close()

    if __name__ == "__main__":
        run(sys.argv[1], int(sys.argv[2]), resume=sys.argv[3])
""")


def test_plain_loop_resumed_in_a_new_process_logs_the_same_rows(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT)
    namespace = {"__name__": "loop"}
    exec(compile(SCRIPT, str(script), "exec"), namespace)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    namespace["run"](full, 9)
    # Interrupted: checkpoint after step 3 (every=2: statistics on 0, 2, 4, … of the whole run), rows logged
    # past the checkpoint until the run died at step 6.
    namespace["run"](part, 6, save_at=3)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-W", "ignore", str(script), part, "9", part + ".pt"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for suffix in (".csv", ".jsonl"):
        assert open(part + suffix).read() == open(full + suffix).read()
    rows = read_metrics(full + ".csv")
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8]
    assert all(math.isfinite(r["b_simple_ema"]) for r in rows)
