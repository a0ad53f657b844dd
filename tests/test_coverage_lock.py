"""Locked coverage: the refusals of the real-model matrix may only go away, never appear.

``tests/coverage_lock.json`` lists, for every real-model case with an exact answer, the entry points that
refuse it today (only ``fast`` and ``vmap`` may; ``auto``, ``loop``, ``per_sample_grads``, ``check_mean``
and ``Tracker.step`` must be exact everywhere) and the refusal's code (``persample/contract.py``).
``test_real_models.py::test_real_model`` compares each verdict with it:

- a case that newly refuses, or refuses with another code, fails (a coverage regression; or, if intended,
  a change to make in the lock file, reviewed as such);
- a case that newly succeeds fails too, with the instruction to remove its entry, so that the lock moves
  forward with it and a later regression is caught.

Regenerate the whole file with ``python tests/test_coverage_lock.py`` (runs fast and vmap on every case,
a few minutes on 2 cores) and review the diff.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LOCK_PATH = Path(__file__).with_name("coverage_lock.json")
LOCKED_ENTRIES = ("fast", "vmap")
UPDATE = "python tests/test_coverage_lock.py"


def load_lock() -> dict[str, dict[str, str]]:
    return json.loads(LOCK_PATH.read_text())["refusals"]


def lock_mismatch(lock: dict, case_id: str, entry: str, kind: str, code: str | None) -> str | None:
    """Why a verdict (EXACT or REFUSED with ``code``) disagrees with the lock, or None."""
    if entry not in LOCKED_ENTRIES:
        return None
    locked = lock.get(case_id, {}).get(entry)
    if kind == "REFUSED" and locked is None:
        return (
            f"{case_id}::{entry} newly refuses ({code}): a coverage regression. If it is intended, add "
            f'"{entry}": "{code}" under "{case_id}" in {LOCK_PATH.name} (or run `{UPDATE}`) and say why'
        )
    if kind == "REFUSED" and code != locked:
        return (
            f"{case_id}::{entry} refuses with {code}, locked as {locked}: update {LOCK_PATH.name} "
            f"(`{UPDATE}`) if the new reason is right"
        )
    if kind == "EXACT" and locked is not None:
        return (
            f"{case_id}::{entry} is now exact (was refused with {locked}): remove it from {LOCK_PATH.name} "
            f"(or run `{UPDATE}`) so that coverage stays locked at the new level"
        )
    return None


def test_refusals_are_locked():
    """The lock names existing cases and declared codes, and the checker flags each kind of change."""
    sys.path.insert(0, str(Path(__file__).parent))
    from real_models import all_cases

    from persample.contract import PRECONDITIONS

    lock = load_lock()
    cases = {case.id: case for case in all_cases()}
    for case_id, entries in lock.items():
        assert case_id in cases, f"{LOCK_PATH.name}: no case {case_id!r}"
        assert cases[case_id].ill_posed is None, f"{case_id} is ill-posed: every entry refuses it, not locked"
        for entry, code in entries.items():
            assert entry in LOCKED_ENTRIES, f"{case_id}: {entry} may not refuse at all"
            assert code in PRECONDITIONS, f"{case_id}::{entry}: undeclared code {code!r}"
    case_id, (entry, code) = next((c, next(iter(e.items()))) for c, e in lock.items())
    assert lock_mismatch(lock, case_id, entry, "REFUSED", code) is None
    assert "now exact" in lock_mismatch(lock, case_id, entry, "EXACT", None)
    assert "refuses with" in lock_mismatch(lock, case_id, entry, "REFUSED", "SOMETHING_ELSE")
    exact = next(c for c in cases if cases[c].ill_posed is None and "fast" not in lock.get(c, {}))
    assert "newly refuses" in lock_mismatch(lock, exact, "fast", "REFUSED", "ANY")
    assert lock_mismatch(lock, exact, "fast", "EXACT", None) is None
    assert lock_mismatch(lock, case_id, "auto", "EXACT", None) is None  # auto & co. are held to EXACT elsewhere


def _regenerate() -> None:
    import warnings

    warnings.simplefilter("ignore")
    sys.path.insert(0, str(Path(__file__).parent))
    import test_real_models as matrix

    refusals: dict[str, dict[str, str]] = {}
    for case in matrix.CASES:
        if case.ill_posed is not None:
            continue
        for entry in LOCKED_ENTRIES:
            verdict = matrix.run_entry(case, entry)
            if verdict.kind == "REFUSED":
                refusals.setdefault(case.id, {})[entry] = verdict.code
            print(f"{case.id}::{entry} {verdict.kind} {verdict.code or ''}", flush=True)
    LOCK_PATH.write_text(
        json.dumps(
            {
                "about": "refusals of the real-model matrix on cases with an exact answer; "
                "see tests/test_coverage_lock.py",
                "refusals": refusals,
            },
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )


if __name__ == "__main__":
    _regenerate()
