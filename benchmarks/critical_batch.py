"""The critical batch size, measured by training, against the noise scale persample estimates.

McCandlish et al. (2018, arXiv:1812.06162) predict that the optimizer steps S and the examples E
needed to reach a fixed loss trade off as

    S / S_min − 1 = (E / E_min − 1)^(−1),   i.e.  S(B) = S_min (1 + B_crit / B),  B_crit = E_min / S_min,

and that B_crit ≈ B_simple (SGD) measured along training. This script checks that on two small tasks
that ship with the project's dependencies:

- ``digits``: scikit-learn's 8×8 digits (the demo's data), an MLP 64-64-10, cross-entropy;
- ``lm``: a synthetic language-modelling task: sequences from a fixed random first-order Markov chain
  (vocabulary 16), a per-position model (Embedding → Linear → tanh → Linear), each sequence's mean
  next-token loss.

For each task and optimizer (SGD, Adam) and each batch size (examples drawn with replacement), it
trains to a target training loss with every learning rate of a small grid and keeps the fewest steps.
It then fits S(B) = S_min + E_min / B (least squares on relative errors), and compares B_crit with:

- B_simple (``b_simple_ema``) that persample measures along an SGD run at a reference batch size;
- the preconditioned B^P (``b_precond_ema``, :func:`persample.noise.preconditioned_noise_scale`)
  along an Adam run (and B_simple of the same run).

A third arm (SGD) adapts the batch size to persample's own estimate: each step takes
k = clip(round(B_simple_ema / b0)) micro-batches of b0 examples through ``Tracker.accumulate``
(:class:`NoiseBatchSchedule` below), with the learning rate tuned for the nearest fixed batch size.
Does it reach the target in fewer examples than the best fixed batch size, at no more steps?

    python benchmarks/critical_batch.py --quick          # a few minutes on 2 cores
    python benchmarks/critical_batch.py                  # the full grid (< 25 min on 2 cores)

Writes ``benchmarks/results/critical_batch[-quick].json`` and ``.png``. Timing is not measured; the
numbers are steps and examples, which do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import persample  # noqa: E402
from persample.loggers import Diagnostics  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ------------------------------------------------------------------------------------------ tasks


@dataclass
class Task:
    name: str
    x: torch.Tensor
    y: torch.Tensor
    make_model: Callable[[], nn.Module]
    loss_fn: Callable
    target: float
    eval_x: torch.Tensor
    eval_y: torch.Tensor

    def train_loss(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(self.loss_fn(model(self.eval_x), self.eval_y))


def digits_task(target: float) -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(data.target, dtype=torch.long)

    def make():
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

    return Task("digits", x, y, make, F.cross_entropy, target, x, y)


def lm_task(target_excess: float, vocab: int = 16, length: int = 24, sequences: int = 2048) -> Task:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, vocab, generator=g) * 1.5
    trans = torch.softmax(logits, dim=1)
    stationary = torch.full((vocab,), 1.0 / vocab)
    for _ in range(200):
        stationary = stationary @ trans
    entropy_rate = float(-(stationary[:, None] * trans * trans.log()).sum())
    tokens = torch.empty(sequences, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.multinomial(stationary, sequences, replacement=True, generator=g)
    for t in range(length):
        tokens[:, t + 1] = torch.multinomial(trans[tokens[:, t]], 1, generator=g).squeeze(1)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def make():
        return nn.Sequential(nn.Embedding(vocab, 16), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, vocab))

    def loss_fn(out, target):  # a sequence's mean next-token loss (all sequences have the same length)
        return F.cross_entropy(out.reshape(-1, vocab), target.reshape(-1))

    return Task("lm", x, y, make, loss_fn, entropy_rate + target_excess, x[:512], y[:512])


# ----------------------------------------------------------------------------------- training


def _optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.Adam(model.parameters(), lr=lr)


def _checkpoints(max_steps: int, ratio: float = 1.03) -> set[int]:
    """Steps at which the training loss is evaluated: every step up to 30, then ~3% apart."""
    out, s = set(range(1, 31)), 30.0
    while s < max_steps:
        s *= ratio
        out.add(min(max_steps, math.ceil(s)))
    return out


def steps_to_target(task: Task, opt_name: str, lr: float, batch: int, max_steps: int, seed: int = 0) -> int | None:
    """Optimizer steps until the training loss (on a fixed evaluation set) is ≤ the target (within ~3%)."""
    torch.manual_seed(seed)
    model = task.make_model()
    opt = _optimizer(opt_name, model, lr)
    g = torch.Generator().manual_seed(seed + 1)
    check = _checkpoints(max_steps)
    n = task.x.shape[0]
    for step in range(1, max_steps + 1):
        idx = torch.randint(0, n, (batch,), generator=g)
        opt.zero_grad()
        task.loss_fn(model(task.x[idx]), task.y[idx]).backward()
        opt.step()
        if step in check:
            loss = task.train_loss(model)
            if not math.isfinite(loss):
                return None
            if loss <= task.target:
                return step
    return None


def sweep(task: Task, opt_name: str, batches: list[int], lrs: list[float], max_steps: int) -> dict:
    out = {}
    for b in batches:
        runs = {lr: steps_to_target(task, opt_name, lr, b, max_steps) for lr in lrs}
        done = {lr: s for lr, s in runs.items() if s is not None}
        best = min(done, key=done.get) if done else None
        out[b] = {
            "runs": {str(lr): s for lr, s in runs.items()},
            "lr": best,
            "steps": done.get(best) if best is not None else None,
        }
        print(f"  {task.name} {opt_name} B={b:5d}: steps {out[b]['steps']} (lr {best})", flush=True)
    return out


def fit_frontier(points: list[tuple[int, int]]) -> dict:
    """Least squares of S(B) = S_min + E_min / B on relative errors: B_crit = E_min / S_min."""
    if len(points) < 3:
        return {"s_min": math.nan, "e_min": math.nan, "b_crit": math.nan}
    b = np.array([p[0] for p in points], dtype=float)
    s = np.array([p[1] for p in points], dtype=float)
    a = np.stack([1 / s, 1 / (b * s)], axis=1)
    (s_min, e_min), *_ = np.linalg.lstsq(a, np.ones_like(s), rcond=None)
    ok = s_min > 0 and e_min > 0
    return {"s_min": float(s_min), "e_min": float(e_min), "b_crit": float(e_min / s_min) if ok else math.nan}


# ---------------------------------------------------------------- persample's estimates in training


def measured_noise_scale(task: Task, opt_name: str, lr: float, batch: int, max_steps: int, seed: int = 0) -> dict:
    """B_simple (and, for Adam, B^P) along a run at ``batch``, until the target: their EMAs at the target
    and their medians over the second half of the run."""
    torch.manual_seed(seed)
    model = task.make_model()
    opt = _optimizer(opt_name, model, lr)
    tracker = persample.Tracker(model, task.loss_fn)
    diag = Diagnostics(per_layer=False, tests=("norm",), optimizer=opt if opt_name == "adam" else None)
    tracker.register_hook(diag)
    g = torch.Generator().manual_seed(seed + 1)
    check = _checkpoints(max_steps)
    reached = None
    for step in range(1, max_steps + 1):
        idx = torch.randint(0, task.x.shape[0], (batch,), generator=g)
        opt.zero_grad()
        tracker.step(task.x[idx], task.y[idx])
        opt.step()
        if step in check and task.train_loss(model) <= task.target:
            reached = step
            break
    rows = diag.rows
    half = rows[len(rows) // 2 :]

    def run_average(num: str, den: str) -> float:  # Σ tr Σ / Σ |G|² over the run: the EMA with β → 1
        pairs = [(r[num], r[den]) for r in rows if math.isfinite(r.get(num, math.nan))]
        return math.fsum(p[0] for p in pairs) / math.fsum(p[1] for p in pairs) if pairs else math.nan

    out = {
        "batch": batch,
        "lr": lr,
        "steps": reached,
        "b_simple_ema_at_target": rows[-1]["b_simple_ema"],
        "b_simple_ema_interval_at_target": [rows[-1]["b_simple_ema_lo"], rows[-1]["b_simple_ema_hi"]],
        "b_simple_ema_median_2nd_half": float(np.median([r["b_simple_ema"] for r in half])),
        "b_simple_run_average": run_average("trace_cov", "grad_sq"),
        "trajectory": [(r["step"], r["b_simple_ema"], r.get("b_precond_ema", math.nan)) for r in rows[::5]],
    }
    if opt_name == "adam":
        out["b_precond_ema_at_target"] = rows[-1]["b_precond_ema"]
        out["b_precond_ema_median_2nd_half"] = float(np.nanmedian([r["b_precond_ema"] for r in half]))
        out["b_precond_run_average"] = run_average("trace_cov_precond", "grad_sq_precond")
    return out


class NoiseBatchSchedule:
    """Batch size from persample's EMA of B_simple, in micro-batches of ``micro``: k = clip(round(B/micro)).

    ``k(ema)`` is the number of micro-batches of the next step (1 until the EMA is positive and finite).
    """

    def __init__(self, micro: int, k_max: int):
        self.micro, self.k_max = micro, k_max

    def k(self, ema: float) -> int:
        if not (math.isfinite(ema) and ema > 0):
            return 1
        return int(min(self.k_max, max(1, round(ema / self.micro))))


def scheduled_run(
    task: Task, lr_for: Callable[[int], float], micro: int, k_max: int, max_steps: int, seed: int = 0
) -> dict:
    torch.manual_seed(seed)
    model = task.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr_for(micro))
    tracker = persample.Tracker(model, task.loss_fn)
    ema = persample.noise.NoiseScaleEMA()
    tracker.register_hook(ema)
    schedule = NoiseBatchSchedule(micro, k_max)
    g = torch.Generator().manual_seed(seed + 1)
    check = _checkpoints(max_steps)
    examples, sizes = 0, []
    for step in range(1, max_steps + 1):
        k = schedule.k(ema.value)
        for group in opt.param_groups:
            group["lr"] = lr_for(k * micro)
        opt.zero_grad()
        with tracker.accumulate():
            for _ in range(k):
                idx = torch.randint(0, task.x.shape[0], (micro,), generator=g)
                tracker.step(task.x[idx], task.y[idx], scale=1 / k)
        opt.step()
        examples += k * micro
        sizes.append(k * micro)
        if step in check and task.train_loss(model) <= task.target:
            return {"steps": step, "examples": examples, "batch_sizes": sizes[:: max(1, len(sizes) // 50)]}
    return {"steps": None, "examples": examples, "batch_sizes": sizes[:: max(1, len(sizes) // 50)]}


# ------------------------------------------------------------------------------------------- main


def run(quick: bool) -> dict:
    torch.set_num_threads(1)
    if quick:
        batches = [8, 32, 128, 512, 1024]
        sgd_lrs, adam_lrs, max_steps = [0.1, 0.3, 1.0, 3.0], [3e-3, 1e-2, 3e-2], 3000
    else:
        batches = [8, 16, 32, 64, 128, 256, 512, 1024]
        sgd_lrs, adam_lrs, max_steps = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2], [1e-3, 3e-3, 1e-2, 3e-2, 6e-2], 5000
    tasks = [digits_task(target=0.02), lm_task(target_excess=0.02)]
    result: dict = {
        "quick": quick,
        "batches": batches,
        "sgd_lrs": sgd_lrs,
        "adam_lrs": adam_lrs,
        "max_steps": max_steps,
        "tasks": {},
    }
    for task in tasks:
        t0 = time.time()
        print(f"{task.name}: target training loss {task.target:.4f}", flush=True)
        entry: dict = {"target": task.target}
        for opt_name, lrs in (("sgd", sgd_lrs), ("adam", adam_lrs)):
            table = sweep(task, opt_name, batches, lrs, max_steps)
            points = [(b, v["steps"]) for b, v in table.items() if v["steps"] is not None]
            fit = fit_frontier(points)
            ref = (
                32
                if 32 in table and table[32]["lr"] is not None
                else next(b for b in batches if table[b]["lr"] is not None)
            )
            measured = measured_noise_scale(task, opt_name, table[ref]["lr"], ref, max_steps)
            entry[opt_name] = {"sweep": table, "fit": fit, "measured": measured}
            print(
                f"  {opt_name}: B_crit {fit['b_crit']:.1f} (S_min {fit['s_min']:.1f}, E_min {fit['e_min']:.0f}); "
                f"at B={ref}: B_simple EMA at target {measured['b_simple_ema_at_target']:.1f}, run average "
                f"{measured['b_simple_run_average']:.1f}"
                + (
                    f"; B^P EMA at target {measured['b_precond_ema_at_target']:.1f}, run average "
                    f"{measured['b_precond_run_average']:.1f}"
                    if opt_name == "adam"
                    else ""
                ),
                flush=True,
            )
        sgd = entry["sgd"]["sweep"]
        tuned = sorted((b, v["lr"]) for b, v in sgd.items() if v["lr"] is not None)

        def lr_for(b: int, tuned=tuned) -> float:
            return min(tuned, key=lambda t: abs(math.log(t[0] / b)))[1]

        sched = scheduled_run(task, lr_for, micro=8, k_max=max(batches) // 8, max_steps=max_steps)
        fixed = [(b, v["steps"], v["steps"] * b) for b, v in sgd.items() if v["steps"] is not None]
        best_e = min(fixed, key=lambda t: t[2])
        # The fair competitor: the fixed batch size with the fewest examples among those that need no more
        # steps than the schedule (None when every fixed batch size needs more steps).
        rivals = [t for t in fixed if sched["steps"] is not None and t[1] <= sched["steps"]]
        rival = min(rivals, key=lambda t: t[2]) if rivals else None
        entry["schedule"] = {
            **sched,
            "best_fixed_examples": {"batch": best_e[0], "steps": best_e[1], "examples": best_e[2]},
            "best_fixed_at_no_more_steps": None
            if rival is None
            else {"batch": rival[0], "steps": rival[1], "examples": rival[2]},
        }
        print(
            f"  schedule: steps {sched['steps']}, examples {sched['examples']}; fewest examples of a fixed "
            f"batch size: B={best_e[0]}, {best_e[1]} steps, {best_e[2]} examples; at no more steps: "
            + ("none" if rival is None else f"B={rival[0]}, {rival[1]} steps, {rival[2]} examples"),
            flush=True,
        )
        entry["seconds"] = time.time() - t0
        result["tasks"][task.name] = entry
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["tasks"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        entry = result["tasks"][name]
        for opt_name, color in (("sgd", "#1f77b4"), ("adam", "#d62728")):
            table, fit = entry[opt_name]["sweep"], entry[opt_name]["fit"]
            pts = sorted((int(b), v["steps"]) for b, v in table.items() if v["steps"] is not None)
            if not pts:
                continue
            s = np.array([p[1] for p in pts], dtype=float)
            e = np.array([p[0] * p[1] for p in pts], dtype=float)
            ax.plot(e, s, "o", color=color, label=f"{opt_name.upper()}: measured (B = {pts[0][0]}…{pts[-1][0]})")
            if math.isfinite(fit["b_crit"]):
                bs = np.geomspace(pts[0][0] / 2, pts[-1][0] * 2, 100)
                ss = fit["s_min"] + fit["e_min"] / bs
                ax.plot(
                    ss * bs,
                    ss,
                    "-",
                    color=color,
                    alpha=0.6,
                    label=f"{opt_name.upper()} fit: B_crit = {fit['b_crit']:.0f}",
                )
            m = entry[opt_name]["measured"]
            est = m["b_simple_run_average"] if opt_name == "sgd" else m["b_precond_run_average"]
            if math.isfinite(fit["b_crit"]) and est > 0:
                sb = fit["s_min"] + fit["e_min"] / est
                ax.plot(
                    [sb * est],
                    [sb],
                    "*",
                    ms=16,
                    color=color,
                    mec="black",
                    label=f"{opt_name.upper()}: frontier at persample's "
                    f"{'B_simple' if opt_name == 'sgd' else 'B^P'} = {est:.0f} (run average)",
                )
        sched = entry["schedule"]
        if sched["steps"]:
            ax.plot(
                [sched["examples"]],
                [sched["steps"]],
                "D",
                color="#2ca02c",
                ms=9,
                label=f"SGD, batch from B_simple EMA: {sched['steps']} steps",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("examples E to reach the target loss")
        ax.set_ylabel("optimizer steps S")
        ax.set_title(f"{name}: target loss {entry['target']:.3f}", loc="left")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5)
    fig.suptitle(
        "Critical batch size: the S–E frontier, and persample's noise-scale estimates on it"
        + ("  (--quick)" if result["quick"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes, learning rates and steps")
    parser.add_argument("--out", default=RESULTS, help="directory for the .json and .png")
    parser.add_argument("--replot", metavar="JSON", help="only draw the figure of an earlier run's .json")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), os.path.splitext(args.replot)[0] + ".png")
        return 0
    t0 = time.time()
    result = run(args.quick)
    result["seconds"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "critical_batch" + ("-quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=float)
    plot(result, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
