"""Per-example gradients, their statistics, and the mean-vs-autograd check, in a few lines."""

import torch
from torch import nn

import persample

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
x, y = torch.randn(32, 20), torch.randint(0, 10, (32,))

grads = persample.per_sample_grads(model, nn.functional.cross_entropy, x, y)  # {name: [32, *shape]}
stats = persample.grad_stats(model, nn.functional.cross_entropy, x, y)  # streamed GradStats
print(stats)
print("per-example gradient norms:", [round(v, 3) for v in stats.norms[:8].tolist()], "...")
print("largest per-parameter variance:", {k: f"{v.max().item():.3g}" for k, v in stats.var.items()})
print(persample.check_mean(model, nn.functional.cross_entropy, x, y))
