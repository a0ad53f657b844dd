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

Where the time goes, per rank (for a loaded, shared machine):

- ``--cpu``: each rank times its own CPU (``time.process_time``: every thread of the process, gloo's
  included) instead of the wall clock, and every rank's ratios are printed and saved
  (``ratio_to_fsdp_plain_per_rank``);
- ``--only M`` (repeatable): time only ``fsdp-plain`` and these methods;
- ``--profile parts --only M``: no timing table; each rank prints the median over ``--steps`` steps of
  its CPU time inside each function of :data:`PARTS` (persample's stages, FSDP2's collectives and hooks;
  inclusive, measured by wrappers, not cProfile, which inflates Python-heavy code several times), the
  cyclic collector's time and the minor page faults of a step;
- ``--profile M`` (repeatable): cProfile with ``time.process_time`` of ``fsdp-plain`` and ``M`` on each
  rank, the minimum over steps of each function's cumulative time (as ``profile_parts.py``).

    OMP_NUM_THREADS=1 python benchmarks/fsdp_overhead.py --profile parts --only tracker-novar --steps 9
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


CLOCK = time.perf_counter  # --cpu: time.process_time, this rank's own CPU time (all its threads)


def timed(fn) -> float:
    dist.barrier()
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def sharded(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def plain_forward(model, loss_fn, x, y):
    """FSDP2's forward and the loss (a function of its own, so that ``--profile parts`` can time it)."""
    return loss_fn(model(x), y)


def measure(problem, steps: int, block: int, only: list[str] | None = None, profile: list[str] | None = None) -> dict:
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
        plain_forward(models["plain"], loss_fn, x, y).backward()
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
    if only:
        methods = {k: fn for k, fn in methods.items() if k == "fsdp-plain" or k in only}
    for fn in methods.values():  # warm up
        fn()
        fn()
    if profile == ["parts"]:
        return {"parts": timed_parts(methods, steps)}
    if profile:
        return {"profile": profiled({k: methods[k] for k in ["fsdp-plain", *profile]}, steps)}
    counted = {}
    for key in ("fsdp-plain", "tracker", "tracker-novar", "tracker-every-10", "reduce_scatter_stats"):
        if key not in methods:
            continue
        with counting_bytes() as sent:
            methods[key]()
        counted[key] = sent
    times = {k: [] for k in methods}
    while len(times["fsdp-plain"]) < steps:
        for key, fn in methods.items():
            for _ in range(block):
                times[key].append(timed(fn))
    medians = {k: statistics.median(v) for k, v in times.items()}
    every_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, {k: v / medians["fsdp-plain"] for k, v in medians.items()})
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
        "ratio_to_fsdp_plain_per_rank": every_rank,
        "clock": CLOCK.__name__,
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


