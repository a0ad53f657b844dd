"""Recipe: DDP with torchrun and a Tracker: the global gradient noise scale, logged from rank 0.

    torchrun --standalone --nproc_per_node 2 examples/recipe_ddp_torchrun.py           # CPU, gloo
    torchrun --standalone --nproc_per_node 2 examples/recipe_ddp_torchrun.py --plain   # loss.backward()
    torchrun --standalone --nproc_per_node 4 examples/recipe_ddp_torchrun.py           # CUDA: nccl, 1 GPU per rank

Each rank trains on its own shard of the data (DistributedSampler). ``tracker.step(x, y)``
replaces ``loss_fn(ddp_model(x), y).backward()``: p.grad is the mean over ranks, as DDP's
backward leaves it, and the hook receives the statistics of the global batch (all ranks'
examples). Two noise-scale estimates are logged:

- ``B_simple (per-example)``: B_small = 1, from the per-example gradient norms of the global batch;
- ``B_simple (rank-level)``: B_small = each rank's batch, B_big = the global batch
  (McCandlish et al. 2018, App. A.1), from the ranks' mean gradients only (needs 2 ranks or more).

Both are smoothed with :class:`persample.noise.NoiseScaleEMA`.
"""

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import persample
from persample import noise


def make_data(n=4096, dim=32, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 0.25
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", action="store_true", help="use loss.backward() instead of the Tracker")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--every", type=int, default=5, help="statistics every k steps")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    x, y = make_data()
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, sampler=sampler)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).to(device),
        device_ids=[device.index] if cuda else None,
    )
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    tracker = persample.Tracker(model, loss_fn, every=args.every)
    per_example, rank_level = noise.NoiseScaleEMA(0.9), noise.NoiseScaleEMA(0.9)

    def log(tracker, stats):  # every rank calls the hook with the same global statistics
        per_example.update(stats)
        line = f"B_simple (per-example) {per_example.value:8.1f}"
        if world > 1:
            rank_level.update(noise.rank_noise_scale(stats))
            line += f"   B_simple (rank-level) {rank_level.value:8.1f}"
        if rank == 0:
            print(
                f"step {tracker.steps:4d}  global batch {stats.n}  loss {stats.losses.mean():.4f}  {line}", flush=True
            )

    tracker.register_hook(log)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            if args.plain:
                loss_fn(model(inputs), targets).backward()
            else:
                tracker.step(inputs, targets)  # <- the only changed line
            optimizer.step()
        with torch.no_grad():
            acc = (model.module(x.to(device)).argmax(1) == y.to(device)).float().mean()
        if rank == 0:
            print(f"epoch {epoch}: accuracy {acc:.3f} ({world} ranks, {args.batch_size} examples per rank)", flush=True)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if rank == 0:  # tracker.step leaves p.grad as DDP's backward does, so the replicas never drift apart
        print(f"replicas identical on {world} ranks: {bool(torch.equal(low, high))}", flush=True)
    del tracker, model, optimizer  # release DDP's reducer (and its gloo state) before the process group
    gc.collect()
    dist.barrier()  # no rank tears gloo down while another still finishes its last collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
