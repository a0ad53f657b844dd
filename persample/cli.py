"""The ``persample`` console command (also ``python -m persample``).

Subcommands:

- ``persample demo``: train a small network on scikit-learn's 8×8 digits with a
  Tracker, print a per-epoch table of gradient-noise diagnostics, write
  ``metrics.csv`` and ``diagnostics.png``, and assert ``check_mean``.
- ``persample plot METRICS``: redraw ``diagnostics.png`` from a metrics file.

Bad arguments print one line on stderr and exit with status 2; a failed
``check_mean`` or a missing optional dependency exits with status 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .noise import DEFAULT_EMA_BETA

__all__ = ["main", "build_parser"]

_DEMO_DESCRIPTION = """\
Train a small CNN (or MLP) on scikit-learn's bundled 8x8 handwritten digits
(1,797 images, real data, no download) with persample.Tracker in place of
loss.backward(), and watch the gradient noise while it learns.

Each epoch prints one line: training loss and accuracy, test accuracy, the
simple noise scale B_simple (EMA; McCandlish et al. 2018), the mean gradient
signal-to-noise ratio (Liu et al. 2020) and the batch size the norm test asks
for (Byrd et al. 2012). At the end the command writes

  OUT/metrics.csv       one row per statistics step (--format jsonl:
                        OUT/metrics.jsonl)
  OUT/epochs.csv        one row per epoch: train/test loss and accuracy
  OUT/diagnostics.png   loss, gradient norms, B_simple, GSNR, the three
                        batch-size tests, per-layer noise scale

