"""Recipe: a ResNet with BatchNorm, in training mode.

Train-mode BatchNorm couples the examples of a batch, so per-example gradients are
undefined. Two fixes, both shown here:

1. keep BatchNorm and measure the gradient noise from micro-batches, each with its own
   batch statistics (``tracker.accumulate(estimator="micro-batch")``: McCandlish et
   al.'s two-batch estimator over the micro-batches of one optimiser step);
2. ``persample.fix(model)``: swap every BatchNorm for a GroupNorm (a different
   architecture: do it before training), after which every per-example statistic exists.
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import persample
from persample.loggers import CSVLogger
from persample.noise import NoiseScaleEMA, gradient_noise_scale


def block(cin, cout, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


def resnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        block(8, 8, 1),
        block(8, 16, 2),
        block(16, 32, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def batches(steps, size=32):
    """Images whose class is a linear function of their mean colour, so that there is a signal to learn."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 10, generator=g)
    for _ in range(steps):
        x = torch.randn(size, 3, 16, 16, generator=g) + torch.randn(size, 3, 1, 1, generator=g)
        yield x, (x.mean((2, 3)) @ w).argmax(1)


def with_batchnorm(metrics: Path, steps: int = 8, k: int = 4) -> float:
    """BatchNorm kept: the noise scale from k micro-batches per step, logged to ``metrics`` (CSV)."""
    torch.manual_seed(0)
    model = resnet().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = persample.Tracker(model, F.cross_entropy)
    ema = NoiseScaleEMA()
    with CSVLogger(metrics) as log:
        for x, y in batches(steps):
            optimizer.zero_grad()
            with tracker.accumulate(estimator="micro-batch") as acc:
                for xm, ym in zip(x.chunk(k), y.chunk(k)):
                    tracker.step(xm, ym, scale=1 / k)  # p.grad exactly as (loss / k).backward()
            optimizer.step()
            noise = acc.noise  # grad_sq, trace_cov, b_simple of this step
            log.write(
                {
                    "step": tracker.steps,
                    "n": noise.n,
                    "grad_sq": noise.grad_sq,
                    "trace_cov": noise.trace_cov,
                    "b_simple": noise.b_simple,
                    "b_simple_ema": ema.update(noise),
                }
            )
    print(
        f"BatchNorm, micro-batches of {x.shape[0] // k}: B_simple (EMA over {steps} steps) ≈ {ema.value:.3g}"
        + ("" if ema.value > 0 else " (not positive: below noise, the EMA needs more steps)")
    )
    return ema.value


def with_groupnorm(steps: int = 8) -> float:
    """BatchNorm replaced by GroupNorm: exact per-example statistics."""
    torch.manual_seed(0)
    model = resnet()
    print("persample.fix replaced:", *persample.fix(model), sep="\n  ")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # after fix: new parameters
    tracker = persample.Tracker(model.train(), F.cross_entropy)
    ema = NoiseScaleEMA()
    for x, y in batches(steps):
        optimizer.zero_grad()
        stats = tracker.step(x, y)
        optimizer.step()
        ema.update(gradient_noise_scale(stats))
    print(
        f"GroupNorm, per-example: B_simple (EMA over {steps} steps) ≈ {ema.value:.3g}"
        + ("" if ema.value > 0 else " (not positive: below noise, the EMA needs more steps)")
    )
    return ema.value


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for metrics.csv (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="persample-resnet-"))
    out.mkdir(parents=True, exist_ok=True)
    with_batchnorm(out / "metrics.csv")
    print(f"micro-batch noise scale logged to {out / 'metrics.csv'} (persample plot draws it)")
    with_groupnorm()
