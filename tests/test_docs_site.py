"""The README is one screen whose commands and example work; the documentation site (mkdocs.yml, docs/) shows
every recipe's tested code and has an API page per public module. (`.ci/run` builds the site with
`mkdocs build --strict`, which fails on a broken page, link, snippet or API reference.)"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MKDOCS = (ROOT / "mkdocs.yml").read_text()
DEMO_COMMAND = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[demo]" && persample demo'
TEST_COMMAND = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest -n 2'


def nav_pages() -> list[str]:
    """Every page mkdocs.yml's nav names (``- Title: page.md`` or ``- page.md``)."""
    nav = MKDOCS.split("\nnav:\n", 1)[1]
    return re.findall(r"^\s+- (?:[^:\n]+: )?(\S+\.md)\s*$", nav, flags=re.M)


def _optional_pages_hook():
    spec = importlib.util.spec_from_file_location("optional_pages", ROOT / "docs" / "hooks" / "optional_pages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_fits_on_one_screen():
    lines = README.splitlines()
    assert len(lines) <= 45, f"README.md has {len(lines)} lines"
    assert max(map(len, lines)) <= 120


def test_the_readme_keeps_the_two_fresh_machine_commands_that_ci_runs():
    assert DEMO_COMMAND in README and TEST_COMMAND in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test,docs]"' in ci and "python -m pytest" in ci
    assert "mkdocs build --strict" in ci


def test_the_readme_example_runs_and_logs_the_noise_scale():
    code = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    torch.manual_seed(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    steps = re.findall(r"step (\d+): B_simple \(EMA\) (\S+) examples, batch 32", out.getvalue())
    assert [int(s) for s, _ in steps] == [0, 10, 20, 30, 40], out.getvalue()
    assert all(float(v) > 0 for _, v in steps), out.getvalue()


def test_every_readme_link_and_nav_page_exists():
    links = re.findall(r"\]\((docs/[^)#]+)\)", README)
    assert len(links) >= 10 and all((ROOT / link).is_file() for link in links), links
    optional = _optional_pages_hook().OPTIONAL_PAGES
    missing = [p for p in nav_pages() if not (ROOT / "docs" / p).is_file() and p not in optional]
    assert not missing, missing


def test_every_recipe_has_a_page_that_includes_its_script():
    recipes = sorted(p.name for p in (ROOT / "examples").glob("recipe_*.py"))
    included: dict[str, list[str]] = {}
    for page in sorted((ROOT / "docs" / "recipes").glob("*.md")):
        for script in re.findall(r'^--8<-- "examples/(recipe_\w+\.py)"$', page.read_text(), flags=re.M):
            included.setdefault(script, []).append(page.name)
    assert sorted(included) == recipes and all(len(v) == 1 for v in included.values()), included
    pages = set(nav_pages())
    assert all(f"recipes/{v[0]}" in pages for v in included.values())


def test_the_api_reference_has_a_page_per_public_module():
    modules = ["", ".noise", ".stats", ".tracker", ".loggers", ".integrations", ".distributed", ".explain"]
    modules += [".contract", ".errors", ".integrations.transformers", ".integrations.lightning"]
    directives = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        directives |= set(re.findall(r"^::: (\S+)$", page.read_text(), flags=re.M))
    assert {f"persample{m}" for m in modules} <= directives


def test_a_missing_optional_page_leaves_the_nav_and_a_missing_required_one_stays(tmp_path):
    hook = _optional_pages_hook()
    (tmp_path / "index.md").write_text("# Home")
    nav = [{"Home": "index.md"}, {"Noise": "noise.md"}, {"Mine": "mine.md"}, {"Group": [{"FSDP2": "fsdp.md"}]}]
    assert hook._prune(nav, tmp_path) == [{"Home": "index.md"}, {"Mine": "mine.md"}]
    (tmp_path / "fsdp.md").write_text("# FSDP2")
    assert hook._prune(nav, tmp_path)[-1] == {"Group": [{"FSDP2": "fsdp.md"}]}
