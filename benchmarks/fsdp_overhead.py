"""Cost of persample under FSDP2, per training step, as a ratio to FSDP2 training without persample.

    python benchmarks/fsdp_overhead.py [--steps 12] [--batch 8] [--runs 3] [--quick] [--save]

Starts 2 gloo processes on 127.0.0.1 (1 torch thread each); the model is the ``gpt2`` case of
``cases.py`` (HF GPT-2, 4 layers, width 256, vocab 1000, T = 128; ``--quick``: the 2-layer, width
128, T = 64 one) with ``fully_shard`` on every block and on the root. Rank 0 times the median of:

- ``fsdp-plain``: ``zero_grad(); loss_fn(model(x), y).backward(); opt.step()`` — the denominator;
- ``tracker``: the same step with ``Tracker(model, loss_fn).step(x, y)``, statistics (with the
  variance) every step: FSDP2's own forward and backward, observed, then the reduce-scatter of the
  statistics (each rank keeps its shard of the mean and M2);
- ``tracker-novar``: the same with ``var=False``;
- ``tracker-every-10``: a step of ``Tracker(model, loss_fn, every=10)`` without statistics;
- the breakdown: ``observed-backward`` (the plain step with this rank's statistics captured, no
  reduction: unshard everything, capture, sum check; FSDP2's own backward, every weight-gradient
  product), ``observed-backward-skipping`` (the same as ``Tracker.step`` runs it: the products the
  statistics make unneeded skipped, Σ_i g_i written before FSDP2's deferred reduce-scatter, one small
  agreement), ``reduce_scatter_stats`` /
  ``reduce_scatter_stats-novar`` (the statistics' communication alone: on gloo one all-reduce of
  the fused [S1 | S2 | per-example rows] buffer in the statistics' precision, a header all-gather
  and one small all-reduce), ``reduce_scatter_stats-float64`` (the same with the sums forced to
  float64, as before this change) and ``all_reduce_stats`` (full-size statistics on every rank,
  two P-sized all-reduces, for comparison).

It also counts the bytes each collective is handed during one step of each kind (FSDP2's own
all-gathers and reduce-scatters included: every ``torch.distributed`` collective is wrapped while
the step runs) and converts them to bytes sent per rank by a ring algorithm: 2(W−1)/W × size for an
all-reduce, (W−1)/W × input for a reduce-scatter, (W−1) × input for an all-gather.

The measurement behind docs/fsdp.md (about 3 minutes on a quiet 2-core machine):

    OMP_NUM_THREADS=1 python benchmarks/fsdp_overhead.py --runs 3 --save

The methods run in interleaved blocks, so drift in the machine's load hits them alike; the load
average is recorded. ``--runs N`` repeats the whole measurement in N fresh process pairs and reports
the median over runs of each run's own ratio. Absolute times on a shared CPU mean little; the
ratios are the result.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sharded(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def measure(problem, steps: int, block: int) -> dict:
    import dataclasses

    import persample
    from persample._batch import as_batch
    from persample._data_parallel import observed_fsdp2_backward
    from persample.batch_loss import loss_parts
    from persample.distributed import agree, all_reduce_stats, reduce_scatter_stats

    loss_fn, x, y = problem.loss_fn, problem.inputs, problem.targets
    models = {k: sharded(copy.deepcopy(problem.model)) for k in ("plain", "tracker", "novar", "every", "observed")}
    trackers = {
        "tracker": persample.Tracker(models["tracker"], loss_fn),
        "novar": persample.Tracker(models["novar"], loss_fn, var=False),
        "every": persample.Tracker(models["every"], loss_fn, every=10),
    }
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    local = persample.grad_stats(sharded(copy.deepcopy(problem.model)), loss_fn, x, y)
    local_novar = dataclasses.replace(local, m2=None)
    batch_loss, per_example_loss = loss_parts(loss_fn)
    batch = as_batch(x, y)

    def observed_step():
        opts["observed"].zero_grad()
        observed_fsdp2_backward(models["observed"], batch_loss, per_example_loss, batch)
        opts["observed"].step()

    def settle(failure, has_stats):
        return agree(failure, None, flags=[has_stats])[0]

    def observed_skipping_step():
        opts["observed"].zero_grad()
        observed_fsdp2_backward(models["observed"], batch_loss, per_example_loss, batch, settle=settle)
        opts["observed"].step()

    def plain_step():
        opts["plain"].zero_grad()
        loss_fn(models["plain"](x), y).backward()
        opts["plain"].step()

    def tracker_step(key):
        def run():
            if key == "every":
                trackers[key].steps = 1  # never a statistics step
            opts[key].zero_grad()
            trackers[key].step(x, y)
            opts[key].step()

        return run

    def float64_sums():
        from persample.distributed import _reduce_scatter_stats

        _reduce_scatter_stats(local, None, float64=True)

    methods = {
        "fsdp-plain": plain_step,
        "tracker": tracker_step("tracker"),
        "tracker-novar": tracker_step("novar"),
        "tracker-every-10": tracker_step("every"),
        "observed-backward": observed_step,
        "observed-backward-skipping": observed_skipping_step,
        "reduce_scatter_stats": lambda: reduce_scatter_stats(local),
        "reduce_scatter_stats-novar": lambda: reduce_scatter_stats(local_novar),
        "reduce_scatter_stats-float64": float64_sums,
        "all_reduce_stats": lambda: all_reduce_stats(local),
    }
    for fn in methods.values():  # warm up
        fn()
        fn()
    counted = {}
    for key in ("fsdp-plain", "tracker", "tracker-novar", "tracker-every-10", "reduce_scatter_stats"):
        with counting_bytes() as sent:
            methods[key]()
        counted[key] = sent
    times = {k: [] for k in methods}
    while len(times["fsdp-plain"]) < steps:
        for key, fn in methods.items():
            for _ in range(block):
                times[key].append(timed(fn))
    medians = {k: statistics.median(v) for k, v in times.items()}
    numel = sum(v.numel() for v in local.mean.values())
    elem = next(iter(local.mean.values())).element_size()
    world = dist.get_world_size()
    rows = (len(local.mean) + 1) * int(x.shape[0]) * elem  # per-parameter norms and losses
    return {
        "batch_size_per_rank": int(x.shape[0]),
        "world_size": world,
        "parameters": numel,
        "steps_timed": len(times["fsdp-plain"]),
        "median_s": medians,
        "ratio_to_fsdp_plain": {k: v / medians["fsdp-plain"] for k, v in medians.items()},
        # ring all-reduce / all-gather / reduce-scatter: bytes each rank sends, on paper
        "bytes_sent_per_rank": {
            "fsdp (all-gather fwd + bwd, reduce-scatter)": 3 * numel * elem * (world - 1) / world,
            "statistics, gloo: all-reduce of 2P sums (float32) and the rows": 2
            * (2 * numel * elem + world * rows)
            * (world - 1)
            / world,
            "statistics, NCCL: reduce-scatter of 2P sums (float32), all-gather of the rows": (
                2 * numel * elem * (world - 1) / world + rows * (world - 1)
            ),
            "statistics, var=False, gloo: all-reduce of P sums and the rows": 2
            * (numel * elem + world * rows)
            * (world - 1)
            / world,
            "before this round: reduce-scatter of 2P float64 sums, all-gather of the rows": (
                2 * numel * 8 * (world - 1) / world + rows * 2 * (world - 1)
            ),
        },
        # measured: the bytes handed to every collective during one step, as a ring sends them
        "bytes_counted_per_rank": counted,
    }


RING = {  # bytes a rank sends in a ring collective, from the size of what it hands in
    "all_reduce": lambda size, world: 2 * size * (world - 1) / world,
    "reduce_scatter": lambda size, world: size * (world - 1) / world,
    "reduce_scatter_tensor": lambda size, world: size * (world - 1) / world,
    "all_gather": lambda size, world: size * (world - 1),
    "all_gather_into_tensor": lambda size, world: size * (world - 1),
    "reduce_scatter_single": lambda size, world: size * (world - 1) / world,  # FSDP2's, in torch 2.13
    "all_gather_single": lambda size, world: size * (world - 1),
}


def _payload(name: str, args, kwargs) -> int:
    """Bytes of the tensor a rank hands to collective ``name`` (its own part for gathers)."""
    if name in ("reduce_scatter",):
        parts = kwargs.get("input_list", args[1] if len(args) > 1 else [])
        return sum(t.numel() * t.element_size() for t in parts)
    if name in ("reduce_scatter_tensor", "all_gather_into_tensor", "reduce_scatter_single", "all_gather_single"):
        t = kwargs.get("input") if "input" in kwargs else kwargs.get("input_tensor", args[1] if len(args) > 1 else None)
    elif name == "all_gather":
        t = kwargs.get("tensor", args[1] if len(args) > 1 else None)
    else:
        t = kwargs.get("tensor", args[0] if args else None)
    return 0 if t is None else t.numel() * t.element_size()


class counting_bytes:
    """Wrap every ring collective of ``torch.distributed`` while the block runs; the result maps each
    collective's name to the bytes this rank sends (ring formulas, :data:`RING`), plus ``total``."""

    def __enter__(self) -> dict:
        self.sent: dict = {"total": 0.0}
        self.saved = {name: getattr(dist, name) for name in RING if hasattr(dist, name)}
        world = dist.get_world_size()
        for name, original in self.saved.items():

            def wrapped(*args, _name=name, _original=original, **kwargs):
                sent = RING[_name](_payload(_name, args, kwargs), world)
                self.sent[_name] = self.sent.get(_name, 0.0) + sent
                self.sent["total"] += sent
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self.sent

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(dist, name, original)


