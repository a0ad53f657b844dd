"""Multi-process tests: 2 gloo ranks (equal batches) and 3 (unequal ones) on 127.0.0.1.

Each world size is one run of ``tests/_distributed_worker.py`` per rank, started as subprocesses;
every scenario the worker registers becomes one test here, which fails with that scenario's traceback
from each rank. Time is bounded per scenario (``SCENARIO_BUDGET_S`` without any rank finishing one), so
one slow scenario on a loaded machine fails only itself and what had not run yet, and gloo's rendezvous
is retried once on a fresh port.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_distributed_worker.py")
ROOT = WORKER.parent.parent
INIT_BUDGET_S = 60  # gloo's rendezvous, per try
INIT_TRIES = 2  # a rendezvous that fails or stalls (a port taken meanwhile, a loaded machine) is retried
SCENARIO_BUDGET_S = 120  # each scenario: the run is stopped only when no rank finishes one for this long


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _start(world: int, out_dir: Path) -> list:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    procs = []
    for rank in range(world):
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(out_dir)],
                    cwd=ROOT,
                    env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    return procs


def _supervise(procs: list, out_dir: Path, world: int) -> str:
    """'init' if the ranks did not all initialise within INIT_BUDGET_S, 'stalled' if no rank finished a
    scenario for SCENARIO_BUDGET_S, else 'done'."""
    paths = [out_dir / f"rank{rank}.json" for rank in range(world)]
    deadline = time.monotonic() + INIT_BUDGET_S
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline or all(proc.poll() is not None for proc, _ in procs):
            return "init"
        time.sleep(0.1)
    progress, deadline = None, time.monotonic() + SCENARIO_BUDGET_S
    while any(proc.poll() is None for proc, _ in procs):
        now = [len(_read(p) or {}) for p in paths]
        if now != progress:
            progress, deadline = now, time.monotonic() + SCENARIO_BUDGET_S
        if time.monotonic() > deadline:
            return "stalled"
        time.sleep(0.1)
    return "done"


def run_world(world: int, out_dir: Path) -> dict[str, list[str]]:
    """Run every scenario on ``world`` ranks; {scenario: [result of rank 0, rank 1, ...]}. A scenario that a
    rank did not finish has that rank's log tail (and why) in its place."""
    for attempt in range(INIT_TRIES):
        run_dir = out_dir / f"try{attempt}"
        run_dir.mkdir()
        procs = _start(world, run_dir)
        try:
            status = _supervise(procs, run_dir, world)
        finally:
            for proc, log in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
        if status != "init":
            break
    else:
        tail = (run_dir / "rank0.log").read_text()[-4000:]
        raise RuntimeError(
            f"gloo did not initialise {world} ranks in {INIT_TRIES} tries of {INIT_BUDGET_S} s; "
            f"rank 0's output ends with:\n{tail}"
        )
    results: dict[str, list[str]] = {name: [] for name, w in _scenarios() if w == world}
    for rank in range(world):
        done = _read(run_dir / f"rank{rank}.json") or {}
        why = (
            f"rank {rank} of {world} did not finish it: no rank finished a scenario for {SCENARIO_BUDGET_S} s"
            if status == "stalled"
            else f"rank {rank} of {world} crashed before finishing it"
        )
        tail = (run_dir / f"rank{rank}.log").read_text()[-4000:]
        for name in results:
            results[name].append(done.get(name, f"{why}; its output ends with:\n{tail}"))
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
        return [
            (name, world) for name, (_, ws) in module.SCENARIOS.items() for world in ws if module.SUITES[name] == "ddp"
        ]  # the "fsdp" suite runs in test_fsdp.py
    finally:
        sys.path.pop(0)


_scenarios = functools.cache(_scenarios)


needs_distributed = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="torch.distributed is not available"
)


@needs_distributed
@pytest.mark.parametrize("name,world", _scenarios(), ids=lambda v: str(v))
def test_scenario(worlds, name, world):
    outcomes = worlds(world)[name]
    failures = [f"rank {r}:\n{o}" for r, o in enumerate(outcomes) if o != "ok"]
    assert not failures, "\n".join(failures)


def test_supervise_tells_a_stalled_rendezvous_from_a_stalled_scenario(tmp_path, monkeypatch):
    """The driver's time budgets: no results file in time is 'init' (retried on a fresh port), a file that
    stops growing is 'stalled' (only the scenarios not finished fail), and finished ranks are 'done'."""
    monkeypatch.setattr(sys.modules[__name__], "INIT_BUDGET_S", 1.0)
    monkeypatch.setattr(sys.modules[__name__], "SCENARIO_BUDGET_S", 1.0)

    def ranks(code: str, n: int = 2):
        logs = [open(tmp_path / f"log{i}", "w") for i in range(n)]
        return [
            (
                subprocess.Popen(
                    [sys.executable, "-c", code.replace("RANK", str(i))], stdout=log, stderr=subprocess.STDOUT
                ),
                log,
            )
            for i, log in enumerate(logs)
        ]

    def run(code: str) -> str:
        procs = ranks(code)
        try:
            return _supervise(procs, tmp_path, 2)
        finally:
            for proc, log in procs:
                proc.kill()
                proc.wait()
                log.close()
            for path in tmp_path.glob("rank*.json"):
                path.unlink()

    write = f"open(r'{tmp_path}/rankRANK.json', 'w').write('{{}}'); "
    assert run("import time; time.sleep(30)") == "init"
    assert run(write + "import time; time.sleep(30)") == "stalled"
    assert run(write) == "done"
