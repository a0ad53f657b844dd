"""Red-team battery, part 2: effects that appear only on a later call (plan and verdict caches).

Each case: a model whose forward couples examples or depends on positions only for some batches; the first
call gets a batch without the effect, the later calls batches with it. Every later call must be the oracle's
or a refusal. Run: ``PYTHONPATH=$PWD:$PWD/benchmarks/redteam python benchmarks/redteam/battery2.py``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import persample
from harness import oracle, plain_grad, pgrad_err, refusal, stats_err, verdict

torch.set_default_dtype(torch.float64)


class Body(nn.Module):
    def __init__(self, f):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.f = f

    def forward(self, x):
        return self.f(self, x)


def mix_if_big(s, x):
    h = torch.tanh(s.l1(x))
    if bool(x.abs().max() > 3):
        h = h + h.mean(0)
    return s.l2(h)


def pos_if_big(s, x):
    h = torch.tanh(s.l1(x))
    if bool(x.abs().max() > 3):
        h = h * torch.arange(1, h.shape[0] + 1, dtype=h.dtype)[:, None]
    return s.l2(h)


def pos_if_b6(s, x):
    return s.l2(torch.tanh(s.l1(x * (2.0 if x.shape[0] >= 6 else 1.0))))


def roll_if_b6(s, x):
    h = torch.tanh(s.l1(x))
    return s.l2(h.roll(1, 0) if h.shape[0] >= 6 else h)


def last_if_big(s, x):
    x = x.clone()
    if bool(x.abs().max() > 3):
        x[-1] = 0
    return s.l2(torch.tanh(s.l1(x)))


CASES = {
    "mix (h + h.mean(0)) only when |x| > 3": mix_if_big,
    "position (h * arange) only when |x| > 3": pos_if_big,
    "x * 2 only when B >= 6": pos_if_b6,
    "roll(1, 0) only when B >= 6": roll_if_b6,
    "x[-1] = 0 only when |x| > 3": last_if_big,
}


def batches(first_size=4):
    g = torch.Generator().manual_seed(0)
    small = torch.rand(first_size, 4, generator=g) * 2 - 1
    big = torch.randn(6, 4, generator=g) * 3
    big[0, 0] = 4.0
    y4, y6 = torch.randint(0, 3, (first_size,), generator=g), torch.randint(0, 3, (6,), generator=g)
    return (small, y4), (big, y6)


def later(entry, f, first_size=4):
    (x1, y1), (x2, y2) = batches(first_size)
    make = lambda: Body(f)  # noqa: E731
    model = make()
    rows, losses = oracle(make, F.cross_entropy, x2, y2)
    ref = plain_grad(make, F.cross_entropy, x2, y2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if entry in ("fast", "auto"):
            persample.grad_stats(model, F.cross_entropy, x1, y1, engine=entry)
            st = persample.grad_stats(model, F.cross_entropy, x2, y2, engine=entry)
            return verdict(stats_err(st, rows, losses), 1e-9)
        if entry == "psg-fast":
            persample.per_sample_grads(model, F.cross_entropy, x1, y1, engine="fast")
            g = persample.per_sample_grads(model, F.cross_entropy, x2, y2, engine="fast")
            return verdict({n: (g[n] - r).abs().max().item() / r.abs().max().item() for n, r in rows.items()}, 1e-9)
        if entry == "step":
            tr = persample.Tracker(model, F.cross_entropy, randomness="error")
            tr.step(x1, y1)
            model.zero_grad(set_to_none=True)
            st = tr.step(x2, y2)
            errs = stats_err(st, rows, losses)
            errs.update(pgrad_err(model, ref))
            return verdict(errs, 1e-9)
        if entry == "observe":
            tr = persample.Tracker(model, F.cross_entropy)
            with tr.observe(y1):
                F.cross_entropy(model(x1), y1).backward()
            model.zero_grad(set_to_none=True)
            with tr.observe(y2) as ob:
                F.cross_entropy(model(x2), y2).backward()
            errs = stats_err(ob.stats, rows, losses)
            errs.update(pgrad_err(model, ref))
            return verdict(errs, 1e-9)
    raise ValueError(entry)


def main():
    for first_size in (4, 6):  # a first batch of another size, then of the same size
        for name, f in CASES.items():
            res = {}
            for entry in ("fast", "auto", "psg-fast", "step", "observe"):
                try:
                    res[entry] = later(entry, f, first_size)
                except Exception as e:  # noqa: BLE001
                    res[entry] = refusal(e)
            flag = "!!" if any(v.startswith(("WRONG", "CRASH")) for v in res.values()) else "  "
            line = "; ".join(f"{k}={v}" for k, v in res.items())
            print(f"{flag} {name} (first batch of {first_size}, then 6): {line}", flush=True)


if __name__ == "__main__":
    main()