PARTS = (  # (module, attribute path): functions whose CPU time --parts adds up per step (inclusive)
    ("__main__", "plain_forward"),
    ("torch.optim", "SGD.step"),
    ("torch.distributed", "all_reduce"),
    ("torch.distributed", "all_gather"),
    ("torch.distributed", "all_gather_into_tensor"),
    ("persample._data_parallel", "fsdp2_step"),
    ("persample._data_parallel", "observed_fsdp2_backward"),
    ("persample._data_parallel", "agree"),
    ("persample._data_parallel", "agree_on_examples"),
    ("persample._batch", "as_batch"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "foreach_all_gather"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "foreach_all_gather_copy_out"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "foreach_reduce"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup.pre_forward"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup.post_forward"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup.pre_backward"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "FSDPParamGroup.post_backward"),
    ("torch.distributed.fsdp._fully_shard._fsdp_state", "FSDPState._root_post_backward_final_callback"),
    ("persample.tracker", "Tracker.step"),
    ("persample._model", "trainable_parameters"),
    ("persample.tracker", "Tracker._publish"),
    ("persample.stats", "GradStats.is_finite"),
    ("persample.distributed", "_agreed_headers"),
    ("persample.distributed", "_local_shard_sums"),
    ("persample.engines.fast.watchers", "_BroadcastWatcher.__torch_function__"),
    ("persample.engines.fast.watchers", "_UserCodeWatcher.__torch_function__"),
    ("torch", "Tensor.backward"),
    ("persample._batch", "Batch.call"),
    ("persample._sharding", "unshard_all"),
    ("persample._sharding", "restore_sharding"),
    ("persample.distributed", "agree"),
    ("persample._data_parallel", "_skipped_products"),
    ("persample._data_parallel", "_write_formed_sums"),
    ("persample._data_parallel", "LocalGradients.show_local"),
    ("persample._data_parallel", "_reduced_sums"),
    ("persample._data_parallel", "Replicas.reduce_stats"),
    ("persample._torch_compat", "FSDP2Reduction.reduce"),
    ("persample.engines.fast.observe", "_observed_stats"),
    ("persample.engines.fast.observe", "formed_parameters"),
    ("persample.engines.fast.observe", "_check_reduction"),
    ("persample.engines.fast.observe", "_pieces_by_parameter"),
    ("persample.engines.fast.observe", "_formed_sums"),
    ("persample.engines.fast.observe", "_check_against_grad"),
    ("persample.engines.fast.observe", "reduce_pieces"),
    ("persample.engines.fast.observe", "audit_graph"),
    ("persample.engines.fast.observe", "rows_check"),
    ("persample.engines.fast.pieces", "Piece.moments"),
    ("persample.engines.fast.pieces", "OuterPiece._unscaled"),
    ("persample.engines.fast.pieces", "_column_sums"),
    ("persample.engines.fast.pieces", "_sq_norms"),
    ("persample.engines.fast.pieces", "_accumulate"),
)


def timed_parts(methods: dict, calls: int) -> dict:
    """Per method, the median over ``calls`` steps of this rank's CPU time (``time.process_time``) inside each
    function of :data:`PARTS` (inclusive; a recursive call counted once), and of the whole step."""
    import importlib
    import resource

    spent: dict[str, float] = {}
    depth: dict[str, int] = {}
    saved = []
    for module_name, path in PARTS:
        owner = importlib.import_module(module_name)
        *outer, attr = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)

        def wrapped(*args, _key=path, _original=original, **kwargs):
            depth[_key] = depth.get(_key, 0) + 1
            start = time.process_time()
            try:
                return _original(*args, **kwargs)
            finally:
                depth[_key] -= 1
                if not depth[_key]:
                    spent[_key] = spent.get(_key, 0.0) + time.process_time() - start

        saved.append((owner, attr, original))
        setattr(owner, attr, wrapped)
    per_call: dict[str, dict[str, list[float]]] = {k: {} for k in methods}
    import gc

    gc_started: list[float] = []

    def on_gc(phase, info):  # the cyclic garbage collector's own time, by generation
        if phase == "start":
            gc_started.append(time.process_time())
        elif gc_started:
            key = f"(gc gen {info['generation']})"
            spent[key] = spent.get(key, 0.0) + time.process_time() - gc_started.pop()
            spent[key + " count"] = spent.get(key + " count", 0.0) + 1e-3

    gc.callbacks.append(on_gc)
    try:
        for _ in range(calls):
            for key, fn in methods.items():
                spent.clear()
                dist.barrier()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.process_time()
                fn()
                spent["(step)"] = time.process_time() - start
                spent["(minor page faults, thousands: the number in ms)"] = (
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                ) * 1e-6
                for part, seconds in spent.items():
                    per_call[key].setdefault(part, []).append(seconds)
    finally:
        gc.callbacks.remove(on_gc)
        for owner, attr, original in saved:
            setattr(owner, attr, original)
    return {k: {part: statistics.median(v) for part, v in parts.items()} for k, parts in per_call.items()}


