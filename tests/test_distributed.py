"""Multi-process tests: 2 gloo ranks (equal batches) and 3 (unequal ones) on 127.0.0.1.

Each world size is one run of ``tests/_distributed_worker.py`` per rank, started as subprocesses
and bounded in time; every scenario the worker registers becomes one test here, which fails
with that scenario's traceback from each rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_distributed_worker.py")
ROOT = WORKER.parent.parent
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, out_dir: Path) -> dict[str, list[str]]:
    """Run every scenario on ``world`` ranks; {scenario: [result of rank 0, rank 1, ...]}."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = []
    for rank in range(world):
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(out_dir)], cwd=ROOT,
                                       env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                       stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    results: dict[str, list[str]] = {}
    for rank in range(world):
        path = out_dir / f"rank{rank}.json"
        if not path.exists():
            tail = (out_dir / f"rank{rank}.log").read_text()[-4000:]
            raise RuntimeError(f"rank {rank} of {world} wrote no results (crashed or ran past "
                               f"{TIMEOUT_S} s); its output ends with:\n{tail}")
        for name, outcome in json.loads(path.read_text()).items():
            results.setdefault(name, []).append(outcome)
    return results


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    cache = {}

    def get(world: int):
        if world not in cache:
            try:
                cache[world] = run_world(world, tmp_path_factory.mktemp(f"world{world}"))
            except RuntimeError as err:
                cache[world] = err
        if isinstance(cache[world], Exception):
            pytest.fail(str(cache[world]))
        return cache[world]
    return get


def _scenarios():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import importlib.util
        spec = importlib.util.spec_from_file_location("_distributed_worker", WORKER)
        # Registering scenarios needs only the module body, which imports torch and persample.
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return [(name, world) for name, (_, ws) in module.SCENARIOS.items() for world in ws
                if module.SUITES[name] == "ddp"]  # the "fsdp" suite runs in test_fsdp.py
    finally:
        sys.path.pop(0)


needs_distributed = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="torch.distributed is not available")


@needs_distributed
@pytest.mark.parametrize("name,world", _scenarios(), ids=lambda v: str(v))
def test_scenario(worlds, name, world):
    outcomes = worlds(world)[name]
    failures = [f"rank {r}:\n{o}" for r, o in enumerate(outcomes) if o != "ok"]
    assert not failures, "\n".join(failures)
