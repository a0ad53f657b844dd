"""Deterministic per-call costs of each method, op by op: aten op counts, matmul FLOPs and bytes touched.

Timing on a shared machine swings from run to run; these counts do not. For one call of each method of
``methods.py`` (after two warm-up calls) a ``TorchDispatchMode`` sees every aten op and adds up:

- ``ops``: aten ops that compute (views, ``detach``, ``empty`` and kin left out);
- ``GFLOP``: 2·m·n·k of every ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``mv``, ``addmv`` (the rest is
  memory-bound: its cost is the bytes it moves);
- ``MB``: bytes of every tensor argument and result of those ops, a proxy for memory traffic (an op that
  writes a tensor of the output's size shows up twice as large as one that only reads it).

``--where`` splits the table by the persample (or benchmark, or transformers) line that called each op.

    python benchmarks/op_costs.py --case gpt2 [--method persample-stats-fast ...] [--where] [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import cases
import methods

__all__ = ["OpCosts"]

_NO_WORK = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "_reshape_alias",
        "transpose",
        "t",
        "expand",
        "select",
        "slice",
        "unsqueeze",
        "squeeze",
        "permute",
        "as_strided",
        "alias",
        "detach",
        "split",
        "split_with_sizes",
        "unbind",
        "narrow",
        "chunk",
        "diagonal",
        "view_as",
        "lift_fresh",
        "empty",
        "empty_like",
        "new_empty",
        "empty_strided",
    }
)


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _flops(name: str, args) -> int:
    """2·m·n·k of a matrix product (the batch of a bmm included), else 0."""
    if name in ("mm", "bmm"):
        return 2 * args[0].numel() * args[1].shape[-1]
    if name in ("addmm", "baddbmm"):
        return 2 * args[1].numel() * args[2].shape[-1]
    if name == "mv":
        return 2 * args[0].numel()
    if name == "addmv":
        return 2 * args[1].numel()
    return 0


class OpCosts(TorchDispatchMode):
    """Counts, FLOPs and bytes per aten op (and per calling line with ``where``)."""

    def __init__(self, where: bool = False):
        super().__init__()
        self.where = where
        self.count: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self.flops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _NO_WORK:
            return out
        moved = sum(_bytes(t) for t in tree_flatten((args, kwargs))[0]) + sum(_bytes(t) for t in tree_flatten(out)[0])
        key = (self._caller(), name) if self.where else name
        self.count[key] += 1
        self.bytes[key] += moved
        self.flops[key] += _flops(name, args)
        return out

    @staticmethod
    def _caller() -> str:
        for frame in reversed(traceback.extract_stack(limit=40)[:-3]):
            if any(part in frame.filename for part in ("/persample/", "/benchmarks/", "transformers")):
                return f"{os.path.basename(frame.filename)}:{frame.lineno}:{frame.name}"
        return "?"

    def table(self, top: int) -> list[str]:
        rows = sorted(self.bytes, key=lambda k: -self.bytes[k])[:top]
        return [
            f"  {' '.join(k) if isinstance(k, tuple) else k:70s} n={self.count[k]:5d} "
            f"MB={self.bytes[k] / 1e6:9.1f} GFLOP={self.flops[k] / 1e9:7.3f}"
            for k in rows
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="gpt2", help="the first case whose label starts with this")
    parser.add_argument("--method", action="append", help="a method's name (repeatable; default: a set)")
    parser.add_argument("--where", action="store_true", help="split by the calling line")
    parser.add_argument("--top", type=int, default=0, help="list the N ops (or lines) that move the most bytes")
    options = parser.parse_args()
    case = next(c for c in cases.all_cases(large=True) if c.label.startswith(options.case))
    problem = case.build()
    known = {m.name: m for m in methods.all_methods()}
    names = options.method or [
        "plain",
        "torch.func",
        "persample-grads",
        "persample-stats-fast",
        "persample-stats-fast-novar",
        "persample-observe",
        "persample-observe-novar",
    ]
    print(f"| {case.label} | ops | GFLOP | MB touched |\n|---|---:|---:|---:|")
    details = []
    for name in names:
        step = known[name].prepare(problem).step
        step()
        step()
        with OpCosts(options.where) as costs:
            step()
        total = (sum(costs.count.values()), sum(costs.flops.values()) / 1e9, sum(costs.bytes.values()) / 1e6)
        print(f"| {name} | {total[0]} | {total[1]:.3f} | {total[2]:.1f} |")
        if options.top:
            details += [f"{name}:"] + costs.table(options.top)
    print("\n".join(details))


if __name__ == "__main__":
    main()
