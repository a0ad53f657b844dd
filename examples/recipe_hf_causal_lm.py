"""Recipe: a Hugging Face causal LM with a padded batch, in training mode (dropout on).

``persample.causal_lm_loss()`` is the token-mean loss HF models compute, paired with
its per-example part (each sequence's summed token loss), so ``tracker.step`` writes
exactly HF's gradient into ``p.grad`` while the statistics describe each sequence.
Padding is masked in the labels (``-100``) and the attention mask. The model is a
tiny GPT-2 built from a config (no download); use ``from_pretrained`` for a real one.
"""

import torch
import transformers

import persample


def main(steps: int = 3) -> list[float]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).train()  # dropout 0.1, as in real training
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = persample.causal_lm_loss()  # HF's loss, with its per-example part
    tracker = persample.Tracker(model, loss_fn)  # default arguments: dropout works

    b_simple = []
    for _ in range(steps):
        ids = torch.randint(0, 100, (8, 16))
        lengths = torch.randint(6, 17, (8,))
        mask = (torch.arange(16) < lengths[:, None]).long()  # right padding
        labels = ids.masked_fill(mask == 0, -100)  # padding is not predicted
        optimizer.zero_grad()
        stats = tracker.step({"input_ids": ids, "attention_mask": mask}, labels)
        optimizer.step()
        noise = persample.noise.gradient_noise_scale(stats)
        b_simple.append(noise.b_simple)
        shown = f"{noise.b_simple:.3g}" if noise.b_simple > 0 else "below noise (random tokens: no signal)"
        print(
            f"per-sequence summed token loss {stats.losses.mean():.2f} (HF's token-mean loss "
            f"{loss_fn(model(input_ids=ids, attention_mask=mask), labels):.3f}), "
            f"median ‖g_i‖ {stats.norms.median():.3g}, B_simple {shown}"
        )
    return b_simple


if __name__ == "__main__":
    main()
