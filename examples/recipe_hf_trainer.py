"""Recipe: a Hugging Face Trainer run with per-example gradient statistics, one added line.

    pip install -e ".[hf]"                       # transformers + accelerate
    python examples/recipe_hf_trainer.py         # tiny GPT-2 from a config (no download), CPU, < 1 minute

The causal-LM loss is Hugging Face's own (token mean over the padded batch, with
num_items_in_batch across 2 accumulation steps, max_grad_norm clipping);
persample observes its backward and logs persample/b_simple etc. through
trainer.log, so TensorBoard / W&B would get them too.
"""

import tempfile
import warnings

import torch
import transformers

from persample.integrations.transformers import track


def dataset(n=64, length=24, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start, step = int(torch.randint(0, vocab, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        ids = (start + step * torch.arange(length)) % vocab
        keep = int(torch.randint(length // 2, length + 1, (1,), generator=g))
        mask = (torch.arange(length) < keep).long()
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def main():
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-trainer-"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=12,
        learning_rate=3e-3,
        max_grad_norm=1.0,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset())
    callback = track(trainer)  # <- the one added line
    trainer.train()
    rows = [h for h in trainer.state.log_history if "persample/b_simple" in h]
    print(f"{'step':>4}  {'B_simple':>9}  {'EMA':>7}")
    for h in rows:
        print(f"{h['step']:4d}  {h['persample/b_simple']:9.4g}  {h['persample/b_simple_ema']:7.4g}")
    print(f"{len(rows)} optimizer steps logged persample/b_simple through trainer.log")
    print(f"last optimizer step: {callback.last_stats}")
    return rows


if __name__ == "__main__":
    main()