and asserts with persample.check_mean that the mean of the per-example
gradients equals autograd's gradient on a held-out batch (exit status 1 if
not). The defaults finish in well under a minute on 2 CPU cores.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'persample demo: error: … (see --help)', exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _checked(convert, accept, what: str):
    """An argparse type: ``convert(text)`` that ``accept`` allows, else a one-line error naming ``what``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_unit_interval = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _batch_size(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("must be at least 2: the noise statistics need two examples per batch")
    return value


def _device(text: str) -> str:
    text = text.strip().lower()
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}: choose 'cpu' or 'cuda' (or 'cuda:N')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="persample", description="persample: per-example gradients and gradient-noise diagnostics for PyTorch."
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"persample {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train on 8x8 digits and show gradient-noise diagnostics",
        description=_DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("persample-demo"),
        metavar="DIR",
        help="directory for metrics.csv and diagnostics.png; created if missing (default: ./persample-demo)",
    )
    demo.add_argument(
        "--epochs", type=_positive_int, default=6, metavar="N", help="passes over the training set (default: 6)"
    )
    demo.add_argument(
        "--device",
        type=_device,
        default="cpu",
        metavar="{cpu,cuda}",
        help="where to train: 'cpu', 'cuda' or 'cuda:N' (default: cpu)",
    )
    demo.add_argument(
        "--model",
        choices=("cnn", "mlp"),
        default="cnn",
        help="cnn: two conv layers + two linear (38k parameters); mlp: three linear layers "
        "(17k parameters) (default: cnn)",
    )
    demo.add_argument(
        "--batch-size", type=_batch_size, default=64, metavar="B", help="examples per step, at least 2 (default: 64)"
    )
    demo.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default: 0.05 for SGD with momentum 0.9, 0.002 for Adam)",
    )
    demo.add_argument(
        "--optimizer",
        choices=("sgd", "adam"),
        default="sgd",
        help="sgd (with momentum) or adam; with adam the Adam-aware noise scale B^P is logged, drawn and "
        "summarised too (default: sgd)",
    )
    demo.add_argument(
        "--every",
        type=_positive_int,
        default=1,
        metavar="K",
        help="compute per-example statistics (and log a row) every K steps; the other steps "
        "are a plain backward (default: 1)",
    )
    demo.add_argument(
        "--ema-beta",
        type=_unit_interval,
        default=DEFAULT_EMA_BETA,
        metavar="BETA",
        help="decay of the EMAs behind the smoothed B_simple, in [0, 1) (default: %(default)s)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed for the split, the model and the shuffling (default: 0)"
    )
    demo.add_argument(
        "--train-examples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train on only the first N training examples (for quick runs; default: all 1,438)",
    )
    demo.add_argument(
        "--format",
        choices=("csv", "jsonl"),
        default="csv",
        help="metrics file format: metrics.csv or metrics.jsonl (default: csv)",
    )
    demo.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard scalars to OUT/tensorboard (needs the tensorboard package)",
    )
    demo.add_argument(
        "--threads",
        type=_non_negative_int,
        default=1,
        metavar="N",
        help="CPU threads for torch; the model is tiny, and one thread avoids OpenMP slow-downs "
        "when other processes share the cores (0: torch's default; default: 1)",
    )
    demo.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    demo.add_argument("--quiet", action="store_true", help="print only the paths of the files written (and errors)")
    demo.set_defaults(handler=_run_demo, parser=demo)

    plot = sub.add_parser(
        "plot",
        help="draw diagnostics.png from a metrics.csv / .jsonl file",
        description="Draw the diagnostics figure from a metrics file written by "
        "persample's loggers (e.g. by persample demo).",
    )
    plot.add_argument("metrics", type=Path, help="a .csv or .jsonl file written by persample.loggers")
    plot.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        metavar="PNG",
        help="image to write (default: diagnostics.png next to METRICS)",
    )
    plot.add_argument("--title", default=None, help="figure title")
    plot.add_argument(
        "--force",
        action="store_true",
        help="overwrite the image if it exists (default: write to a new name, diagnostics-1.png, ...)",
    )
    plot.set_defaults(handler=_run_plot, parser=plot)
    return parser


def _check_writable_dir(path: Path) -> str | None:
    """None when ``path`` is (or can be made) a writable directory, else the reason."""
    try:
        if path.exists() and not path.is_dir():
            return "it exists and is not a directory"
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".persample-probe-"):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        parser.error(
            f"--device {device}: CUDA was requested but is not available "
            f"({build}; torch {torch.__version__}); use --device cpu"
        )
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        parser.error(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")


def _run_demo(args: argparse.Namespace) -> int:
    parser = args.parser
    reason = _check_writable_dir(args.out)
    if reason is not None:
        parser.error(f"--out {str(args.out)!r} is not a writable directory: {reason}")
    _check_device(parser, args.device)

    from .demo import DemoConfig, run_demo
    from .errors import MeanMismatchError

    config = DemoConfig(
        out=args.out,
        epochs=args.epochs,
        device=args.device,
        model=args.model,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        every=args.every,
        seed=args.seed,
        ema_beta=args.ema_beta,
        train_examples=args.train_examples,
        format=args.format,
        tensorboard=args.tensorboard,
        threads=args.threads,
        progress=not args.no_progress,
        quiet=args.quiet,
    )
    try:
        result = run_demo(config)
    except ImportError as err:
        print(f"persample demo: {err}", file=sys.stderr)
        return 1
    except MeanMismatchError as err:
        print(f"persample demo: check_mean FAILED: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # e.g. training diverged: non-finite gradients reach the diagnostics
        notes = " ".join(getattr(err, "__notes__", []))
        print(
            f"persample demo: training failed: {err} {notes}".rstrip()
            + (" Try a smaller --lr." if "non-finite" in str(err) else ""),
            file=sys.stderr,
        )
        return 1
    print(f"metrics: {result.metrics_path}  (one row per statistics step)")
    if result.epochs_path is not None:
        print(f"epochs:  {result.epochs_path}  (one row per epoch: train/test loss and accuracy)")
    print(f"plot:    {result.plot_path}")
    if result.tensorboard_dir is not None:
        print(f"tensorboard: {result.tensorboard_dir}  (tensorboard --logdir {result.tensorboard_dir})")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    parser = args.parser
    if not args.metrics.is_file():
        parser.error(f"{str(args.metrics)!r} is not a file")
    if args.metrics.suffix not in (".csv", ".jsonl"):
        parser.error(f"{str(args.metrics)!r}: expected a .csv or .jsonl metrics file")
    output = args.output if args.output is not None else args.metrics.with_name("diagnostics.png")
    wanted = output
    if not args.force:
        output = _free_name(output)
    reason = _check_writable_dir(output.parent if str(output.parent) else Path("."))
    if reason is not None:
        parser.error(f"--output {str(output)!r}: its directory is not writable: {reason}")
    try:
        from . import plot

        fig = plot.plot_diagnostics(args.metrics, output, title=args.title)
        plot.close(fig)
    except ImportError as err:
        print(f"persample plot: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        parser.error(str(err))
    print(f"plot: {output}" + (f"  ({wanted} exists; --force overwrites it)" if output != wanted else ""))
    meaning = _noise_scale_in_words(args.metrics)
    if meaning:
        print(meaning)
    return 0


def _free_name(path: Path) -> Path:
    """``path``, or when it exists the first free ``stem-1.suffix``, ``stem-2.suffix``, …"""
    candidate, k = path, 0
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return candidate


def _noise_scale_in_words(metrics: Path) -> str | None:
    """The last smoothed B_simple of a metrics file against its batch size, in words (None without them)."""
    import warnings

    from .loggers import read_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plot has already warned about a truncated row
        rows = read_metrics(metrics)
    for row in reversed(rows):
        b, n = row.get("b_simple_ema"), row.get("n")
        if isinstance(b, float) and isinstance(n, float) and not math.isnan(b) and math.isfinite(n):
            from .demo import describe_b_simple

            return describe_b_simple(b, n)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``persample`` command; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # report it from the subcommand's parser, so the message names 'persample demo'
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("persample: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `persample demo | head`: stop quietly, as other CLI tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
