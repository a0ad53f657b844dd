"""Every recipe under examples/recipe_*.py runs as a script (small sizes, CPU) and does what it says."""

import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPES = sorted(p.name for p in EXAMPLES.glob("recipe_*.py"))
NEEDS = {"recipe_tensorboard.py": "tensorboard", "recipe_hf_causal_lm.py": "transformers"}


def _run(name, monkeypatch, capsys, *args):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_every_recipe_is_tested():
    assert set(RECIPES) == {
        "recipe_tensorboard.py",
        "recipe_hf_causal_lm.py",
        "recipe_resnet_batchnorm.py",
        "recipe_clipping.py",
        "recipe_tracin.py",
        "recipe_reading_diagnostics.py",
    }


def test_recipe_tensorboard(monkeypatch, capsys, tmp_path):
    out = _run("recipe_tensorboard.py", monkeypatch, capsys, "--out", str(tmp_path))
    assert "on steps [0, 10, 20, 30, 40, 50]" in out
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_recipe_hf_causal_lm(monkeypatch, capsys):
    out = _run("recipe_hf_causal_lm.py", monkeypatch, capsys)
    assert out.count("per-sequence summed token loss") == 3 and "HF's token-mean loss" in out


def test_recipe_resnet_batchnorm(monkeypatch, capsys, tmp_path):
    out = _run("recipe_resnet_batchnorm.py", monkeypatch, capsys, "--out", str(tmp_path))
    from persample.loggers import read_metrics

    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(r["n"] == 32 for r in rows)
    assert "5.4: BatchNorm2d(32) -> GroupNorm(32, 32)" in out
    values = [float(v) for v in re.findall(r"B_simple \(EMA over 8 steps\) ≈ (\S+)", out)]
    assert len(values) == 2 and all(v > 0 for v in values), out


def test_recipe_clipping(monkeypatch, capsys):
    out = _run("recipe_clipping.py", monkeypatch, capsys)
    norms = [float(v) for v in re.findall(r"‖p.grad‖ (\S+) \(≤ 4.0\)", out)]
    assert len(norms) == 4 and all(n <= 4.0 for n in norms)
    assert "step 0: 1/16 examples clipped" in out


def test_recipe_tracin(monkeypatch, capsys):
    out = _run("recipe_tracin.py", monkeypatch, capsys)
    found = int(re.search(r"(\d+) of the 10 training examples with the largest self-influence", out).group(1))
    assert found >= 5, out


def test_recipe_reading_diagnostics(monkeypatch, capsys):
    out = _run("recipe_reading_diagnostics.py", monkeypatch, capsys)
    assert "40 rows;" in out and "against a batch of 16" in out
