"""Cost of persample under DDP, per training step, as a ratio to DDP training without persample.

    python benchmarks/ddp_overhead.py [--steps 20] [--save]

Starts 2 gloo processes on 127.0.0.1 (1 torch thread each) and times, on rank 0, the median of:

- ``ddp-plain``: ``zero_grad(); loss_fn(ddp_model(x), y).backward(); opt.step()`` — the denominator;
- ``tracker-ddp``: the same step with ``tracker.step(x, y)`` on the DDP model, statistics every step
  (this rank's statistics, the gradient all-reduce, and the all-reduce of the statistics);
- ``tracker-ddp-plain``: a step of ``Tracker(ddp_model, every=10)`` that computes no statistics (DDP's
  own forward and backward, through the Tracker);
- ``tracker-local``: ``Tracker(model, distributed=False)`` on an unwrapped copy: the same statistics,
  no communication at all (each rank on its own);
- ``all_reduce_stats``: the all-reduce of one step's GradStats alone (header gather, two P-sized
  sums for mean and M2, one gather of the B-sized per-example vectors);
- ``all_reduce_gradients``: the Tracker's gradient all-reduce alone (what DDP's backward does).

So ``tracker-ddp − tracker-local`` is the communication the Tracker adds to a step, and
``all_reduce_stats`` the part of it that the statistics cost (the gradient all-reduce is what DDP
pays anyway). Cases: the benchmark MLP 784-512-512-10 at B = 128 per rank and the small GPT-2 of
``cases.py`` (2 layers, width 128, T = 64) at B = 8 per rank. The methods run in interleaved blocks,
so drift in the machine's load hits them alike; the load average is recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
WORLD = 2


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_case(name: str, problem, steps: int, block: int) -> dict:
    import persample
    from persample.distributed import all_reduce_gradients, all_reduce_stats
    from torch.nn.parallel import DistributedDataParallel

    loss_fn = problem.loss_fn
    x, y = problem.inputs, problem.targets
    plain = DistributedDataParallel(copy.deepcopy(problem.model))
    tracked = DistributedDataParallel(copy.deepcopy(problem.model))
    local_model = copy.deepcopy(problem.model)
    tracker = persample.Tracker(tracked, loss_fn)
    sparse = DistributedDataParallel(copy.deepcopy(problem.model))
    sparse_tracker = persample.Tracker(sparse, loss_fn, every=10)
    local_tracker = persample.Tracker(local_model, loss_fn, distributed=False)
    opts = {
        k: torch.optim.SGD(m.parameters(), lr=1e-3)
        for k, m in (("plain", plain), ("tracked", tracked), ("local", local_model), ("sparse", sparse))
    }
    stats = persample.grad_stats(tracked.module, loss_fn, x, y)
    params = dict(tracked.module.named_parameters())
    for p in params.values():
        p.grad = torch.zeros_like(p)

    def plain_step():
        opts["plain"].zero_grad()
        loss_fn(plain(x), y).backward()
        opts["plain"].step()

    def tracker_ddp_step():
        opts["tracked"].zero_grad()
        tracker.step(x, y)
        opts["tracked"].step()

    def tracker_plain_step():
        sparse_tracker.steps = 1  # never a statistics step
        opts["sparse"].zero_grad()
        sparse_tracker.step(x, y)
        opts["sparse"].step()

    def tracker_local_step():
        opts["local"].zero_grad()
        local_tracker.step(x, y)
        opts["local"].step()

    methods = {
        "ddp-plain": plain_step,
        "tracker-ddp": tracker_ddp_step,
        "tracker-ddp-plain": tracker_plain_step,
        "tracker-local": tracker_local_step,
        "all_reduce_stats": lambda: all_reduce_stats(stats),
        "all_reduce_gradients": lambda: all_reduce_gradients(params),
    }
    for fn in methods.values():  # warm up
        fn()
        fn()
    times = {k: [] for k in methods}
    while len(times["ddp-plain"]) < steps:
        for key, fn in methods.items():
            for _ in range(block):
                times[key].append(timed(fn))
    medians = {k: statistics.median(v) for k, v in times.items()}
    numel = sum(p.numel() for p in params.values())
    return {
        "case": name,
        "batch_size_per_rank": int(x.shape[0]),
        "world_size": dist.get_world_size(),
        "parameters": numel,
        "steps_timed": len(times["ddp-plain"]),
        "median_s": medians,
        "ratio_to_ddp_plain": {k: v / medians["ddp-plain"] for k, v in medians.items()},
        "communication_added_by_tracker_s": medians["tracker-ddp"] - medians["tracker-local"],
        "stats_bytes_all_reduced": 2 * numel * stats.mean[next(iter(stats.mean))].element_size(),
    }


def worker(steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from cases import mlp_problem, small_gpt2_problem

    records = []
    for name, builder, batch, case_steps in (
        ("mlp-784-512-512-10", mlp_problem, 128, steps),
        ("gpt2-small", small_gpt2_problem, 8, max(6, steps // 3)),
    ):
        torch.manual_seed(0)
        records.append(measure_case(name, builder(batch), case_steps, block=max(1, case_steps // 5)))
        if dist.get_rank() == 0:
            r = records[-1]
            print(
                f"{name}: "
                + ", ".join(
                    f"{k} {v * 1e3:.2f} ms ({r['ratio_to_ddp_plain'][k]:.2f}x)" for k, v in r["median_s"].items()
                ),
                flush=True,
            )
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(records, f)
    dist.destroy_process_group()


def launch(steps: int, timeout: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = HERE / f".ddp-overhead-{os.getpid()}.json"
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--steps", str(steps), "--out", str(out)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
        )
        for r in range(WORLD)
    ]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode != 0 for p in procs) or not out.exists():
        raise SystemExit("ddp_overhead: a worker failed (see its output above)")
    records = json.loads(out.read_text())
    out.unlink()
    return records


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processes": WORLD,
        "threads_per_process": 1,
        "backend": "gloo",
        "load_average_1_5_15": list(os.getloadavg()),
    }


def markdown(info: dict, records: list[dict]) -> str:
    lines = [
        "# persample under DDP: cost per training step",
        "",
        f"{info['processes']} gloo processes × {info['threads_per_process']} thread on {info['cpu']} "
        f"({info['cores']} cores), torch {info['torch']}, Python {info['python']}; load average "
        f"{', '.join(f'{v:.1f}' for v in info['load_average_1_5_15'])} at the end of the run "
        "(the machine is shared: absolute times are only indicative, ratios less so).",
        "",
        "Median per step on rank 0, and ratio to `ddp-plain` (DDP training without persample):",
        "",
        "| case | B/rank | P | ddp-plain | tracker-ddp | tracker-ddp-plain | tracker-local | all_reduce_stats "
        "| all_reduce_gradients |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        cells = [
            f"{r['median_s'][k] * 1e3:.2f} ms ({r['ratio_to_ddp_plain'][k]:.2f}×)"
            for k in (
                "ddp-plain",
                "tracker-ddp",
                "tracker-ddp-plain",
                "tracker-local",
                "all_reduce_stats",
                "all_reduce_gradients",
            )
        ]
        lines.append(f"| {r['case']} | {r['batch_size_per_rank']} | {r['parameters']:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "- `tracker-ddp`: `Tracker(ddp_model).step` with statistics every step (local statistics, "
        "gradient all-reduce, statistics all-reduce).",
        "- `tracker-ddp-plain`: a step of `Tracker(ddp_model, every=10)` without statistics (DDP's own backward).",
        "- `tracker-local`: the same statistics with `distributed=False`, no communication.",
        "- `all_reduce_stats`: the statistics' communication alone (2 P-sized sums + B-sized gathers); "
        "`all_reduce_gradients`: the gradient all-reduce alone, which DDP pays too.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (GPT-2: a third)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/ddp-overhead-cpu.{json,md}")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.out)
        return
    records = launch(args.steps, args.timeout)
    info = machine()
    text = markdown(info, records)
    print(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "ddp-overhead-cpu.json").write_text(json.dumps({"machine": info, "records": records}, indent=2))
        (RESULTS / "ddp-overhead-cpu.md").write_text(text)


if __name__ == "__main__":
    main()
