"""Recipe: per-example gradient clipping (as in DP-SGD, without the noise).

``Tracker(clip_norm=C)`` writes p.grad = mean_i(g_i · min(1, C/‖g_i‖)) (times the
loss's weight): each example's gradient is clipped before the reduction, which a
plain ``clip_grad_norm_`` on the batch gradient cannot do. The statistics handed
back still describe the raw gradients, so you see how many examples were clipped.
"""

import torch
import torch.nn.functional as F
from torch import nn

import persample


def main(steps: int = 20, clip: float = 4.0) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = persample.Tracker(model, F.cross_entropy, clip_norm=clip)
    for step in range(steps):
        x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
        x[0] *= 100  # one outlier example per batch
        optimizer.zero_grad()
        stats = tracker.step(x, y)  # p.grad: mean of clipped g_i
        optimizer.step()
        clipped = int((stats.norms > clip).sum())
        if step % 5 == 0:
            print(
                f"step {step}: {clipped}/16 examples clipped, largest ‖g_i‖ {stats.norms.max():.3g}, "
                f"‖p.grad‖ {torch.cat([p.grad.flatten() for p in model.parameters()]).norm():.3g} (≤ {clip})"
            )
    return float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())


if __name__ == "__main__":
    main()
