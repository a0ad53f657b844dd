"""A nanoGPT-style loop: token-level loss over a padded batch, bf16 autocast, gradient accumulation,
and the gradient noise scale logged as it trains (CPU, well under a minute).

    python examples/nanogpt_token_loss.py [--steps 30] [--accumulation 4]

The batch loss is the mean over every non-padded token of the accumulated batch,
L = (1/N_tokens) Σ_i Σ_t ℓ_it, exactly what `loss.backward()` would use; persample
describes each sequence by its summed token loss, g_i = ∇ Σ_t ℓ_it
(persample.causal_lm_loss), and p.grad is the loop's own gradient on every step.
"""

import argparse
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.noise import NoiseScaleEMA, gradient_noise_scale


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=64, block=32, dim=64, layers=2, heads=4):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, block, dim))  # learned positions, broadcast over the batch
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def batches(vocab, block, batch, generator):
    """Sequences of a toy language (a noisy arithmetic progression), right-padded to `block`."""
    while True:
        start = torch.randint(0, vocab, (batch, 1), generator=generator)
        step = torch.randint(1, 4, (batch, 1), generator=generator)
        tokens = (start + step * torch.arange(block)) % vocab
        noise = torch.rand(batch, block, generator=generator) < 0.1
        tokens = torch.where(noise, torch.randint(0, vocab, (batch, block), generator=generator), tokens)
        lengths = torch.randint(block // 2, block + 1, (batch,), generator=generator)
        labels = tokens.masked_fill(torch.arange(block) >= lengths[:, None], -100)
        yield tokens, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*batching rule.*")  # torch.func on CPU attention: slower, exact
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data = batches(64, 32, args.micro_batch, torch.Generator().manual_seed(0))
    ema = NoiseScaleEMA()
    # batch loss: the summed token loss (divided below); per-example part: each sequence's summed token loss
    tracker = persample.Tracker(model, persample.causal_lm_loss(reduction="sum"))
    print(
        f"{'step':>4}  {'loss':>6}  {'B_simple':>9}  {'EMA':>7}  (examples per optimizer step: "
        f"{args.micro_batch * args.accumulation})"
    )
    for step in range(args.steps):
        micro = [next(data) for _ in range(args.accumulation)]
        num_items = sum(int((y[:, 1:] != -100).sum()) for _, y in micro)  # tokens of the accumulated batch
        with tracker.accumulate() as acc:
            for x, y in micro:
                # the plain loop:  (summed_token_loss(model(x), y) / num_items).backward()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    tracker.step(x, y, scale=1 / num_items)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # after the statistics were taken
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if acc.stats is not None:
            scale = gradient_noise_scale(acc.stats)
            ema.update(scale)
            loss = float(acc.stats.losses.sum()) / num_items
            if step % 5 == 0 or step == args.steps - 1:
                print(f"{step:4d}  {loss:6.3f}  {scale.b_simple:9.4g}  {ema.value:7.4g}")
    assert math.isfinite(ema.value)


if __name__ == "__main__":
    main()
