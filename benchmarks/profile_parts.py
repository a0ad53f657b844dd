"""CPU time per part of one call, robust to a shared machine: cProfile with ``time.process_time`` as its
clock (run with ``OMP_NUM_THREADS=1``), one fresh profile per call, methods interleaved, and for every
function the minimum over calls of its cumulative time.

    OMP_NUM_THREADS=1 python benchmarks/profile_parts.py --case gpt2 --method persample-stats-fast \
        --method plain --calls 5 --top 40 [--match persample/]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import cases
import methods


def _per_function(profile: cProfile.Profile) -> dict[str, tuple[float, float, int]]:
    stats = pstats.Stats(profile)
    out = {}
    for (filename, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        out[f"{filename.split('/site-packages/')[-1].split('/gpt2speed/')[-1]}:{line}:{name}"] = (
            cumtime,
            tottime,
            calls,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="gpt2")
    parser.add_argument("--method", action="append", required=True)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", default="", help="list only functions whose key contains this")
    parser.add_argument("--wall", action="store_true", help="wall clock instead of process time")
    options = parser.parse_args()
    torch.manual_seed(0)
    case = next(c for c in cases.all_cases(large=True) if c.label.startswith(options.case))
    problem = case.build()
    known = {m.name: m for m in methods.all_methods()}
    steps = {name: known[name].prepare(problem).step for name in options.method}
    for step in steps.values():
        step()
        step()
    clock = time.perf_counter if options.wall else time.process_time
    best: dict[str, dict[str, tuple[float, float, int]]] = {name: {} for name in steps}
    totals: dict[str, float] = {name: float("inf") for name in steps}
    for _ in range(options.calls):
        for name, step in steps.items():
            profile = cProfile.Profile(clock)
            start = clock()
            profile.enable()
            step()
            profile.disable()
            totals[name] = min(totals[name], clock() - start)
            for key, value in _per_function(profile).items():
                old = best[name].get(key)
                best[name][key] = value if old is None or value[0] < old[0] else old
    for name in steps:
        print(f"== {name}: min process time per call {totals[name] * 1e3:.1f} ms (under cProfile)")
        rows = [(k, v) for k, v in best[name].items() if options.match in k]
        rows.sort(key=lambda kv: -kv[1][0])
        for key, (cum, tot, calls) in rows[: options.top]:
            print(f"  {cum * 1e3:8.1f} cum {tot * 1e3:8.1f} self {calls:6d}  {key}")


if __name__ == "__main__":
    main()
