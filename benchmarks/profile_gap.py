"""Where one method's CPU time goes beyond another's, function by function (cProfile, CPU clock).

Wall time on a shared machine swings with the other processes; the CPU time of this process swings far
less. For each method this script runs one case's step ``--calls`` times (after two warm-ups) under
``cProfile`` with ``time.process_time`` as its clock, and keeps, per function, the minimum over the calls
of its cumulative time. The table lists the functions whose minimum differs most between the first
method and the second (default: ``persample-observe`` against ``persample-stats-fast``). Run it with
``OMP_NUM_THREADS=1`` so that the CPU time is one thread's.

    OMP_NUM_THREADS=1 python benchmarks/profile_gap.py --case mlp-b128 [--var/--novar] [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch

import cases
import methods

__all__ = ["profile"]


def profile(step, calls: int) -> tuple[float, dict[str, float]]:
    """(minimum total CPU seconds of one call, {function: minimum cumulative CPU seconds})."""
    step()
    step()
    best: dict[str, float] = {}
    totals = []
    for _ in range(calls):
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        step()
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        seen: dict[str, float] = {}
        for (filename, line, name), (_, _, _, cumulative, _) in stats.items():
            key = f"{os.path.basename(filename)}:{line}:{name}"
            seen[key] = max(seen.get(key, 0.0), cumulative)
        for key, value in seen.items():
            best[key] = min(best.get(key, value), value)
        totals.append(max(seen.values()))
    return min(totals), best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="mlp-b128", help="the first case whose label starts with this")
    parser.add_argument("--method", default="persample-observe")
    parser.add_argument("--against", default="persample-stats-fast")
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--top", type=int, default=30)
    options = parser.parse_args()
    torch.manual_seed(0)
    case = next(c for c in cases.all_cases(large=True) if c.label.startswith(options.case))
    problem = case.build()
    known = {m.name: m for m in methods.all_methods()}
    results = {}
    for name in ("plain", options.against, options.method):
        results[name] = profile(known[name].prepare(problem).step, options.calls)
        print(f"{name:32s} {results[name][0] * 1e3:8.2f} ms CPU (min of {options.calls})")
    (_, mine), (_, theirs) = results[options.method], results[options.against]
    keys = set(mine) | set(theirs)
    rows = sorted(keys, key=lambda k: -abs(mine.get(k, 0.0) - theirs.get(k, 0.0)))[: options.top]
    print(f"\n| function | {options.method} ms | {options.against} ms | difference |\n|---|---:|---:|---:|")
    for key in rows:
        a, b = mine.get(key, 0.0) * 1e3, theirs.get(key, 0.0) * 1e3
        print(f"| {key} | {a:.2f} | {b:.2f} | {a - b:+.2f} |")


if __name__ == "__main__":
    main()
