"""benchmarks/gpu.sh, the GPU run of issue 22, dry-run on CPU: the same three steps (the CUDA tests,
which skip here; benchmarks/run.py in float32; and under bf16 autocast) at tiny sizes. No timing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_the_gpu_script_dry_run_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name for p in tmp_path.iterdir()}
    for stem in ("dryrun-cpu-fp32", "dryrun-cpu-bf16"):
        assert {stem + ".json", stem + ".md"} <= names
    assert "dryrun-cpu-tests.md" in names
    for precision, autocast in (("fp32", None), ("bf16", "bf16")):
        records = json.loads((tmp_path / f"dryrun-cpu-{precision}.json").read_text())
        by_method = {r["method"]: r for r in records}
        assert by_method["persample-stats-fast"]["status"] == "ok", by_method["persample-stats-fast"]["reason"]
        assert by_method["plain"]["median_s"] > 0
        assert all(r["autocast"] == autocast for r in records)
    assert "autocast(bf16)" in (tmp_path / "dryrun-cpu-bf16.md").read_text()
