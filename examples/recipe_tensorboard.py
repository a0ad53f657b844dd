"""Recipe: log the gradient noise scale to TensorBoard every N steps.

    pip install tensorboard            # the logger's only extra
    python examples/recipe_tensorboard.py --out runs/noise
    tensorboard --logdir runs/noise

``Tracker(every=N)`` computes per-example statistics on steps 0, N, 2N, ... (the
other steps are a plain forward + backward); a ``TensorBoardLogger`` registered
as a hook writes one set of scalars per statistics step (B_simple raw and EMA,
GSNR, the batch-size tests, per-layer noise scale).
"""

import argparse
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.loggers import TensorBoardLogger


def main(out: str, steps: int = 60, every: int = 10) -> list[int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w_true = torch.randn(20, 4)

    tracker = persample.Tracker(model, F.cross_entropy, every=every)  # statistics every `every` steps
    logged = []
    tracker.register_hook(lambda t, stats: logged.append(t.steps))  # (just to show which steps)
    with TensorBoardLogger(out) as tensorboard:
        tracker.register_hook(tensorboard)  # one row of scalars per statistics step
        for _ in range(steps):
            x = torch.randn(32, 20)
            y = (x @ w_true).argmax(1)
            optimizer.zero_grad()
            tracker.step(x, y)  # instead of loss.backward()
            optimizer.step()
    print(f"statistics (and TensorBoard scalars) on steps {logged}; tensorboard --logdir {out}")
    return logged


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="TensorBoard log directory (default: a temporary one)")
    args = parser.parse_args()
    main(args.out or tempfile.mkdtemp(prefix="persample-tb-"))