def profiled(methods: dict, calls: int, top: int = 500) -> str:
    """cProfile of each method on this rank with ``time.process_time`` as its clock, one fresh profile per
    call, methods interleaved; per function the minimum over calls of its cumulative time (as
    ``profile_parts.py``). The text of the ``top`` functions per method."""
    import cProfile
    import pstats

    best: dict[str, dict] = {k: {} for k in methods}
    totals = {k: float("inf") for k in methods}
    for _ in range(calls):
        for key, fn in methods.items():
            dist.barrier()
            prof = cProfile.Profile(time.process_time)
            start = time.process_time()
            prof.enable()
            fn()
            prof.disable()
            totals[key] = min(totals[key], time.process_time() - start)
            for (filename, line, name), (_, n, tottime, cumtime, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
                where = f"{filename.split('/site-packages/')[-1].split('/wt/')[-1]}:{line}:{name}"
                old = best[key].get(where)
                if old is None or cumtime < old[0]:
                    best[key][where] = (cumtime, tottime, n)
    lines = []
    for key in methods:
        lines.append(f"== {key}: min process time per call {totals[key] * 1e3:.1f} ms (under cProfile)")
        rows = sorted(best[key].items(), key=lambda kv: -kv[1][0])[:top]
        lines += [f"  {cum * 1e3:8.1f} cum {tot * 1e3:8.1f} self {n:6d}  {where}" for where, (cum, tot, n) in rows]
        lines.append(f"-- {key}: by self time")
        rows = sorted(best[key].items(), key=lambda kv: -kv[1][1])[: top // 2]
        lines += [f"  {cum * 1e3:8.1f} cum {tot * 1e3:8.1f} self {n:6d}  {where}" for where, (cum, tot, n) in rows]
    return "\n".join(lines)


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


def worker(steps: int, batch: int, quick: bool, out: str, only=None, profile=None, cpu=False) -> None:
    global CLOCK
    if cpu:
        CLOCK = time.process_time
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from cases import gpt2_problem, small_gpt2_problem

    torch.manual_seed(0)
    problem = (small_gpt2_problem if quick else gpt2_problem)(batch)
    load_before = os.getloadavg()
    record = measure(problem, steps, block=max(1, steps // 4), only=only, profile=profile)
    if profile:
        text = record.get("profile") or "\n".join(
            f"== {key}: median CPU ms per step\n"
            + "\n".join(
                f"  {seconds * 1e3:8.1f}  {part}" for part, seconds in sorted(parts.items(), key=lambda kv: -kv[1])
            )
            for key, parts in record["parts"].items()
        )
        Path(f"{out}.rank{dist.get_rank()}.prof.txt").write_text(text)
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(record))
        dist.destroy_process_group()
        return
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
        for rank, ratios in enumerate(record["ratio_to_fsdp_plain_per_rank"]):
            print(
                f"rank {rank} ({CLOCK.__name__}): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()), flush=True
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
    command += ["--cpu"] if args.cpu else []
    command += [a for m in args.only or [] for a in ("--only", m)]
    command += [a for m in args.profile or [] for a in ("--profile", m)]
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
    if args.profile:
        for rank in range(WORLD):
            prof = Path(f"{out}.rank{rank}.prof.txt")
            print(f"######## rank {rank}\n" + prof.read_text())
            prof.unlink()
        raise SystemExit(0)
    return record


def combine(records: list[dict]) -> dict:
    """One record of several runs: the first run's fields, every run's medians and ratios, and the median
    over runs of each run's own ratio (``ratio_to_fsdp_plain``)."""
    out = dict(records[0])
    out["runs"] = [
        {
            k: r[k]
            for k in (
                "median_s",
                "ratio_to_fsdp_plain",
                "ratio_to_fsdp_plain_per_rank",
                "load_average_before",
                "load_average_after",
            )
            if k in r
        }
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
    parser.add_argument("--cpu", action="store_true", help="time each rank's CPU (process_time), not the wall clock")
    parser.add_argument("--only", action="append", help="time only fsdp-plain and these methods (repeatable)")
    parser.add_argument(
        "--profile",
        action="append",
        help="cProfile (process time) fsdp-plain and these methods on each rank; --profile parts: the CPU time "
        "of each function of PARTS in the --only methods, per rank, without cProfile",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.batch, args.quick, args.out, args.only, args.profile, args.cpu)
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
