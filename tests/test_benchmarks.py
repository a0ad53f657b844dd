"""Smoke tests of the benchmark suite (benchmarks/run.py): records, checks and failure handling.

No timing is asserted: these machines are shared and noisy.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RUN_PY = ROOT / "benchmarks" / "run.py"
FIELDS = (
    "case",
    "method",
    "device",
    "batch_size",
    "median_s",
    "ratio",
    "peak_mem_bytes",
    "max_rel_err",
    "status",
    "torch_version",
    "threads",
    "device_name",
    "repeats",
    "reason",
)


def load_bench():
    """benchmarks/run.py as a module (opacus ships a top-level ``benchmarks`` package, so no package import)."""
    module = sys.modules.get("persample_bench_run")
    if module is None:
        spec = importlib.util.spec_from_file_location("persample_bench_run", RUN_PY)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return module, sys.modules["cases"], sys.modules["methods"]


@pytest.fixture(autouse=True)
def keep_thread_count():
    """``run`` sets torch's thread count for the process; put it back for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_problem(cases):
    def build(batch_size):
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        return cases.Problem(
            model, torch.randn(batch_size, 6), torch.randint(0, 3, (batch_size,)), cases.classification_loss
        )

    return cases.Case("tiny", 4, "Linear-ReLU-Linear", build)


