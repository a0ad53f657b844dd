"""Recipe: reading the diagnostics of a training run.

``Diagnostics`` computes one row per statistics step (see persample.noise.diagnostics
for every key) and keeps the rows; here is what the main numbers say:

- ``b_simple`` is one step's noise scale tr Σ / |G|²: noisy, and negative while the
  |G|² estimate is below noise. Read ``b_simple_ema`` (EMAs of numerator and
  denominator, then divided): the batch size up to which a larger batch still cuts
  the number of steps almost proportionally (McCandlish et al. 2018).
- ``gsnr_mean``: mean per-parameter signal-to-noise ratio ḡ_j² / Var(g_ij); it
  falls as training converges.
- ``norm_test_batch``: the batch the norm test (Byrd et al. 2012) asks for.
"""

import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.demo import describe_b_simple
from persample.loggers import Diagnostics


def main(steps: int = 40, batch: int = 16) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    w = torch.randn(10, 3)
    tracker = persample.Tracker(model, F.cross_entropy)
    diagnostics = Diagnostics()  # keeps its rows; pass loggers to write them too
    tracker.register_hook(diagnostics)
    for _ in range(steps):
        x = torch.randn(batch, 10)
        optimizer.zero_grad()
        tracker.step(x, (x @ w).argmax(1))
        optimizer.step()
    rows = diagnostics.rows
    below = sum(1 for r in rows if not r["b_simple"] > 0)
    last = rows[-1]
    print(f"{len(rows)} rows; {below} per-step B_simple values below noise (|G|² estimate ≤ 0): read the EMA")
    print(
        f"last step: loss {last['loss']:.3f}, mean GSNR {last['gsnr_mean']:.3g}, "
        f"norm test asks for a batch of {last['norm_test_batch']:.0f}"
    )
    print(describe_b_simple(last["b_simple_ema"], batch))
    return last


if __name__ == "__main__":
    main()
