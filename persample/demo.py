"""``persample demo``: train a small network on scikit-learn's 8×8 digits and watch its gradient noise.

The training logic, as plain functions; :mod:`persample.cli` holds the
command line. The demo

1. loads the 1,797 handwritten 8×8 digits bundled with scikit-learn (real data,
   no download) and holds out a stratified test split;
2. trains a small CNN (or MLP) with SGD + momentum, with
   :class:`persample.Tracker` (``inner_products=True``) in place of
   ``loss.backward()``;
3. logs every statistics step through :class:`persample.loggers.Diagnostics`
   (B_simple raw and EMA, mean GSNR, the three batch-size tests, per-layer noise
   scale) into ``metrics.csv`` (or ``.jsonl``), one row per step, and the
   per-epoch evaluation into ``epochs.csv``;
4. prints one summary line per epoch, draws ``diagnostics.png``, and finally
   asserts with :func:`persample.check_mean` that the mean of the per-example
   gradients equals autograd's gradient on a held-out batch.

Needs the ``demo`` extra (scikit-learn, matplotlib, tqdm):
``pip install -e ".[demo]" (in a persample checkout), or pip install scikit-learn matplotlib``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .check import MeanCheck, check_mean
from .noise import DEFAULT_EMA_BETA, DEFAULT_NORM_THRESHOLD
from .loggers import CSVLogger, Diagnostics, JSONLLogger, TensorBoardLogger
from .tracker import Tracker

__all__ = [
    "DemoConfig",
    "DemoResult",
    "load_digits",
    "build_model",
    "train_epoch",
    "evaluate",
    "run_demo",
    "EpochSummary",
    "format_table",
]

EXTRA_HINT = 'pip install -e ".[demo]" (in a persample checkout), or: pip install scikit-learn matplotlib'


def require_demo_extras() -> None:
    """Raise one ImportError naming every missing package of the ``demo`` extra and the one command
    that installs them all (rather than one error per package, one install at a time)."""
    import importlib.util

    missing = [
        name
        for module, name in (("matplotlib", "matplotlib"), ("sklearn", "scikit-learn"))
        if _missing(module, importlib.util)
    ]
    if missing:
        raise ImportError(
            f"persample demo needs {' and '.join(missing)} (not installed). One command installs "
            f"everything the demo uses: {EXTRA_HINT}"
        )


def _missing(module: str, util) -> bool:
    import sys as _sys

    if module in _sys.modules:
        return _sys.modules[module] is None
    try:
        return util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


#: The demo's learning rate per optimizer when none is given.
DEFAULT_LR = {"sgd": 0.05, "adam": 2e-3}


def describe_b_simple(b_simple: float, batch_size: float) -> str:
    """What a noise scale means for the batch size, in words (McCandlish et al. 2018: up to about
    B_simple, a larger batch cuts the number of steps almost proportionally; well beyond it, it
    mostly adds compute).

    >>> describe_b_simple(120, 64)
    'B_simple ≈ 120 examples against a batch of 64: a larger batch would still cut the number of steps.'
    """
    if not math.isfinite(b_simple) or b_simple <= 0:
        return (
            f"B_simple is below noise (not yet measurable) against a batch of {batch_size:g}: the gradient "
            "signal is still swamped by its noise; the EMA needs more statistics steps."
        )
    head = f"B_simple ≈ {b_simple:.3g} examples against a batch of {batch_size:g}: "
    if b_simple > 1.5 * batch_size:
        return head + "a larger batch would still cut the number of steps."
    if b_simple >= batch_size / 1.5:
        return head + "the batch is about the noise scale; a larger batch would cut steps less than in proportion."
    return head + "a larger batch would mostly add compute; it would cut few steps."


def describe_b_precond(value: float, lo: Any = None, hi: Any = None, row: Mapping[str, Any] | None = None) -> str:
    """The Adam-aware noise scale B^P (EMA) in words, with its 90% interval and the coordinates left out.

    >>> text = describe_b_precond(84.0, 60.0, 110.0, {"precond_excluded": 12.0})
    >>> text[:50]
    'Adam-aware B^P ≈ 84 examples [90% interval 60–110]'
    >>> "12 coordinates without a second moment yet are left out" in text
    True
    """
    if value > 0:
        text = f"Adam-aware B^P ≈ {value:.3g} examples"
        if isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo) and math.isfinite(hi):
            text += f" [90% interval {max(lo, 0.0):.3g}–{hi:.3g}]"
    else:
        text = "Adam-aware B^P is below noise (its GᵀPG EMA is not positive)"
    text += " (EMA of tr(PΣ) over EMA of GᵀPG, P = 1/(sqrt(v̂) + ε)"
    excluded = (row or {}).get("precond_excluded")
    if isinstance(excluded, float) and math.isfinite(excluded) and excluded > 0:
        text += f"; {excluded:.0f} coordinates without a second moment yet are left out"
    return text + "): the noise scale under Adam's preconditioner; B_simple assumes plain SGD."


@dataclass
class DemoConfig:
    """Every option of ``persample demo`` (see ``persample demo --help``)."""

    out: Path = Path("persample-demo")
    epochs: int = 6
    device: str = "cpu"
    model: str = "cnn"
    batch_size: int = 64
    lr: float | None = None  # None: the optimizer's default in DEFAULT_LR
    momentum: float = 0.9
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam" (then the Adam-aware B^P is logged and shown)
    every: int = 1
    seed: int = 0
    ema_beta: float = DEFAULT_EMA_BETA
    train_examples: int | None = None
    format: str = "csv"
    tensorboard: bool = False
    threads: int = 1
    progress: bool = True
    quiet: bool = False


@dataclass
class EpochSummary:
    """One line of the per-epoch table."""

    epoch: int
    train_loss: float
    train_acc: float
    test_acc: float
    b_simple_ema: float
    gsnr_mean: float
    norm_test_batch: float
    seconds: float
    b_precond_ema: float | None = None  # with Adam: the preconditioned noise scale's EMA (a column of its own)


@dataclass
class DemoResult:
    metrics_path: Path
    plot_path: Path
    epochs: list[EpochSummary]
    check: MeanCheck
    seconds: float
    tensorboard_dir: Path | None = None
    rows: list[dict] = field(default_factory=list, repr=False)
    epochs_path: Path | None = None


# ------------------------------------------------------------------------------ data


def load_digits(
    *, seed: int = 0, test_fraction: float = 0.2, train_examples: int | None = None, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``; x is ``[N, 1, 8, 8]`` float32.

    Pixels (0–16) are scaled to [0, 1] and standardised with the training
    split's mean and standard deviation. The split is stratified and fixed by
    ``seed``; ``train_examples`` keeps only the first that many training examples.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ImportError(f"persample demo needs scikit-learn for its data set: {EXTRA_HINT}") from err
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for label in range(10):  # stratified split
        idx = (y == label).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = torch.cat(train_idx)[torch.randperm(sum(len(i) for i in train_idx), generator=g)]
    test = torch.cat(test_idx)
    if train_examples is not None:
        train = train[:train_examples]
    mu, sd = x[train].mean(), x[train].std()
    x = (x - mu) / sd
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


# ----------------------------------------------------------------------------- model


def build_model(kind: str = "cnn") -> nn.Module:
    """A small classifier for 8×8 digits. Layer names become the per-layer groups of the diagnostics.

    - ``cnn``: conv(1→16) – GroupNorm – ReLU – conv(16→32) – ReLU – maxpool –
      fc(512→64) – ReLU – fc(64→10); 38k parameters.
    - ``mlp``: fc(64→128) – ReLU – fc(128→64) – ReLU – fc(64→10); 17k parameters.
    """
    if kind == "cnn":
        return nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(1, 16, 3, padding=1)),
                    ("norm1", nn.GroupNorm(4, 16)),
                    ("act1", nn.ReLU()),
                    ("conv2", nn.Conv2d(16, 32, 3, padding=1)),
                    ("act2", nn.ReLU()),
                    ("pool", nn.MaxPool2d(2)),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(32 * 4 * 4, 64)),
                    ("act3", nn.ReLU()),
                    ("fc2", nn.Linear(64, 10)),
                ]
            )
        )
    if kind == "mlp":
        return nn.Sequential(
            OrderedDict(
                [
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(64, 128)),
                    ("act1", nn.ReLU()),
                    ("fc2", nn.Linear(128, 64)),
                    ("act2", nn.ReLU()),
                    ("fc3", nn.Linear(64, 10)),
                ]
            )
        )
    raise ValueError(f"model must be 'cnn' or 'mlp', got {kind!r}")


# -------------------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += float(F.cross_entropy(out, target, reduction="sum"))
        correct += int((out.argmax(1) == target).sum())
    model.train(was_training)
    return loss / len(x), correct / len(x)


def train_epoch(
    tracker: Tracker,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    generator: torch.Generator,
    on_step: Callable[[], None] | None = None,
) -> None:
    """One pass over a reshuffled training set. The backward line is ``tracker.step``.

    The last, incomplete batch is dropped when it has a single example (the noise
    statistics need at least two).
    """
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2:
            break
        optimizer.zero_grad()
        with warnings.catch_warnings():  # a skipped step ends the demo below, with its own message
            warnings.filterwarnings("ignore", message="persample: step .* not finite", category=RuntimeWarning)
            tracker.step(x[idx], y[idx])  # instead of loss_fn(model(x), y).backward()
        if tracker.skipped:
            raise ValueError(f"training diverged at step {tracker.skipped[0]}: non-finite values in stats.")
        optimizer.step()
        if on_step is not None:
            on_step()


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    full, rest = divmod(n_train, batch_size)
    return full + (1 if rest >= 2 else 0)


def _finite(values):
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def summarize_epoch(
    epoch: int, rows: list[dict], ema: float, train: tuple[float, float], test_acc: float, seconds: float
) -> EpochSummary:
    """The table line of an epoch from its diagnostics rows.

    GSNR is the mean of the steps' mean GSNR; the norm-test batch size is the
    median over the steps (robust to the inf of a step with ḡ ≈ 0); B^P is the
    last row's ``b_precond_ema`` when the rows have one (an Adam run).
    """
    precond = rows[-1].get("b_precond_ema") if rows else None
    gsnr = _finite(r.get("gsnr_mean", math.nan) for r in rows)
    batch = [r.get("norm_test_batch", math.nan) for r in rows]
    batch = [b for b in batch if not math.isnan(b)]
    return EpochSummary(
        epoch,
        train[0],
        train[1],
        test_acc,
        ema,
        statistics.fmean(gsnr) if gsnr else math.nan,
        statistics.median(batch) if batch else math.nan,
        seconds,
        float(precond) if isinstance(precond, (int, float)) else None,
    )


TABLE_HEADER = ("epoch", "train loss", "train acc", "test acc", "B_simple(EMA)", "mean GSNR", "norm-test B", "time")
_WIDTHS = (5, 10, 9, 8, 13, 9, 11, 6)


def format_table(row: EpochSummary | None = None, *, precond: bool = False) -> str:
    """The table header (``row=None``) or one aligned table line; ``precond``: with a ``B^P(EMA)`` column
    (the Adam-aware noise scale) after ``B_simple(EMA)``."""
    header: tuple[str, ...] = TABLE_HEADER
    widths: tuple[int, ...] = _WIDTHS
    if precond:
        header, widths = header[:5] + ("B^P(EMA)",) + header[5:], widths[:5] + (11,) + widths[5:]
    if row is None:
        return "  ".join(h.rjust(w) for h, w in zip(header, widths))

    def num(v: float, fmt: str) -> str:
        return format(v, fmt) if math.isfinite(v) else str(v)

    def noise_scale(v: float) -> str:
        return num(v, ".4g") if not (v <= 0) else "below noise"

    noise = noise_scale(row.b_simple_ema)
    cells = (
        str(row.epoch),
        num(row.train_loss, ".4f"),
        num(row.train_acc, ".3f"),
        num(row.test_acc, ".3f"),
        noise,
        *((noise_scale(math.nan if row.b_precond_ema is None else row.b_precond_ema),) if precond else ()),
        num(row.gsnr_mean, ".4f"),
        num(row.norm_test_batch, ".0f"),
        f"{row.seconds:.1f}s",
    )
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or not _is_terminal(sys.stderr):  # a bar in a file would interleave with the table
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a nicety: without tqdm, train without one
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def run_demo(config: DemoConfig, stdout: TextIO | None = None) -> DemoResult:
    """Train, log, plot and check, as ``persample demo`` does; returns the paths and the summaries.

    Raises:
        ImportError: scikit-learn or matplotlib missing (``pip install -e ".[demo]"`` in a persample
            checkout, or ``pip install scikit-learn matplotlib``).
        persample.MeanMismatchError: the final :func:`persample.check_mean` failed.
    """
    stdout = sys.stdout if stdout is None else stdout
    say = (lambda *a: None) if config.quiet else (lambda text="": print(text, file=stdout, flush=True))
    require_demo_extras()  # fails early, before training, naming every missing package at once
    from . import plot as plot_module

    t0 = time.perf_counter()
    if config.threads > 0:
        # The model is tiny: one thread is about as fast as two, and it avoids the large
        # OpenMP slow-downs that intra-op threads suffer when other processes share the cores.
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    x_train, y_train, x_test, y_test = load_digits(
        seed=config.seed, train_examples=config.train_examples, device=device
    )
    if len(x_train) < 2:
        raise ValueError(f"the demo needs at least 2 training examples, got {len(x_train)}")
    batch_size = min(config.batch_size, len(x_train))  # a batch cannot be larger than the data set
    model = build_model(config.model).to(device)
    if config.optimizer not in DEFAULT_LR:
        raise ValueError(f"optimizer must be one of {tuple(DEFAULT_LR)}, got {config.optimizer!r}")
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.optimizer]
    adam = config.optimizer == "adam"
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(model.parameters(), lr=lr)
        if adam
        else torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum)
    )
    optimizer_label = f"Adam lr {lr:g}" if adam else f"SGD lr {lr:g} momentum {config.momentum:g}"
    tracker = Tracker(model, F.cross_entropy, every=config.every, inner_products=True)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / f"metrics.{config.format}"  # one row per statistics step
    epochs_path = out / f"epochs.{config.format}"  # one row per epoch: evaluation, in a file of its own
    sink = CSVLogger(metrics_path) if config.format == "csv" else JSONLLogger(metrics_path)
    epoch_sink = CSVLogger(epochs_path) if config.format == "csv" else JSONLLogger(epochs_path)
    sinks: list[Any] = [sink]
    tb_dir = None
    if config.tensorboard:
        tb_dir = out / "tensorboard"
        sinks.append(TensorBoardLogger(tb_dir))
    epoch_box = [0]
    diag = Diagnostics(
        *sinks,
        ema_beta=config.ema_beta,
        extra=lambda t, s: {"epoch": epoch_box[0], "lr": optimizer.param_groups[0]["lr"]},
        optimizer=optimizer if adam else None,  # Adam: also the preconditioned noise scale B^P
    )
    tracker.register_hook(diag)

    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"persample demo: {config.model.upper()} ({n_params:,} parameters) on scikit-learn's 8x8 digits "
        f"({len(x_train)} train / {len(x_test)} test), batch {batch_size}"
        + (
            f" (asked for {config.batch_size}, more than the {len(x_train)} training examples)"
            if batch_size != config.batch_size
            else ""
        )
        + f", {optimizer_label}, {config.epochs} epochs on {device} ({torch.get_num_threads()} CPU "
        f"thread{'s' if torch.get_num_threads() > 1 else ''})"
    )
    say(f"per-example statistics every {config.every} step(s); B_simple EMA beta {config.ema_beta:g}")
    say()
    say(format_table(precond=adam))
    generator = torch.Generator().manual_seed(config.seed)
    summaries: list[EpochSummary] = []
    n_steps = steps_per_epoch(len(x_train), batch_size)
    try:
        for epoch in range(1, config.epochs + 1):
            epoch_box[0] = epoch
            t_epoch = time.perf_counter()
            first_row = len(diag.rows)
            bar = _progress(n_steps, f"epoch {epoch}/{config.epochs}", config.progress and not config.quiet)

            def on_step(bar=bar):
                if bar is not None:
                    bar.update(1)
                    last = diag.rows[-1] if diag.rows else None
                    if last is not None and "b_simple_ema" in last:
                        bar.set_postfix(
                            loss=f"{last['loss']:.3f}", B_simple=f"{last['b_simple_ema']:.3g}", refresh=False
                        )

            try:
                train_epoch(tracker, optimizer, x_train, y_train, batch_size, generator, on_step)
            finally:
                if bar is not None:
                    bar.close()
            train_eval = evaluate(model, x_train, y_train)
            test_loss, test_acc = evaluate(model, x_test, y_test)
            step_rows = [r for r in diag.rows[first_row:] if "b_simple" in r]
            epoch_sink.write(
                {
                    "step": tracker.steps,
                    "epoch": epoch,
                    "train_loss": train_eval[0],
                    "train_acc": train_eval[1],
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                }
            )
            summary = summarize_epoch(
                epoch, step_rows, diag.ema.value, train_eval, test_acc, time.perf_counter() - t_epoch
            )
            summaries.append(summary)
            say(format_table(summary, precond=adam))
    finally:
        diag.close()
        epoch_sink.close()
    say(
        '  (B_simple: EMA of tr Σ over EMA of |G|², McCandlish et al. 2018, "below noise" while the |G|² '
        "estimate is not yet positive;\n"
        + ("   B^P: the same under Adam's preconditioner P, EMA of tr(PΣ) over EMA of GᵀPG;\n" if adam else "")
        + "   GSNR: epoch mean of the mean per-element GSNR; norm-test B: median "
        f"batch size the norm test (θ = {DEFAULT_NORM_THRESHOLD:g}) asks for)"
    )
    say()
    say(describe_b_simple(diag.ema.value, batch_size))
    last = diag.rows[-1] if diag.rows else {}
    b_precond = last.get("b_precond_ema", math.nan)
    if adam and isinstance(b_precond, float) and math.isfinite(b_precond):
        say(describe_b_precond(b_precond, last.get("b_precond_ema_lo"), last.get("b_precond_ema_hi"), last))

    plot_path = out / "diagnostics.png"
    fig = plot_module.plot_diagnostics(
        diag.rows,
        plot_path,
        ema_beta=config.ema_beta,
        title=f"persample demo: {config.model.upper()} on 8x8 digits, batch {batch_size}, {optimizer_label}",
    )
    plot_module.close(fig)

    held_out = slice(0, min(200, len(x_test)))
    report = check_mean(model, F.cross_entropy, x_test[held_out], y_test[held_out])
    seconds = time.perf_counter() - t0
    say()
    say(f"{report} (held-out batch of {len(x_test[held_out])} test examples)")
    say(f"done in {seconds:.1f}s")
    return DemoResult(metrics_path, plot_path, summaries, report, seconds, tb_dir, diag.rows, epochs_path)