def test_quick_cli_writes_checked_records(tmp_path):
    out, md = tmp_path / "out.json", tmp_path / "out.md"
    cmd = [
        sys.executable,
        str(RUN_PY),
        "--quick",
        "--case",
        "mlp",
        "--method",
        "persample",
        "--method",
        "floor-hooks",
        "--method",
        "backpack-batchl2",
        "--method",
        "opacus-hooks",
        "--repeats",
        "1",
        "--budget",
        "1",
        "--no-progress",
        "--json",
        str(out),
        "--markdown",
        str(md),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(out.read_text())
    assert {r["case"] for r in records} == {"mlp"}
    methods = {r["method"]: r for r in records}
    assert {
        "plain",
        "persample-grads",
        "persample-stats-vmap",
        "persample-stats-vmap-novar",
        "persample-observe",
        "persample-observe-novar",
        "backpack-batchl2",
        "opacus-hooks",
    } <= methods.keys()
    for r in records:
        assert set(FIELDS) <= r.keys()
        assert r["device"] == "cpu" and r["threads"] == 2 and r["batch_size"] == 32
        assert r["torch_version"] == torch.__version__
    assert methods["plain"]["ratio"] == 1.0
    for name, r in methods.items():
        if name.startswith(("persample", "floor-hooks")) or name == "plain":
            assert r["status"] == "ok", r
            assert r["max_rel_err"] < 1e-4 and r["median_s"] > 0 and r["repeats"] == 1
            assert r["calls_per_sample"] >= 1
    assert {r["allocator"] for r in records} != {None}
    for peer in ("backpack-batchl2", "opacus-hooks"):  # correct where installed, recorded where not
        assert methods[peer]["status"] in ("ok", "unavailable"), methods[peer]
    text = md.read_text()
    assert "| mlp B=32 |" in text and "## Headline" in text


def test_unbuildable_case_is_recorded():
    bench, cases, methods = load_bench()

    def build(batch_size):
        raise ImportError("No module named 'transformers'")

    settings = bench.Settings(torch.device("cpu"), repeats=1, budget_s=1.0)
    chosen = [methods.Method("plain", methods.plain), methods.Method("loop", methods.loop)]
    records, _ = bench.run([cases.Case("needs-hf", 2, "", build)], chosen, settings, threads=1, show_progress=False)
    assert [r["status"] for r in records] == ["unavailable", "unavailable"]
    assert "transformers" in records[0]["reason"]


def test_failures_are_recorded_and_never_stop_the_run():
    bench, cases, methods = load_bench()
    M = methods.Method

    def raises(problem):
        raise RuntimeError("boom\nsecond line")

    def unsupported(problem):
        raise methods.Unsupported("no rule for Foo")

    def doubled(problem):
        prepared = methods.plain(problem)
        return methods.Prepared(prepared.step, lambda raw: {"mean": {k: 2 * v for k, v in raw.items()}})

    chosen = [
        M("plain", methods.plain),
        M("raises", raises),
        M("wrong-scale", doubled),
        M("needs-missing-peer", methods.plain, requires=("no_such_module_for_persample_tests",)),
        M("unsupported", unsupported),
    ]
    settings = bench.Settings(torch.device("cpu"), repeats=1, budget_s=1.0)
    records, meta = bench.run([tiny_problem(cases)], chosen, settings, threads=1, show_progress=False)
    got = {r["method"]: r for r in records}
    assert got["plain"]["status"] == "ok" and got["plain"]["ratio"] == 1.0
    assert got["raises"]["status"] == "failed" and got["raises"]["reason"] == "RuntimeError: boom"
    assert got["raises"]["median_s"] is None and got["raises"]["ratio"] is None
    assert got["wrong-scale"]["status"] == "wrong" and got["wrong-scale"]["max_rel_err"] == pytest.approx(1.0)
    assert got["needs-missing-peer"]["status"] == "unavailable"
    assert got["unsupported"]["status"] == "unsupported"
    table = bench.headline_table(records)
    assert "failed" in table and "wrong" in table and "n/a" in table and "–" in table
    json.dumps(records, allow_nan=False)


def test_persample_methods_follow_the_engines():
    _, _, methods = load_bench()
    from persample.api import ENGINES

    names = [m.name for m in methods.all_methods()]
    for engine in ENGINES:
        if engine != "auto":
            assert f"persample-stats-{engine}" in names and f"persample-stats-{engine}-novar" in names
    assert names[0] == "plain" and "persample-grads" in names
    assert "persample-observe" in names and "persample-observe-novar" in names


PEER_SKIP = (
    "the benchmark peers are the [bench] extra (plus backpack-for-pytorch), not in [test]: CI does not "
    "install them, so this test runs only where they are installed"
)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("peer", ["opacus", "backpack"])
def test_peer_scaling_conventions(peer):
    """Each peer's outputs, converted (BackPACK's 1/B, Opacus's loss_reduction), match persample on a tiny
    model; each peer skips only when it is not installed."""
    if importlib.util.find_spec(peer) is None:
        pytest.skip(f"{peer} is not installed; {PEER_SKIP}")
    bench, cases, methods = load_bench()
    peers = methods.select_methods(methods.all_methods(), [peer])
    settings = bench.Settings(torch.device("cpu"), repeats=1, budget_s=1.0)
    records, _ = bench.run([tiny_problem(cases)], peers, settings, threads=1, show_progress=False)
    assert [m.name for m in peers][0] == "plain" and len(peers) > 1  # the selection keeps plain, the denominator
    assert [r["method"] for r in records] == [m.name for m in peers]  # plain, then each of the peer's methods
    for r in records:
        assert r["status"] == "ok" and r["max_rel_err"] < 1e-5, r


def test_help_lists_every_option():
    import subprocess
    import sys
    from pathlib import Path

    run = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    out = subprocess.run([sys.executable, str(run), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("--quick", "--device", "--json", "--markdown", "--retries"):
        assert option in out.stdout


def test_median_of_runs_takes_each_ratio_within_its_own_run():
    load_bench()  # puts benchmarks/ on sys.path, as median.py expects
    spec = importlib.util.spec_from_file_location("persample_bench_median", RUN_PY.parent / "median.py")
    median = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(median)

    def record(method, seconds, ratio, status="ok"):
        return {
            "case": "mlp",
            "batch_size": 32,
            "method": method,
            "median_s": seconds,
            "ratio": ratio,
            "status": status,
            "foreign_cpu": 0.0,
        }

    runs = [
        [record("plain", 1.0, 1.0), record("fast", 1.2, 1.2), record("peer", 2.0, 2.0)],
        [record("plain", 2.0, 1.0), record("fast", 2.2, 1.1), record("peer", 3.0, 1.5, "wrong")],
        [record("plain", 3.0, 1.0), record("fast", 3.9, 1.3), record("peer", 6.0, 2.0)],
    ]
    merged = {r["method"]: r for r in median.median_records(runs)}
    assert merged["fast"]["ratio"] == 1.2 and merged["plain"]["median_s"] == 2.0
    assert merged["peer"]["status"] == "wrong"  # wrong in any run is wrong
    assert merged["fast"]["runs_ratios"] == [1.2, 1.1, 1.3]


def test_ratios_are_paired_with_a_neighbouring_plain_sample():
    """Each sample of a method is timed right after one of plain, and the ratio is the median of their
    quotients: on a machine whose speed halves during the timing (a fake clock), every quotient is still
    the true 3. run() records the paired ratio (1.0 for plain itself), and --unpaired the ratio of medians."""
    bench, cases, methods = load_bench()
    clock = {"t": 0.0, "calls": 0}

    def slow_later(cost):  # a step costing `cost`, twice as much from the 6th sample on
        def step():
            clock["calls"] += 1
            clock["t"] += cost * (2.0 if clock["calls"] > 12 else 1.0)

        return step

    def fake(cost):
        def prepare(problem):
            return methods.Prepared(slow_later(cost), lambda raw: {"mean": {}})

        return prepare

    assert bench.paired_ratio([3.0, 6.0, 6.0], [1.0, 2.0, 2.0]) == 3.0
    times, base, _, _ = bench.timed_repeats(
        slow_later(3.0), 9, lambda: None, retries=0, wait_s=0.0, baseline=bench.Baseline(slow_later(1.0), calls=1)
    )
    assert len(times) == len(base) == 9
    original = bench.time.perf_counter
    bench.time.perf_counter = lambda: clock["t"]
    try:
        clock.update(t=0.0, calls=0)
        times, base, _, _ = bench.timed_repeats(
            slow_later(3.0), 9, lambda: None, retries=0, wait_s=0.0, baseline=bench.Baseline(slow_later(1.0), calls=1)
        )
    finally:
        bench.time.perf_counter = original
    assert bench.paired_ratio(times, base) == pytest.approx(3.0)
    settings = bench.Settings(torch.device("cpu"), repeats=3, budget_s=1.0)
    chosen = [methods.Method("plain", methods.plain), methods.Method("plain-again", methods.plain)]
    records, meta = bench.run([tiny_problem(cases)], chosen, settings, threads=1, show_progress=False)
    got = {r["method"]: r for r in records}
    assert meta["paired"] and got["plain"]["ratio"] == 1.0 and got["plain"]["paired_ratio"] is None
    assert got["plain-again"]["ratio"] == got["plain-again"]["paired_ratio"] > 0
    assert got["plain-again"]["ratio_of_medians"] > 0
    unpaired = bench.Settings(torch.device("cpu"), repeats=3, budget_s=1.0, paired=False)
    records, meta = bench.run([tiny_problem(cases)], chosen, unpaired, threads=1, show_progress=False)
    assert not meta["paired"] and all(r["ratio"] == r["ratio_of_medians"] for r in records)
