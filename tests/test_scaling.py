"""Smoke tests of benchmarks/scaling.py and of the opt-in large case (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_scaling():
    module = sys.modules.get("persample_bench_scaling")
    if module is None:
        spec = importlib.util.spec_from_file_location("persample_bench_scaling", ROOT / "benchmarks" / "scaling.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def fake_records(scaling):
    records = []
    for sweep in scaling.SWEEPS:
        for k, value in enumerate(sweep.values):
            for method in ("plain", scaling.FAST, "torch.func", sweep.peer):
                wrong = method == "opacus-hooks"
                records.append(
                    {
                        "sweep": sweep.name,
                        "variable": sweep.variable,
                        "value": value,
                        "method": method,
                        "median_s": 0.01 * (k + 1),
                        "ratio": 1.0 if method == "plain" else 1.5 + k,
                        "peak_mem_bytes": (k + 1) << 20,
                        "status": "wrong" if wrong else "ok",
                        "reason": "shape mismatch" if wrong else "",
                        "foreign_cpu": 0.0,
                    }
                )
    meta = {
        "machine": {
            "cpu": "Test CPU",
            "logical_cpus": 2,
            "torch": torch.__version__,
            "threads": 2,
            "versions": {"persample_git": "abc"},
        },
        "load_before": 0.1,
        "load_after": 0.2,
        "allocator": "test",
        "memory_method": "test",
        "repeats": 3,
        "command": "python benchmarks/scaling.py",
        "total_s": 1.0,
    }
    return records, meta


def test_markdown_has_every_point_and_reason():
    scaling = load_scaling()
    records, meta = fake_records(scaling)
    text = scaling.markdown(records, meta)
    for sweep in scaling.SWEEPS:
        for value in sweep.values:
            assert f"\n| {value} | " in text
    assert "Test CPU, 2 logical CPUs" in text
    assert "`opacus-hooks`: shape mismatch" in text


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    scaling = load_scaling()
    records, meta = fake_records(scaling)
    scaling.plot(records, meta, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_large_case_is_opt_in_and_ten_times_gpt2():
    pytest.importorskip("transformers")
    load_scaling()
    cases = sys.modules["cases"]
    assert not [c for c in cases.all_cases() if c.name == "gpt2-large"]
    large = [c for c in cases.all_cases(large=True) if c.name == "gpt2-large"]
    assert [c.label for c in large] == ["gpt2-large-b8"]
    count = lambda problem: sum(p.numel() for p in problem.model.parameters())  # noqa: E731
    assert count(cases.large_gpt2_problem(1)) >= 10 * count(cases.gpt2_problem(1))


def test_median_of_runs_takes_each_point_from_its_runs():
    """Per point the median of the runs' ratios and memories, the worst status, every run's ratio listed."""
    scaling = load_scaling()
    runs = []
    for shift in (0.0, 3.0, 1.0):
        records, meta = fake_records(scaling)
        for r in records:
            if r["method"] != "plain":
                r["ratio"] += shift
        runs.append({"meta": {**meta, "load_after": shift}, "records": records})
    runs[1]["records"][1]["status"], runs[1]["records"][1]["reason"] = "failed", "boom"
    records, meta = scaling.median_of_runs(runs)
    first = records[1]  # the fast engine at the first MLP point: 1.5, 4.5, 2.5
    assert first["method"] == scaling.FAST and first["ratio"] == 2.5 and first["run_ratios"] == [1.5, 4.5, 2.5]
    assert first["status"] == "failed" and first["reason"] == "boom"
    assert meta["load_after"] == 1.0 and len(meta["runs"]) == 3 and meta["total_s"] == 3.0
    text = scaling.markdown(records, meta)
    assert "the median of 3 runs" in text and "1.50 / 4.50 / 2.50" in text
