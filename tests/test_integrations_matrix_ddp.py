"""The DDP cells of the integrations matrix: ``Tracker.observe`` around the backward of
``DistributedDataParallel(find_unused_parameters=True)`` (what the HF Trainer sets under DDP) or
``static_graph=True`` gives the statistics ``Tracker.step`` gives (2 gloo ranks, bounded in time; the
scenarios live in ``tests/_distributed_observe_worker.py``, run with test_distributed.py's harness)."""

from __future__ import annotations

from pathlib import Path

import pytest

import test_distributed as harness

WORKER = Path(__file__).with_name("_distributed_observe_worker.py")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return harness.run_world(2, tmp_path_factory.mktemp("observe_ddp"), worker=WORKER)


@harness.needs_distributed
@pytest.mark.slow
@pytest.mark.parametrize("name,world", harness.scenarios_of(WORKER), ids=lambda v: str(v))
def test_observe_under_ddp(outcomes, name, world):
    failures = harness.failures_of(outcomes[name])
    assert not failures, failures