def worker(steps: int, batch: int, quick: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from cases import gpt2_problem, small_gpt2_problem

    torch.manual_seed(0)
    problem = (small_gpt2_problem if quick else gpt2_problem)(batch)
    load_before = os.getloadavg()
    record = measure(problem, steps, block=max(1, steps // 4))
    record["load_average_before"] = load_before
    record["load_average_after"] = os.getloadavg()
    record["case"] = "gpt2-small (2 layers, width 128, T=64)" if quick else "gpt2 (4 layers, width 256, T=128)"
    if dist.get_rank() == 0:
        print(
            ", ".join(
                f"{k} {v * 1e3:.1f} ms ({record['ratio_to_fsdp_plain'][k]:.2f}x)" for k, v in record["median_s"].items()
            ),
            flush=True,
        )
        with open(out, "w") as f:
            json.dump(record, f)
    dist.destroy_process_group()


def launch(args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = HERE / f".fsdp-overhead-{os.getpid()}.json"
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    )
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--out",
        str(out),
    ] + (["--quick"] if args.quick else [])
    procs = [subprocess.Popen(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(WORLD)]
    try:
        for p in procs:
            p.wait(timeout=args.timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode != 0 for p in procs) or not out.exists():
        raise SystemExit("fsdp_overhead: a worker failed (see its output above)")
    record = json.loads(out.read_text())
    out.unlink()
    return record


def combine(records: list[dict]) -> dict:
    """One record of several runs: the first run's fields, every run's medians and ratios, and the median
    over runs of each run's own ratio (``ratio_to_fsdp_plain``)."""
    out = dict(records[0])
    out["runs"] = [
        {k: r[k] for k in ("median_s", "ratio_to_fsdp_plain", "load_average_before", "load_average_after")}
        for r in records
    ]
    out["ratio_to_fsdp_plain"] = {
        k: statistics.median(r["ratio_to_fsdp_plain"][k] for r in records) for k in records[0]["ratio_to_fsdp_plain"]
    }
    out["median_s"] = {k: statistics.median(r["median_s"][k] for r in records) for k in records[0]["median_s"]}
    out["load_average_before"] = records[0]["load_average_before"]
    out["load_average_after"] = records[-1]["load_average_after"]
    return out


def markdown(record: dict) -> str:
    before = ", ".join(f"{v:.1f}" for v in record.get("load_average_before", ()))
    load = ", ".join(f"{v:.1f}" for v in record.get("load_average_after", os.getloadavg()))
    lines = [
        "# persample under FSDP2: cost per training step",
        "",
        (
            f"{record['world_size']} gloo processes × 1 thread, {record['case']}, B = "
            f"{record['batch_size_per_rank']} per rank, P = {record['parameters']:,}; torch {torch.__version__}; "
            f"load average {before} at the start, {load} at the end (a shared 2-core machine: ratios "
            "only, every method measured in the same run, interleaved)."
        ),
        "",
    ]
    runs = record.get("runs", [record])
    lines += [
        f"{len(runs)} run(s); load average (1 min) per run: "
        + ", ".join(f"{r['load_average_before'][0]:.1f} → {r['load_average_after'][0]:.1f}" for r in runs)
        + ".",
        "",
        "| method | median per step | ratio to fsdp-plain (median over runs) | ratio in each run |",
        "|---|---:|---:|---|",
    ]
    for k, v in record["median_s"].items():
        each = ", ".join(f"{r['ratio_to_fsdp_plain'][k]:.2f}" for r in runs)
        lines.append(f"| {k} | {v * 1e3:.1f} ms | {record['ratio_to_fsdp_plain'][k]:.2f}× | {each} |")
    lines += ["", "Bytes each rank sends per step, on paper (ring collectives, float32 parameters):", ""]
    lines += [f"- {k}: {v / 1e6:.2f} MB" for k, v in record["bytes_sent_per_rank"].items()]
    counted = record.get("bytes_counted_per_rank")
    if counted:
        lines += [
            "",
            "Bytes each rank sends in one step, counted (every torch.distributed collective wrapped while "
            "the step runs; ring formulas), in MB:",
            "",
            "| step | total | " + " | ".join(RING) + " |",
            "|---|---:|" + "---:|" * len(RING),
        ]
        for key, sent in counted.items():
            cells = " | ".join(f"{sent.get(name, 0.0) / 1e6:.2f}" for name in RING)
            lines.append(f"| {key} | {sent['total'] / 1e6:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method")
    parser.add_argument("--batch", type=int, default=8, help="examples per rank")
    parser.add_argument("--quick", action="store_true", help="the 2-layer GPT-2 at T = 64")
    parser.add_argument("--runs", type=int, default=1, help="independent runs (fresh processes); median ratio")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/fsdp-overhead-cpu.{json,md}")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.batch, args.quick, args.out)
        return
    record = combine([launch(args) for _ in range(args.runs)])
    text = markdown(record)
    print(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "fsdp-overhead-cpu.json").write_text(json.dumps(record, indent=2))
        (RESULTS / "fsdp-overhead-cpu.md").write_text(text)


if __name__ == "__main__":
    main()
