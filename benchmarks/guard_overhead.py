"""What the fast engine's exactness guards cost, measured as an A/B in one process.

The guards (issue "exact or refuse"): hook and parameter-hook checks, the rule
preconditions (own ``forward``, no hooks), the RNG-state check for random draws,
the per-example-loss check, float32 upcasts with autocast off, and the
cancellation flag of one-pass second moments (one device sync). Here they are
switched off by patching them to no-ops, which is *not* a supported mode: it
only isolates their cost. Calls with and without the guards alternate, so that
drift on a shared machine hits both alike; each figure is a median.

    python benchmarks/guard_overhead.py [--repeats 40] [--save]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import cases
import persample
from persample.engines.fast import engine, pieces, rules


@contextlib.contextmanager
def guards_off():
    """The fast engine as it was before the guards: every check a no-op."""
    saved = [
        (engine, "refuse_unseen_hooks", engine.refuse_unseen_hooks),
        (engine, "rng_snapshot", engine.rng_snapshot),
        (engine, "rng_advanced", engine.rng_advanced),
        (rules, "has_hooks", rules.has_hooks),
        (rules, "_rule_for_type", rules._rule_for_type),
        (pieces.OuterPiece, "quick_centered_second_moment", pieces.OuterPiece.quick_centered_second_moment),
    ]

    def unflagged(self, mean):
        m2, _ = saved[-1][2](self, mean)
        return m2, None

    engine.refuse_unseen_hooks = lambda model, name: None
    engine.rng_snapshot = lambda model: []
    engine.rng_advanced = lambda model, snapshot: False
    rules.has_hooks = lambda module: False
    rules._rule_for_type = lambda module_type: (saved[4][2](module_type)[0], True)
    pieces.OuterPiece.quick_centered_second_moment = unflagged
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _cpu_model() -> str:
    """The CPU's model name as lscpu reports it (Linux), else the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        return f"{names[0]}, {len(names)} vCPUs"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(case: cases.Case, var: bool, repeats: int) -> dict:
    problem = case.build("cpu")
    model = problem.model

    def stats():
        return persample.grad_stats(model, problem.loss_fn, problem.inputs, problem.targets, engine="fast", var=var)

    stats()
    with guards_off():
        stats()
    calls = max(1, int(0.05 / timed(stats, 1)))
    guarded, bare = [], []
    for _ in range(repeats):
        guarded.append(timed(stats, calls))
        with guards_off():
            bare.append(timed(stats, calls))
    g, b = statistics.median(guarded), statistics.median(bare)
    return {
        "case": case.label,
        "var": var,
        "guarded_s": g,
        "unguarded_s": b,
        "overhead": g / b - 1,
        "repeats": repeats,
        "calls_per_sample": calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--case", action="append", help="case labels to keep (default: the benchmark set)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/guard-overhead-cpu.{json,md}")
    args = parser.parse_args()
    torch.set_num_threads(2)
    selected = cases.select_cases(cases.all_cases(), args.case or ["mlp-b128", "cnn-b128", "gpt2-b16", "lstm-b32"])
    rows = [measure(case, var, args.repeats) for case in selected for var in (True, False)]
    machine = {"cpu": _cpu_model(), "torch": torch.__version__, "threads": 2, "python": sys.version.split()[0]}
    lines = ["| case | var | guarded (ms) | unguarded (ms) | overhead |", "|---|---|---:|---:|---:|"]
    lines += [
        f"| {r['case']} | {'yes' if r['var'] else 'no'} | {r['guarded_s'] * 1e3:.2f} | "
        f"{r['unguarded_s'] * 1e3:.2f} | {r['overhead'] * 100:+.1f} % |"
        for r in rows
    ]
    print("\n".join(lines))
    if args.save:
        out = Path(__file__).parent / "results"
        (out / "guard-overhead-cpu.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
        (out / "guard-overhead-cpu.md").write_text(
            "# Cost of the fast engine's exactness guards (CPU, 2 threads)\n\n"
            f"{_cpu_model()}; torch {machine['torch']}; medians of {args.repeats} interleaved samples per setting; "
            "`python benchmarks/guard_overhead.py --save`.\n\n" + "\n".join(lines) + "\n"
        )


if __name__ == "__main__":
    main()
