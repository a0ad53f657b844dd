"""Cost of the fast engine on mixture-of-experts models (issue 22): fast vs the per-example loop vs plain.

For each MoE family of the real-model matrix (Mixtral, Qwen2-MoE, OLMoE, GraniteMoE: Hugging Face 5's
3-D experts, ``experts_implementation="eager"``) and each batch size, one process measures, interleaved:

- ``plain``: ``loss_fn(model(x), y).backward()``;
- ``fast``: ``persample.grad_stats(..., engine="fast")``;
- ``loop``: ``persample.grad_stats(..., engine="loop")``;
- ``auto``: ``persample.grad_stats(...)`` (which engine it takes is printed by ``explain``).

Each is the minimum over ``--repeats`` calls of the process CPU time (``time.process_time``; run with
``OMP_NUM_THREADS=1`` so that it is the work of one thread), after one warm-up call. The machine is shared:
the minimum is the least disturbed call, and the load is printed. ``--ops`` also counts the aten ops of one
call (a ``TorchDispatchMode``): a count that does not swing with the load.

    OMP_NUM_THREADS=1 python benchmarks/moe_speed.py [--batch 4 32] [--family mixtral ...] [--ops] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import persample  # noqa: E402

FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "granitemoe")


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def case(family: str, batch: int, seq: int, hidden: int, dtype: torch.dtype):
    """A tiny MoE causal LM of the matrix's shape (4 experts, top-2, one layer), a batch of token ids."""
    import real_models as rm

    torch.manual_seed(0)
    extra = dict(hidden_size=hidden, max_position_embeddings=max(32, seq))
    model = rm.hf_model(family, "ForCausalLM", **extra).to(dtype)
    ids = torch.randint(3, rm.V, (batch, seq))
    labels = torch.randint(3, rm.V, (batch, seq))
    return model, {"input_ids": ids}, labels, rm.token_ce


def measure(family, batch, args) -> dict:
    model, inputs, targets, loss_fn = case(family, batch, args.seq, args.hidden, getattr(torch, args.dtype))

    def plain():
        model.zero_grad(set_to_none=True)
        loss_fn(model(**inputs), targets).backward()

    def engine(name):
        return lambda: persample.grad_stats(model, loss_fn, inputs, targets, engine=name)

    methods = {"plain": plain, "fast": engine("fast"), "loop": engine("loop"), "auto": engine("auto")}
    times = {m: float("inf") for m in methods}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in methods.values():
            f()
        for _ in range(args.repeats):
            for m, f in methods.items():
                start = time.process_time()
                f()
                times[m] = min(times[m], time.process_time() - start)
        ops = {}
        if args.ops:
            for m, f in methods.items():
                with _Ops() as counter:
                    f()
                ops[m] = counter.n
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            methods["fast"]()
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(args.profile_lines)
        chosen = persample.explain(model, loss_fn, inputs, targets)
    return dict(times=times, ops=ops, auto=chosen.entry_points["grad_stats"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", nargs="*", default=list(FAMILIES))
    p.add_argument("--batch", nargs="*", type=int, default=[4, 32])
    p.add_argument("--seq", type=int, default=6)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ops", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-lines", type=int, default=40)
    args = p.parse_args(argv)
    print(f"load average at start: {os.getloadavg()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print("| family | B | plain ms | fast × | loop × | auto × | auto takes | ops plain / fast / loop |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for family in args.family:
        for batch in args.batch:
            r = measure(family, batch, args)
            t = r["times"]
            ops = r["ops"]
            ops_s = f"{ops['plain']} / {ops['fast']} / {ops['loop']}" if ops else "–"
            print(
                f"| {family} | {batch} | {t['plain'] * 1e3:.2f} | {t['fast'] / t['plain']:.1f} | "
                f"{t['loop'] / t['plain']:.1f} | {t['auto'] / t['plain']:.1f} | {r['auto']} | {ops_s} |",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
