"""The local (non-network) work of ``persample.distributed.reduce_scatter_stats``, alone.

One process, a gloo group of world size 1 (the collectives are then copies), statistics of the
GPT-2 case's parameter shapes (P = 3.45 M, float32, n = 8: the per-rank batch of
``fsdp_overhead.py``), with a mean small against the spread as in training. cProfile with
``time.process_time`` on one thread, the minimum over calls: packing the fused buffer, the slot copy,
the cancellation flags, the float64 global sums. With W ranks the packing is still P-sized and the rest
P/W-sized, so this is an upper bound of one rank's local work.

    OMP_NUM_THREADS=1 python benchmarks/fsdp_reduce_local.py [--calls 5] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch
import torch.distributed as dist

import persample
from persample.distributed import reduce_scatter_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    options = parser.parse_args()
    import transformers

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000, n_positions=128)
    shapes = {n: p.shape for n, p in transformers.GPT2LMHeadModel(config).named_parameters()}
    n = 8
    stats = persample.GradStats(
        n=n,
        mean={k: torch.randn(s) * 0.05 for k, s in shapes.items()},
        m2={k: torch.rand(s) * n for k, s in shapes.items()},
        param_sq_norms={k: torch.rand(n) for k in shapes},
        losses=torch.rand(n),
    )
    for _ in range(2):
        reduce_scatter_stats(stats)
    best, kept = float("inf"), None
    for _ in range(options.calls):
        profile = cProfile.Profile(time.process_time)
        start = time.process_time()
        profile.enable()
        reduce_scatter_stats(stats)
        profile.disable()
        spent = time.process_time() - start
        if spent < best:
            best, kept = spent, profile
    print(
        f"reduce_scatter_stats, local work: {best * 1e3:.1f} ms process time (min of {options.calls}), "
        f"P = {sum(s.numel() for s in shapes.values()) / 1e6:.2f} M"
    )
    pstats.Stats(kept).sort_stats("tottime").print_stats(options.top)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
