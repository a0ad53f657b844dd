"""benchmarks/critical_batch.py: the S–E frontier fit and the batch-size schedule (the study itself is a
benchmark, run by hand: python benchmarks/critical_batch.py --quick)."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import critical_batch  # noqa: E402


def test_frontier_fit_recovers_b_crit():
    s_min, e_min = 40.0, 4000.0  # B_crit = 100
    points = [(b, round(s_min + e_min / b)) for b in (8, 32, 128, 512, 1024)]
    fit = critical_batch.fit_frontier(points)
    assert fit["b_crit"] == pytest.approx(100.0, rel=0.02)
    assert (fit["s_min"] / s_min - 1) * (fit["e_min"] / e_min - 1) < 1e-3
    assert math.isnan(critical_batch.fit_frontier(points[:2])["b_crit"])


def test_schedule_follows_the_ema_in_micro_batches():
    schedule = critical_batch.NoiseBatchSchedule(micro=8, k_max=16)
    assert [schedule.k(v) for v in (math.nan, -5.0, 3.0, 40.0, 1e6)] == [1, 1, 1, 5, 16]
