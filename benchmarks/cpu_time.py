"""CPU time per call of a few methods on one case, in this process's source tree: the minimum over calls of
``time.process_time()`` (this process's CPU time, one thread), which other processes on a shared machine
disturb less than the wall clock. Prints one JSON object ``{method: seconds}`` (and the load average).

For an A/B between two trees, alternate processes of each (drift then hits both alike)::

    git worktree add --detach /tmp/old-main main
    for i in 1 2 3 4; do for tree in /tmp/old-main .; do
        OMP_NUM_THREADS=1 python $tree/benchmarks/cpu_time.py --case mha --calls 20 \\
            --method plain --method torch.func --method persample-stats-fast
    done; done
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this tree's persample first
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import cases  # noqa: E402
import methods  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="mha", help="the first case whose label starts with this")
    p.add_argument("--method", action="append", required=True, help="a method's name (repeatable)")
    p.add_argument("--calls", type=int, default=20, help="timed calls per method (after 3 warm-up calls)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    case = next(c for c in cases.all_cases(large=True) if c.label.startswith(args.case))
    torch.manual_seed(0)
    problem = case.build()
    by_name = {m.name: m for m in methods.all_methods()}
    prepared = {name: by_name[name].prepare(problem) for name in args.method}
    best = {name: float("inf") for name in args.method}
    for name, method in prepared.items():
        for _ in range(3):
            method.step()
    for _ in range(args.calls):  # interleaved, so that drift hits every method alike
        for name, method in prepared.items():
            start = time.process_time()
            method.step()
            best[name] = min(best[name], time.process_time() - start)
    result = {"tree": str(ROOT), "load": os.getloadavg()[0], **best}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
