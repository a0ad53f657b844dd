"""The DDP cells of the integrations matrix: ``Tracker.observe`` around the backward of
``DistributedDataParallel(find_unused_parameters=True)`` (what the HF Trainer sets under DDP) or
``static_graph=True`` gives the statistics ``Tracker.step`` gives (2 gloo ranks, bounded in time; the
scenarios live in ``tests/_distributed_observe_worker.py``, run with test_distributed.py's harness)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import test_distributed as harness

WORKER = Path(__file__).with_name("_distributed_observe_worker.py")


def _scenarios():
    spec = importlib.util.spec_from_file_location("_distributed_observe_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [(name, world) for name, (_, ws) in module.SCENARIOS.items() for world in ws]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setattr(harness, "WORKER", WORKER)
    patch.setattr(harness, "_scenarios", _scenarios)
    try:
        return harness.run_world(2, tmp_path_factory.mktemp("observe_ddp"))
    finally:
        patch.undo()


@harness.needs_distributed
@pytest.mark.slow
@pytest.mark.parametrize("name,world", _scenarios(), ids=lambda v: str(v))
def test_observe_under_ddp(outcomes, name, world):
    failures = [f"rank {r}:\n{o}" for r, o in enumerate(outcomes[name]) if o != "ok"]
    assert not failures, "\n".join(failures)
