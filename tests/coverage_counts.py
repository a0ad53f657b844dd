"""Coverage counts of the real-model matrix (tests/real_models.py): which engine ``engine="auto"`` takes
for ``grad_stats`` on each case with an exact answer, and how often the fast engine is exact.

``python tests/coverage_counts.py [--cases]`` prints the counts (and, with ``--cases``, one line per case:
the engine auto takes and, where the fast engine refuses, its code). The engine is the one
:func:`persample.explain` names, which tests/test_explain.py holds equal to the one ``auto`` takes.
docs/coverage.md reports these numbers.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path


def counts(show_cases: bool = False) -> Counter:
    sys.path.insert(0, str(Path(__file__).parent))
    import persample
    from real_models import all_cases

    tally: Counter = Counter()
    for case in all_cases():
        if case.ill_posed is not None:
            continue
        model, inputs, targets = case.instantiate()
        randomness = "different" if case.id.endswith("-train") else "error"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = persample.explain(model, case.loss_fn, inputs, targets, randomness=randomness)
        auto = report.entry_points["grad_stats"] or "refused"
        fast = report.engines["fast"]
        tally["cases"] += 1
        tally[f"auto={auto}"] += 1
        tally["fast exact"] += fast.exact
        if show_cases:
            why = "" if fast.exact or fast.refusal is None else f"  fast: {fast.refusal.code}"
            print(f"{case.id:55s} auto={auto}{why}", flush=True)
    return tally


if __name__ == "__main__":
    tally = counts("--cases" in sys.argv)
    n = tally["cases"]
    print(f"cases with an exact answer: {n}")
    for key in ("auto=fast", "auto=vmap", "auto=loop", "auto=refused"):
        print(f"{key}: {tally[key]} ({100 * tally[key] / n:.0f}%)")
    print(f"fast engine exact: {tally['fast exact']} / {n} ({100 * tally['fast exact'] / n:.0f}%)")
