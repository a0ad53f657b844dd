"""Multi-process FSDP tests: gloo ranks on 127.0.0.1, bounded in time.

The scenarios live in ``tests/_distributed_worker.py`` (suite ``"fsdp"``). Each world size is
one run of the worker per rank, as subprocesses, with gloo's timeout at GLOO_TIMEOUT_S (a rank
left waiting in a collective fails that scenario, not the run) and the whole run at TIMEOUT_S; the
worker writes its results after every scenario, so a run cut short still reports which scenarios
did not finish. Gloo's init is retried once on a fresh port when a rank never joined the group.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_distributed_worker.py")
ROOT = WORKER.parent.parent
TIMEOUT_S = 150
GLOO_TIMEOUT_S = 30  # a collective left waiting (a bug) fails the scenario after this, not the run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out_dir: Path, suite: str, scenario: str | None) -> None:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PERSAMPLE_SUITE=suite,
        PERSAMPLE_GLOO_TIMEOUT=str(GLOO_TIMEOUT_S),
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    if scenario:
        env["PERSAMPLE_SCENARIO"] = scenario
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
    (out_dir / "exit_codes.json").write_text(json.dumps([proc.returncode for proc, _ in procs]))


def run_world(world: int, out_dir: Path, suite: str = "fsdp", scenario: str | None = None) -> dict[str, list[str]]:
    """Run the suite's scenarios on ``world`` ranks; {scenario: [outcome on rank 0, rank 1, ...]}."""
    for _attempt in range(2):
        for old in out_dir.glob("rank*"):
            old.unlink()
        _launch(world, out_dir, suite, scenario)
        joined = all((out_dir / f"rank{r}.json").exists() for r in range(world))
        if joined:
            break  # every rank joined the group (the worker writes its file right after init)
    codes = json.loads((out_dir / "exit_codes.json").read_text())
    expected = [name for name, w in _scenarios(suite) if w == world and (scenario is None or name == scenario)]
    results: dict[str, list[str]] = {name: [] for name in expected}
    for rank in range(world):
        path = out_dir / f"rank{rank}.json"
        tail = (out_dir / f"rank{rank}.log").read_text()[-3000:]
        if not path.exists():
            raise RuntimeError(
                f"rank {rank} of {world} never joined the gloo group (twice); its output ends with:\n{tail}"
            )
        done = json.loads(path.read_text())
        for name in expected:
            outcome = done.get(name, f"rank {rank} did not finish it (hung past {TIMEOUT_S} s or crashed)")
            if outcome != "ok" and codes[rank] != 0:
                outcome += f"\n(rank {rank} exited with {codes[rank]}; its output ends with:\n{tail})"
            results[name].append(outcome)
    return results


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    cache = {}

    def get(world: int):
        if world not in cache:
            try:
                cache[world] = run_world(world, tmp_path_factory.mktemp(f"fsdp_world{world}"))
            except RuntimeError as err:
                cache[world] = err
        if isinstance(cache[world], Exception):
            pytest.fail(str(cache[world]))
        return cache[world]

    return get


@functools.cache
def _scenarios(suite: str = "fsdp"):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [(name, world) for name, (_, ws) in module.SCENARIOS.items() if module.SUITES[name] == suite for world in ws]


needs_distributed = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="torch.distributed is not available"
)


@needs_distributed
@pytest.mark.parametrize("name,world", _scenarios(), ids=lambda v: str(v))
def test_scenario(worlds, name, world):
    outcomes = worlds(world)[name]
    failures = [f"rank {r}:\n{o}" for r, o in enumerate(outcomes) if o != "ok"]
    assert not failures, "\n".join(failures)


if __name__ == "__main__":  # python tests/test_fsdp.py WORLD [SCENARIO [SUITE]]: one run, for debugging
    import tempfile

    out = Path(tempfile.mkdtemp())
    res = run_world(
        int(sys.argv[1]), out, sys.argv[3] if len(sys.argv) > 3 else "fsdp", sys.argv[2] if len(sys.argv) > 2 else None
    )
    for name, outcomes in res.items():
        print(name, ["ok" if o == "ok" else o for o in outcomes])


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
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            cwd=ROOT,
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=90)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 1, f"rank {rank} exited with {proc.returncode}:\n{out[-3000:]}"
        assert "UnsupportedModelError" in out and "FSDP1" in out and "terminate called" not in out, out[-3000:]
