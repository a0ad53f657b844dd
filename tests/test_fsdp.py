"""Multi-process FSDP tests: gloo ranks on 127.0.0.1, bounded in time.

The scenarios live in ``tests/_distributed_worker.py`` (suite ``"fsdp"``), run by test_distributed.py's
launcher: each world size is one run of the worker per rank, as subprocesses, with gloo's timeout at
GLOO_TIMEOUT_S (a rank left waiting in a collective fails that scenario, not the run) and each scenario
bounded by ``test_distributed.SCENARIO_BUDGET_S``; the worker writes its results after every scenario,
so a run cut short still reports which scenarios did not finish. Gloo's init is retried once on a fresh
port. ``python tests/test_distributed.py WORLD SCENARIO fsdp`` runs one scenario, for debugging.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_distributed import failures_of, gloo_env, needs_distributed, reap, scenarios_of, spawn, worlds_fixture

WORKER = Path(__file__).with_name("_distributed_worker.py")
GLOO_TIMEOUT_S = 30  # a collective left waiting (a bug) fails the scenario after this, not the run

worlds = worlds_fixture("fsdp", gloo_timeout=GLOO_TIMEOUT_S)


@needs_distributed
@pytest.mark.parametrize("name,world", scenarios_of(WORKER, "fsdp"), ids=lambda v: str(v))
def test_scenario(worlds, name, world):
    failures = failures_of(worlds(world)[name])
    assert not failures, failures


UNCAUGHT = """
import sys, torch, torch.distributed as dist
from datetime import timedelta
from torch import nn
import torch.nn.functional as F
import persample
from torch.distributed.fsdp import FullyShardedDataParallel
dist.init_process_group("gloo", timeout=timedelta(seconds=30))
model = FullyShardedDataParallel(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double(),
                                 device_id=torch.device("cpu"))
tracker = persample.Tracker(model, F.cross_entropy)  # refused: the exception ends the script, uncaught
"""


@needs_distributed
def test_fsdp1_refusal_uncaught_ends_every_rank_with_the_error_not_sigabrt(tmp_path):
    """A user's script that does not catch the refusal: every rank exits with status 1 and the error
    (no rank killed by SIGABRT, none left waiting)."""
    script = tmp_path / "user.py"
    script.write_text(UNCAUGHT)
    procs = spawn(2, [sys.executable, str(script)], gloo_env(2))
    outputs = reap(procs, timeout=90)
    for rank, ((proc, _), out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 1, f"rank {rank} exited with {proc.returncode}:\n{out[-3000:]}"
        assert "UnsupportedModelError" in out and "FSDP1" in out and "terminate called" not in out, out[-3000:]
