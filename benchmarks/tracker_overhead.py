"""Cost of ``Tracker(every=k)`` steps that compute no statistics, as a ratio to a plain step.

A plain training step is ``zero_grad(); loss_fn(model(x), y).backward(); opt.step()``; the tracked
step replaces the backward line with ``tracker.step(x, y)``. Both loops run interleaved in one
process (alternating blocks of steps, so drift in machine load hits both equally); only the
tracker's non-statistics steps are timed. Reported: median per-step time of each, and their ratio,
with the CPU model, the load average before and after (the machines are shared) and the commit.

    python benchmarks/tracker_overhead.py [--steps 400] [--every 10] [--threads 2] [--json OUT] [--md OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import run as bench  # noqa: E402  (also puts this checkout's persample first on sys.path)

import persample  # noqa: E402


def mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


CASES = {"mlp-784-512-512-10": mlp, "cnn-mnist": cnn}


def measure(build, batch_size: int, steps: int, every: int, block: int = 10) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    loss_fn = nn.CrossEntropyLoss()
    plain_model, tracked_model = build(), build()
    tracked_model.load_state_dict(plain_model.state_dict())
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
    tracked_opt = torch.optim.SGD(tracked_model.parameters(), lr=0.01, momentum=0.9)
    tracker = persample.Tracker(tracked_model, loss_fn, every=every)

    def plain_step():
        plain_opt.zero_grad()
        loss_fn(plain_model(x), y).backward()
        plain_opt.step()

    def tracked_step():
        tracked_opt.zero_grad()
        tracker.step(x, y)
        tracked_opt.step()

    for _ in range(3):  # warm up both, statistics steps included
        plain_step()
        tracked_step()
    tracker.steps = 1
    plain_times, tracked_times = [], []
    while len(tracked_times) < steps:
        for _ in range(block):
            t0 = time.perf_counter()
            plain_step()
            plain_times.append(time.perf_counter() - t0)
        for _ in range(block):
            stats_step = tracker.wants_stats()
            t0 = time.perf_counter()
            tracked_step()
            if not stats_step:
                tracked_times.append(time.perf_counter() - t0)
    plain_median, tracked_median = statistics.median(plain_times), statistics.median(tracked_times)
    return {
        "batch_size": batch_size,
        "every": every,
        "steps_timed": len(tracked_times),
        "plain_step_median_s": plain_median,
        "tracked_plain_step_median_s": tracked_median,
        "ratio": tracked_median / plain_median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="non-statistics steps timed per case")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--md", help="write a markdown table of the records to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = {
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": bench.cpu_model(),
        "logical_cpus": os.cpu_count(),
        "persample_revision": bench.git_revision(),
        "persample_path": str(Path(persample.__file__).parent),
    }
    records = []
    for name, build in CASES.items():
        load_before = _load()
        record = {
            "case": name,
            **measure(build, args.batch_size, args.steps, args.every),
            **common,
            "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": _load(),
        }
        records.append(record)
        print(
            f"{name:22s} B={record['batch_size']} every={record['every']}: plain "
            f"{record['plain_step_median_s'] * 1e3:.2f} ms, tracked non-stats step "
            f"{record['tracked_plain_step_median_s'] * 1e3:.2f} ms, ratio {record['ratio']:.3f} "
            f"(load {load_before[0]:.1f} → {record['load_average_1_5_15_after'][0]:.1f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    if args.md:
        Path(args.md).write_text(markdown(records, args))


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return [float("nan")] * 3


def markdown(records: list[dict], args) -> str:
    first = records[0]
    lines = [
        "# Tracker overhead on steps without statistics (CPU)",
        "",
        f"{first['machine']} ({first['logical_cpus']} logical CPUs, shared), {first['threads']} torch "
        f"threads, torch {first['torch']}, persample `{first['persample_revision']}`; "
        f"`python benchmarks/tracker_overhead.py --steps {args.steps} --every {args.every} "
        f"--batch-size {args.batch_size} --threads {args.threads}`.",
        "",
        "A plain step is `zero_grad(); loss_fn(model(x), y).backward(); opt.step()`; the tracked step "
        f"replaces the backward with `Tracker(every={args.every}).step(x, y)`. Both loops run "
        "interleaved in blocks of 10 steps; only the tracker's steps without statistics are timed. "
        "Medians per step:",
        "",
        "| case | B | steps timed | plain (ms) | tracked, no statistics (ms) | ratio "
        "| load average before → after (1, 5, 15 min) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        before = ", ".join(f"{v:.1f}" for v in r["load_average_1_5_15_before"])
        after = ", ".join(f"{v:.1f}" for v in r["load_average_1_5_15_after"])
        lines.append(
            f"| {r['case']} | {r['batch_size']} | {r['steps_timed']} | "
            f"{r['plain_step_median_s'] * 1e3:.2f} | {r['tracked_plain_step_median_s'] * 1e3:.2f} | "
            f"{r['ratio']:.3f} | {before} → {after} |"
        )
    lines += [
        "",
        "A load average above the 2 cores means other processes competed for them during the run: the "
        "ratio, measured within one process and interleaved, is more meaningful than the times.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
