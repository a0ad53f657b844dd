"""tests/README.md maps each README promise to its tests: every row must name tests that exist."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SECTION = "## README claims and their tests"


def claim_rows(text: str) -> list[tuple[str, list[str]]]:
    """(claim, [file::function, ...]) for each row of the table under SECTION."""
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 2 or cells[0] in ("claim", "---") or set(cells[0]) <= {"-"}:
            continue
        rows.append((cells[0], [t.strip() for t in cells[1].split(",") if t.strip()]))
    return rows


@functools.cache
def functions_in(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    return frozenset(node.name for node in tree.body if isinstance(node, ast.FunctionDef))


def missing(reference: str) -> str | None:
    """Why ``file::function`` does not name a test, or None when it does."""
    if "::" not in reference:
        return f"{reference!r} is not file::function"
    file, name = reference.split("::", 1)
    path = HERE / file
    if not path.is_file():
        return f"{file} does not exist"
    if name not in functions_in(path):
        return f"{file} has no function {name}"
    if file != "_distributed_worker.py" and not name.startswith("test_"):
        return f"{name} is not a test"
    return None


ROWS = claim_rows((HERE / "README.md").read_text())


def test_the_table_has_rows():
    assert len(ROWS) >= 30, f"only {len(ROWS)} claims parsed from tests/README.md"


@pytest.mark.parametrize("claim, tests", ROWS, ids=[claim[:60] for claim, _ in ROWS])
def test_every_claim_names_existing_tests(claim, tests):
    assert tests, f"claim {claim!r} has no test"
    problems = [why for t in tests if (why := missing(t))]
    assert not problems, f"claim {claim!r}: " + "; ".join(problems)


def test_a_row_without_a_test_or_with_a_missing_one_is_caught():
    text = f"{SECTION}\n\n| claim | tests |\n|---|---|\n| a | |\n| b | test_stats.py::test_nothing_here |\n"
    (a, none), (b, refs) = claim_rows(text)
    assert none == [] and missing(refs[0]) == "test_stats.py has no function test_nothing_here"
