"""Multi-process tests: 2 gloo ranks (equal batches) and 3 (unequal ones) on 127.0.0.1.

Each world size is one run of ``tests/_distributed_worker.py`` per rank, started as subprocesses;
every scenario the worker registers becomes one test here, which fails with that scenario's traceback
from each rank. Time is bounded per scenario (``SCENARIO_BUDGET_S`` without any rank finishing one), so
one slow scenario on a loaded machine fails only itself and what had not run yet, and gloo's rendezvous
is retried once on a fresh port.

The launcher here (``gloo_env``, ``spawn``, ``reap``, ``run_world``, ``worlds_fixture``, ``scenarios_of``)
is shared by test_fsdp.py (the worker's "fsdp" suite), test_fsdp_frameworks.py and
test_integrations_matrix_ddp.py. ``python tests/test_distributed.py WORLD [SCENARIO [SUITE]]`` runs one
world, for debugging.
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


def gloo_env(world: int, **extra: str) -> dict:
    """The environment of a run of ``world`` gloo ranks on 127.0.0.1 (a fresh port), without RANK."""
    return dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **extra,
    )


def spawn(world: int, argv: list, env: dict, *, cwd: Path = ROOT, logs: Path | None = None) -> list:
    """One process per rank (RANK and LOCAL_RANK set): [(process, log file or None)]. Output goes to
    ``logs/rank{r}.log`` when ``logs`` is given, else to a pipe (read by :func:`reap`)."""
    procs = []
    for rank in range(world):
        log = open(logs / f"rank{rank}.log", "w") if logs is not None else None
        procs.append(
            (
                subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                    stdout=log if log is not None else subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
                log,
            )
        )
    return procs


def reap(procs: list, timeout: float | None = None) -> list[str]:
    """Wait for every rank (``timeout`` seconds in all, when given), kill the ones left, close the logs;
    the piped output of each rank ('' where it went to a log)."""
    outputs = []
    try:
        for proc, _ in procs:
            outputs.append(proc.communicate(timeout=timeout)[0] or "")
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if log is not None:
                log.close()
    return outputs + [""] * (len(procs) - len(outputs))


def _start(world: int, out_dir: Path, worker: Path, suite: str, gloo_timeout: int, scenario: str | None) -> list:
    env = gloo_env(world, PERSAMPLE_SUITE=suite, PERSAMPLE_GLOO_TIMEOUT=str(gloo_timeout))
    if scenario:
        env["PERSAMPLE_SCENARIO"] = scenario
    return spawn(world, [sys.executable, str(worker), str(out_dir)], env, logs=out_dir)


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


def run_world(
    world: int,
    out_dir: Path,
    suite: str = "ddp",
    *,
    worker: Path | None = None,
    gloo_timeout: int = 60,
    scenario: str | None = None,
) -> dict[str, list[str]]:
    """Run every scenario of ``suite`` (or only ``scenario``) on ``world`` ranks; {scenario: [result of
    rank 0, rank 1, ...]}. A scenario that a rank did not finish has that rank's log tail (and why) in its
    place. ``gloo_timeout``: the ranks' collective timeout, so that a rank left waiting (a bug) fails its
    scenario, not the run."""
    worker = WORKER if worker is None else worker
    for attempt in range(INIT_TRIES):
        run_dir = out_dir / f"try{attempt}"
        run_dir.mkdir()
        procs = _start(world, run_dir, worker, suite, gloo_timeout, scenario)
        try:
            status = _supervise(procs, run_dir, world)
        finally:
            reap(procs, timeout=0)
        if status != "init":
            break
    else:
        tail = (run_dir / "rank0.log").read_text()[-4000:]
        raise RuntimeError(
            f"gloo did not initialise {world} ranks in {INIT_TRIES} tries of {INIT_BUDGET_S} s; "
            f"rank 0's output ends with:\n{tail}"
        )
    results: dict[str, list[str]] = {
        name: [] for name, w in scenarios_of(worker, suite) if w == world and scenario in (None, name)
    }
    for rank, (proc, _) in enumerate(procs):
        done = _read(run_dir / f"rank{rank}.json") or {}
        why = (
            f"rank {rank} of {world} did not finish it: no rank finished a scenario for {SCENARIO_BUDGET_S} s"
            if status == "stalled"
            else f"rank {rank} of {world} exited with {proc.returncode} before finishing it"
        )
        tail = (run_dir / f"rank{rank}.log").read_text()[-4000:]
        for name in results:
            results[name].append(done.get(name, f"{why}; its output ends with:\n{tail}"))
    return results


def worlds_fixture(suite: str = "ddp", *, worker: Path | None = None, gloo_timeout: int = 60):
    """A module-scoped fixture ``worlds(W)``: every scenario of ``suite`` run once on W ranks, cached;
    a run that could not start fails the test that asked for it."""

    @pytest.fixture(scope="module")
    def worlds(tmp_path_factory):
        cache: dict = {}

        def get(world: int):
            if world not in cache:
                try:
                    out = tmp_path_factory.mktemp(f"{suite}_world{world}")
                    cache[world] = run_world(world, out, suite, worker=worker, gloo_timeout=gloo_timeout)
                except RuntimeError as err:
                    cache[world] = err
            if isinstance(cache[world], Exception):
                pytest.fail(str(cache[world]))
            return cache[world]

        return get

    return worlds


worlds = worlds_fixture("ddp")


@functools.cache
def scenarios_of(worker: Path = WORKER, suite: str | None = "ddp") -> list[tuple[str, int]]:
    """[(scenario, world size)] that ``worker`` registers in ``suite`` (None: a worker without suites)."""
    import importlib.util

    sys.path.insert(0, str(worker.parent))
    try:
        spec = importlib.util.spec_from_file_location(worker.stem, worker)
        # Registering scenarios needs only the module body, which imports torch and persample.
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    suites = getattr(module, "SUITES", {})
    return [
        (name, world)
        for name, (_, ws) in module.SCENARIOS.items()
        for world in ws
        if suite is None or suites.get(name, "ddp") == suite
    ]


def failures_of(outcomes: list[str]) -> str:
    """The ranks' outcomes that are not "ok", for an assertion message ('' if every rank passed)."""
    return "\n".join(f"rank {r}:\n{o}" for r, o in enumerate(outcomes) if o != "ok")


needs_distributed = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="torch.distributed is not available"
)


@needs_distributed
@pytest.mark.parametrize("name,world", scenarios_of(WORKER, "ddp"), ids=lambda v: str(v))
def test_scenario(worlds, name, world):
    failures = failures_of(worlds(world)[name])
    assert not failures, failures


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


if __name__ == "__main__":  # python tests/test_distributed.py WORLD [SCENARIO [SUITE]]: one run, for debugging
    import tempfile

    res = run_world(
        int(sys.argv[1]),
        Path(tempfile.mkdtemp()),
        sys.argv[3] if len(sys.argv) > 3 else "ddp",
        scenario=sys.argv[2] if len(sys.argv) > 2 else None,
    )
    for name, outcomes in res.items():
        print(name, ["ok" if o == "ok" else o for o in outcomes])
