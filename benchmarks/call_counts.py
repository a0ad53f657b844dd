"""Deterministic per-call costs: Python function calls and host-device synchronisations.

Timing on a shared machine swings from run to run; these counts do not. For every benchmark case and
every entry point (``grad_stats(engine="fast")`` with and without the variance, ``Tracker.step`` on a
statistics step and on a plain step, ``Tracker.observe``) this script reports, for one call after two
warm-up calls:

- ``py_calls``: Python function calls (``sys.setprofile`` "call" events, C calls not counted);
- ``syncs``: host-device synchronisations (``plain``, a forward and backward without persample, gives the
  model's own, which every entry point includes), counted by :class:`SyncCounter`, a ``TorchDispatchMode`` that
  sees every aten op: ``_local_scalar_dense`` (``.item()``, ``bool(t)``, ``float(t)``), ``is_nonzero``,
  ``equal``, ``nonzero`` and the ops whose output shape depends on the data (``masked_select``,
  ``unique``, ...). On CPU nothing stalls, but the same ops stall a CUDA stream.

    python benchmarks/call_counts.py [--case mlp] [--json OUT.json] [--markdown OUT.md]
    OMP_NUM_THREADS=1 python benchmarks/call_counts.py --case mlp-b32 --time 9   # + CPU ms per call

``--time N`` adds ``cpu_ms``: the minimum over N calls of ``time.process_time`` per call (one thread), the
entry points interleaved round by round, so that a loaded machine disturbs every entry point alike. The
CPU time of this process swings far less with the other processes than wall time; it is still a time.

``tests/test_benchmarks.py`` runs :func:`count` on the small cases and keeps the syncs at their targets:
at most 1 per statistics step (the cancellation flag of one-pass second moments), 0 per plain step.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cases
import persample

__all__ = ["SyncCounter", "count", "cpu_times", "entry_points", "SYNC_OPS", "HOST_METHODS"]

# aten ops (overload packets) that make the host wait for the device: a scalar read, a comparison
# answered on the host, or an output whose shape depends on the data.
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "equal",
        "nonzero",
        "nonzero_static",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "repeat_interleave",
        "bincount",
        "histc",
        "_assert_async",
        "allclose",
        "is_same_size",
        "_nested_tensor_from_mask",
    }
)


def _sync_op(func) -> str | None:
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        if name == "repeat_interleave" and func.__name__.endswith("output_size"):
            return None
        return name
    return None


# Tensor methods that copy to the host. On CPU they dispatch no aten op (the data is already there), so
# the dispatch mode cannot see them; on a GPU each is a synchronising device-to-host copy when the tensor
# lives on the device. They are counted at the method (an upper bound: a tensor already on the host costs
# nothing there).
HOST_METHODS = ("tolist", "cpu", "numpy")


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops in :data:`SYNC_OPS` and the calls of :data:`HOST_METHODS` run while active
    (``.counts``: name -> calls; ``.total``: their sum).

    >>> with SyncCounter() as c:
    ...     _ = torch.ones(3).sum().item()
    >>> c.total
    1
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _sync_op(func)
        if name is not None:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    def _counting(self, name: str, method):
        def counted(t, *args, **kwargs):
            self.counts["Tensor." + name] += 1
            return method(t, *args, **kwargs)

        return counted

    def __enter__(self):
        for name in HOST_METHODS:
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, saved in self._saved.items():
                if saved is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, saved)
            self._saved.clear()

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _clear(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def entry_points(problem: cases.Problem) -> dict[str, Callable[[], object]]:
    """One call of each measured entry point on its own copy of ``problem.model``. The Tracker's
    ``every=2`` makes its calls alternate statistics step, plain step (see :func:`count`)."""
    out: dict[str, Callable[[], object]] = {}
    plain_model = copy.deepcopy(problem.model)

    def plain(model=plain_model):  # the model's own host reads (a mask built with .item(), ...): the floor
        _clear(model)
        problem.mean_loss(model).backward()

    out["plain"] = plain
    for var in (True, False):
        model = copy.deepcopy(problem.model)

        def stats(model=model, var=var):
            return persample.grad_stats(model, problem.loss_fn, problem.inputs, problem.targets, engine="fast", var=var)

        out["grad_stats-fast" + ("" if var else "-novar")] = stats

        model = copy.deepcopy(problem.model)
        tracker = persample.Tracker(model, problem.loss_fn, var=var)

        def observe(model=model, tracker=tracker):
            _clear(model)
            with tracker.observe(problem.targets) as observed:
                problem.mean_loss(model).backward()
            return observed.stats

        out["observe" + ("" if var else "-novar")] = observe

    model = copy.deepcopy(problem.model)
    tracker = persample.Tracker(model, problem.loss_fn, every=2)

    def step(model=model, tracker=tracker):
        _clear(model)
        return tracker.step(problem.inputs, problem.targets)

    out["tracker-step"] = step
    return out


def _python_calls(call: Callable[[], object]) -> int:
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return calls - 1  # the call itself is not the library's


def count(problem: cases.Problem, only: list[str] | None = None) -> dict[str, dict]:
    """``{entry point: {"py_calls": n, "syncs": n, "sync_ops": {...}}}`` for one call after two warm-up
    calls; ``tracker-step`` gives ``tracker-step-stats`` (a statistics step) and ``tracker-step-plain``."""
    out: dict[str, dict] = {}
    with SyncCounter():  # a dispatch mode's first op imports torch._dynamo (and torch.distributed): before counting
        torch.ones(1).add(1)
    for name, call in entry_points(problem).items():
        if only and not any(s in name for s in only):
            continue
        labels = [name + "-stats", name + "-plain"] if name == "tracker-step" else [name]
        for _ in range(2):  # warm-up (for the Tracker: a statistics step, then a plain step)
            call()
        calls = [_python_calls(call) for _ in labels]  # the Tracker: a statistics step, then a plain one
        counters = []
        for _ in labels:
            with SyncCounter() as counter:
                call()
            counters.append(counter)
        for label, n, counter in zip(labels, calls, counters):
            out[label] = {"py_calls": n, "syncs": counter.total, "sync_ops": dict(counter.counts)}
    return out


def cpu_times(problem: cases.Problem, calls: int, only: list[str] | None = None) -> dict[str, float]:
    """``{entry point: minimum CPU milliseconds of one call over calls}`` (``time.process_time``), after two
    warm-up calls, the entry points interleaved round by round; ``tracker-step`` gives
    ``tracker-step-stats`` and ``tracker-step-plain``, as :func:`count` does."""
    steps = {name: call for name, call in entry_points(problem).items() if not only or any(s in name for s in only)}
    for call in steps.values():
        for _ in range(2):
            call()
    best: dict[str, float] = {}
    for _ in range(calls):
        for name, call in steps.items():
            for label in [name + "-stats", name + "-plain"] if name == "tracker-step" else [name]:
                start = time.process_time()
                call()
                spent = (time.process_time() - start) * 1e3
                best[label] = min(best.get(label, spent), spent)
    return best


def _markdown(results: dict[str, dict[str, dict]]) -> str:
    timed = any("cpu_ms" in r for per in results.values() for r in per.values())
    lines = [
        "| case | entry point | Python calls | syncs | sync ops |" + (" CPU ms (min) |" if timed else ""),
        "|---|---|---:|---:|---|" + ("---:|" if timed else ""),
    ]
    for case, per in results.items():
        for name, r in per.items():
            ops = ", ".join(f"{k} {v}" for k, v in sorted(r["sync_ops"].items())) or "-"
            ms = f" {r['cpu_ms']:.2f} |" if "cpu_ms" in r else (" |" if timed else "")
            lines.append(f"| {case} | {name} | {r['py_calls']} | {r['syncs']} | {ops} |" + ms)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", help="cases whose label contains this (default: all but --large)")
    p.add_argument("--entry", action="append", help="entry points whose name contains this")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--time", type=int, default=0, metavar="N", help="also the minimum CPU ms per call over N calls")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    selected = cases.select_cases(cases.all_cases(), args.case)
    results = {}
    for case in selected:
        results[case.label] = count(case.build(args.device), args.entry)
        if args.time:
            for label, ms in cpu_times(case.build(args.device), args.time, args.entry).items():
                results[case.label][label]["cpu_ms"] = ms
    table = _markdown(results)
    print(table, end="")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(f"# Per-call counts (torch {torch.__version__}, {args.device})\n\n" + table)
    return results


if __name__ == "__main__":
    main()
