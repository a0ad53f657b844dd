"""Recipe: a Lightning run with per-example gradient statistics, one callback.

    pip install -e ".[lightning]"
    python examples/recipe_lightning.py      # CPU, bf16-mixed, accumulate_grad_batches=2, < 1 minute

``PersampleCallback(loss_fn)`` observes Lightning's own forward and backward (training is identical
with or without it), merges the micro-batches of each optimizer step and logs ``persample/...``
through ``pl_module.log``; ``callback.diagnostics.rows`` keeps the rows.
"""

import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from persample.integrations.lightning import PersampleCallback


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main():
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 0.5
    y = torch.randint(0, 4, (1024,), generator=g)
    x = centers[y] + torch.randn(1024, 32, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    callback = PersampleCallback(F.cross_entropy)  # <- the one added callback
    trainer = L.Trainer(
        max_epochs=2,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Classifier(), loader)
    rows = callback.diagnostics.rows
    print(f"{len(rows)} optimizer steps with statistics (64 examples each)")
    for row in rows[::8]:
        print(
            f"step {row['step']:3d}  loss {row['loss']:.3f}  B_simple {row['b_simple']:8.4g}  "
            f"EMA {row['b_simple_ema']:8.4g}"
        )
    return rows


if __name__ == "__main__":
    main()
