"""A plain training loop, turned into a tracked one by changing the backward line.

    python examples/train_tracked.py            # tracked
    python examples/train_tracked.py --plain    # the same loop with loss.backward()

The hook logs quantiles of the per-example gradient norms every 10 steps.
"""

import argparse

import torch
from torch import nn

import persample


def make_data(n=2048, dim=32, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 0.25
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def log_norm_quantiles(tracker, stats):
    q = torch.quantile(stats.norms, torch.tensor([0.1, 0.5, 0.9], dtype=stats.norms.dtype))
    print(
        f"step {tracker.steps:4d}  loss {stats.losses.mean():.4f}  per-example |g| "
        f"p10 {q[0]:.3f}  p50 {q[1]:.3f}  p90 {q[2]:.3f}  |mean g| {stats.mean_sq_norm.sqrt():.3f}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", action="store_true", help="use loss.backward() instead of the Tracker")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    tracker = persample.Tracker(model, loss_fn, every=10)
    tracker.register_hook(log_norm_quantiles)

    for epoch in range(args.epochs):
        for inputs, targets in loader:
            optimizer.zero_grad()
            if args.plain:
                loss_fn(model(inputs), targets).backward()
            else:
                tracker.step(inputs, targets)  # <- the only changed line
            optimizer.step()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean()
        print(f"epoch {epoch}: accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
