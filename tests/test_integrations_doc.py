"""docs/integrations.md cannot drift from the suite: every cell of its tested matrix names at least one test,
and every test it names exists (the file, the test function, and the parameter of a parametrized test)."""

import re
from pathlib import Path

TESTS = Path(__file__).parent
DOC = TESTS.parent / "docs" / "integrations.md"
REFERENCE = re.compile(r"`([\w.]+\.py)::(\w+)(?:\[([^\]]+)\])?`")


def _matrix_rows() -> list[list[str]]:
    text = DOC.read_text()
    table = text.split("<!-- matrix:start -->")[1].split("<!-- matrix:end -->")[0]
    lines = [line for line in table.strip().splitlines() if line.startswith("|")]
    header, rule, *rows = lines
    assert set(rule.replace("|", "").replace("-", "").strip()) == set()
    assert "HF Trainer" in header and "Lightning" in header
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]


def _defined(test_file: Path, name: str, param: str | None) -> str | None:
    """Why the reference is not a test of the suite, or None."""
    if not test_file.exists():
        return f"no file {test_file.name}"
    source = test_file.read_text()
    if not re.search(rf"^def {name}\(", source, re.M):
        return f"no test {name} in {test_file.name}"
    if param is None:
        return None
    # the parameter is a value in the test's file, or in a helper file it names (the DDP worker's scenarios)
    helpers = {TESTS / other for other in re.findall(r"\b(_\w+\.py)\b", source)}
    sources = [source] + [helper.read_text() for helper in helpers if helper.exists()]
    value = re.compile(rf"(?<![\w-]){re.escape(param)}(?![\w-])")
    if not any(value.search(s) for s in sources):
        return f"no parameter {param!r} for {name}"
    return None


def test_every_matrix_cell_names_existing_tests():
    rows = _matrix_rows()
    assert len(rows) >= 14
    missing = []
    for setting, *cells in rows:
        assert len(cells) == 2, setting
        for framework, cell in zip(("HF Trainer", "Lightning"), cells):
            references = REFERENCE.findall(cell)
            if not references and "next row" not in cell:
                missing.append(f"{setting} / {framework}: names no test")
            for file_name, name, param in references:
                why = _defined(TESTS / file_name, name, param or None)
                if why is not None:
                    missing.append(f"{setting} / {framework}: {why}")
    assert not missing, "\n".join(missing)


def test_the_check_catches_a_missing_test():
    assert _defined(TESTS / "test_integrations_matrix.py", "test_hf_peft_lora_is_exact", "gpt2") is None
    assert _defined(TESTS / "test_integrations_matrix.py", "test_no_such_cell", None) is not None
    assert _defined(TESTS / "test_integrations_matrix.py", "test_hf_peft_lora_is_exact", "mistral") is not None
    assert _defined(TESTS / "test_no_such_file.py", "test_x", None) is not None
    ddp = TESTS / "test_integrations_matrix_ddp.py"
    assert _defined(ddp, "test_observe_under_ddp", "lightning_under_ddp_static_graph") is None
    assert _defined(ddp, "test_observe_under_ddp", "lightning_under_ddp_static") is not None
