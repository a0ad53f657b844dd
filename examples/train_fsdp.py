"""FSDP2 training of a small transformer with a Tracker: the global gradient noise scale, logged from rank 0.

    torchrun --nproc_per_node 2 examples/train_fsdp.py            # CPU, gloo
    torchrun --nproc_per_node 2 examples/train_fsdp.py --plain    # the same loop with loss.backward()
    torchrun --nproc_per_node 2 examples/train_fsdp.py --observe  # statistics from your own backward
    torchrun --nproc_per_node N examples/train_fsdp.py            # on a CUDA machine: nccl, one GPU per rank

A tiny GPT-2 (Hugging Face, built from a config: no download) with tied embedding and LM head is
sharded with FSDP2: ``fully_shard`` on every block, then on the root. Each rank trains on its own
padded token batches. ``tracker.step(inputs, labels)`` replaces
``loss_fn(model(**inputs), labels).backward()``: it runs FSDP2's own forward and backward, so
``p.grad`` is FSDP2's sharded gradient, and the hook receives the exact statistics of the global
batch (all ranks' examples) for the per-example loss L_i = Σ_t ℓ_it (``persample.causal_lm_loss``,
a token mean over the padded batch). Two noise-scale estimates are logged, smoothed with
:class:`persample.noise.NoiseScaleEMA`: the per-example one (B_small = 1) and, with 2 ranks or more,
the rank-level one (B_small = each rank's batch).
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import persample
from persample import noise


def token_batch(n, length, vocab, generator):
    """Right-padded sequences from a tiny 'language' (each token the previous one + 1, mod vocab, with
    noise), their attention mask, and labels with -100 on the padding."""
    start = torch.randint(0, vocab, (n, 1), generator=generator)
    steps = 1 + (torch.rand(n, length, generator=generator) < 0.1).long()
    ids = (start + steps.cumsum(1)) % vocab
    lengths = torch.randint(length // 2, length + 1, (n,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", action="store_true", help="use loss.backward() instead of the Tracker")
    parser.add_argument("--observe", action="store_true", help="tracker.observe around your own backward")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--every", type=int, default=4, help="statistics every k steps")
    args = parser.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)

    torch.manual_seed(0)  # the same initial weights on every rank
    vocab, length = 64, 32
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=vocab,
        n_positions=length,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).to(device)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)  # the root too: one FSDP2 root drives the forward and the backward
    loss_fn = persample.causal_lm_loss()  # token mean over the batch; L_i = example i's summed token loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

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
                f"step {tracker.steps:4d}  global batch {stats.n}  mean L_i {stats.losses.mean():7.3f}  {line}",
                flush=True,
            )

    tracker.register_hook(log)
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    for _ in range(args.steps):
        inputs, labels = token_batch(args.batch_size, length, vocab, generator)
        inputs, labels = {k: v.to(device) for k, v in inputs.items()}, labels.to(device)
        optimizer.zero_grad()
        if args.plain:
            loss_fn(model(**inputs), labels).backward()
        elif args.observe:
            with tracker.observe(labels):
                loss_fn(model(**inputs), labels).backward()
        else:
            tracker.step(inputs, labels)  # <- the only changed line
        optimizer.step()
    if rank == 0:
        print(f"done: {args.steps} steps on {world} ranks, {args.batch_size} sequences per rank", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
