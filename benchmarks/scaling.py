"""How the cost of per-example statistics scales with the batch size B and the sequence length T.

Two sweeps, each point timed and measured exactly as ``run.py`` does (same checks against
``persample.per_sample_grads``, same samples, same peak-RSS memory method, same allocator setting):

- the MLP 784-512-512-10 of ``cases.py`` at B ∈ {8, 32, 128, 512};
- the Hugging Face GPT-2 of ``cases.py`` (4 layers, width 256, vocab 1000) at B = 4 and
  T ∈ {64, 256, 1024}.

Methods: ``plain`` (the denominator), persample's fast engine (``grad_stats(engine="fast")``: mean,
variance, norms), hand-written ``torch.func`` (materialises B × P) and the best peer that runs the
model: BackPACK's ``Variance`` on the MLP, Opacus's hooks on GPT-2 (BackPACK has no rule for
``Conv1D``; Opacus is recorded ``wrong`` there, on the position embedding only, see README).

    python benchmarks/scaling.py [--repeats 3] [--budget 8] [--threads 2] [--save] [--only mlp|gpt2]

``--save`` writes ``results/scaling-cpu-<machine>.{json,md,png}``. A full run takes about
5 minutes on 2 CPU cores. On a shared machine single points move by ±15 % or more, so

    python benchmarks/scaling.py --median RUN1.json RUN2.json RUN3.json --out STEM

writes the median of several runs' JSON files instead (each point's ratio the median of that point's
ratios, each taken within its own run), with every run's ratios listed below the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import run as bench  # noqa: E402  (also puts this checkout's persample first on sys.path)
from cases import Case, gpt2_problem, mlp_problem  # noqa: E402
from methods import all_methods  # noqa: E402

BATCH_SIZES = (8, 32, 128, 512)
SEQ_LENS = (64, 256, 1024)
GPT2_BATCH = 4
FAST = "persample-stats-fast"
LABELS = {
    FAST: "persample fast (mean, var, norms)",
    "torch.func": "torch.func vmap(grad) (B × P)",
    "backpack-variance": "BackPACK Variance",
    "opacus-hooks": "Opacus hooks (B × P)",
}


@dataclass(frozen=True)
class Sweep:
    name: str  # "mlp" / "gpt2"
    variable: str  # "B" / "T"
    values: tuple
    peer: str
    description: str

    def case(self, value: int) -> Case:
        if self.name == "mlp":
            return Case("mlp", value, "MLP 784-512-512-10", mlp_problem)
        return Case(
            f"gpt2-t{value}", GPT2_BATCH, f"HF GPT-2 4x256, vocab 1000, T={value}", partial(gpt2_problem, seq_len=value)
        )


SWEEPS = (
    Sweep("mlp", "B", BATCH_SIZES, "backpack-variance", "MLP 784-512-512-10 (670 k parameters)"),
    Sweep(
        "gpt2",
        "T",
        SEQ_LENS,
        "opacus-hooks",
        f"HF GPT-2, 4 layers, width 256, vocab 1000 (3.4 M parameters), B = {GPT2_BATCH}",
    ),
)


def machine() -> dict:
    """CPU model (lscpu's, from /proc/cpuinfo), logical CPUs, torch version and threads."""
    return {
        "cpu": bench.cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "versions": bench.versions(),
    }


def sweep_records(sweep: Sweep, settings, memory, log) -> list[dict]:
    by_name = {m.name: m for m in all_methods()}
    methods = [by_name[n] for n in ("plain", FAST, "torch.func", sweep.peer)]
    records = []
    for value in sweep.values:
        case = sweep.case(value)
        log(f"{sweep.name} {sweep.variable}={value}")
        recs = bench.run_case(
            case, methods, settings, memory=memory, common={}, progress=bench.Progress(len(methods), enabled=False)
        )
        for r in recs:
            r.update(sweep=sweep.name, variable=sweep.variable, value=value)
            log(f"  {r['method']:22s} {r['status']:8s} ratio {_fmt(r['ratio'])}  mem {_mib(r['peak_mem_bytes'])} MiB")
        records += recs
    return records


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def plot(records: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    styles = {
        FAST: ("tab:blue", "o"),
        "torch.func": ("tab:red", "s"),
        "backpack-variance": ("tab:green", "^"),
        "opacus-hooks": ("tab:purple", "v"),
        "plain": ("0.4", "."),
    }
    for row, sweep in enumerate(SWEEPS):
        rows = [r for r in records if r["sweep"] == sweep.name]
        ax_t, ax_m = axes[row]
        for method in ("plain", FAST, "torch.func", sweep.peer):
            pts = [r for r in rows if r["method"] == method]
            color, marker = styles[method]
            label = LABELS.get(method, method)
            wrong = any(r["status"] == "wrong" for r in pts)
            if wrong:
                label += " [wrong]"
            timed = [(r["value"], r["ratio"]) for r in pts if r["ratio"] is not None]
            if method != "plain" and timed:
                ax_t.plot(*zip(*timed), marker=marker, color=color, label=label, linestyle="--" if wrong else "-")
            mem = [(r["value"], r["peak_mem_bytes"] / 2**20) for r in pts if r["peak_mem_bytes"]]
            if mem:
                ax_m.plot(
                    *zip(*mem),
                    marker=marker,
                    color=color,
                    label="plain step" if method == "plain" else label,
                    linestyle=":" if method == "plain" else ("--" if wrong else "-"),
                )
        if sweep.name == "mlp":  # the B × P float32 gradients that materialising methods hold
            params = 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
            xs = list(sweep.values)
            ax_m.plot(
                xs,
                [b * params * 4 / 2**20 for b in xs],
                color="0.6",
                linestyle="-.",
                linewidth=1,
                label="B × P × 4 bytes",
            )
        ax_t.axhline(1.0, color="0.5", linewidth=0.8)
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(sweep.values), [str(v) for v in sweep.values])
            ax.set_xlabel(f"{sweep.variable} ({sweep.description})", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
        plain_fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        for ax in (ax_t, ax_m):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain_fmt)
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax_t.set_ylabel("time / plain step (log)")
        ax_t.set_title(f"{sweep.name}: time ratio to plain vs {sweep.variable}", fontsize=10)
        ax_m.set_ylabel("peak extra RSS of one call, MiB (log)")
        ax_m.set_title(f"{sweep.name}: peak extra memory vs {sweep.variable}", fontsize=10)
        ax_t.legend(fontsize=7)
        ax_m.legend(fontsize=7)
    m = meta["machine"]
    fig.suptitle(
        f"persample scaling, {m['cpu']} ({m['logical_cpus']} CPUs), {m['threads']} threads, "
        f"torch {m['torch']}, persample {m['versions'].get('persample_git')}\n"
        f"load avg {meta['load_before']} → {meta['load_after']} (shared machine: ratios noisy)"
        + (f"; median of {len(meta['runs'])} runs" if meta.get("runs") else ""),
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(records: list[dict], meta: dict) -> str:
    m = meta["machine"]
    lines = [
        "# persample scaling (`benchmarks/scaling.py`)",
        "",
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; {m['threads']} torch threads; "
        f"torch {m['torch']}; persample {m['versions'].get('persample_git')}; "
        f"Opacus {m['versions'].get('opacus')}, BackPACK {m['versions'].get('backpack')}, "
        f"transformers {m['versions'].get('transformers')}",
        f"- load average (1 min) before / after: {meta['load_before']} / {meta['load_after']}; "
        f"run took {meta['total_s']:.0f} s; command `{meta['command']}`",
        f"- allocator: {meta['allocator']}; memory: {meta['memory_method']}",
        f"- timing: {meta['repeats']} samples of ≥ 20 ms per method (fewer calls for slow ones, see "
        "`repeats`), median; ratio = median / plain's median at the same point; † = other processes "
        "used > 10 % of the CPUs while it was timed",
    ]
    if meta.get("runs"):
        lines.append(
            f"- the median of {len(meta['runs'])} runs (each ratio taken within its run; every run's "
            "ratios below the tables): " + "; ".join(meta["runs"])
        )
    lines.append("")
    for sweep in SWEEPS:
        rows = [r for r in records if r["sweep"] == sweep.name]
        methods = ["plain", FAST, "torch.func", sweep.peer]
        lines += [
            f"## {sweep.name}: {sweep.description}, sweep over {sweep.variable}",
            "",
            f"| {sweep.variable} | plain (ms) | "
            + " | ".join(f"`{x}` ratio" for x in methods[1:])
            + " | "
            + " | ".join(f"`{x}` MiB" for x in methods)
            + " |",
            "|---:|---:|" + "---:|" * (2 * len(methods) - 1),
        ]
        for value in sweep.values:
            by = {r["method"]: r for r in rows if r["value"] == value}
            plain = by.get("plain", {})
            cells = [str(value), bench._fmt_ms(plain.get("median_s")) or "-"]
            for meth in methods[1:]:
                r = by.get(meth, {})
                text = (
                    _fmt(r.get("ratio"))
                    if r.get("status") == "ok"
                    else (f"{_fmt(r.get('ratio'))} {r.get('status')}" if r else "-")
                )
                cells.append(text + ("†" if bench.contended(r) else ""))
            cells += [_mib(by.get(meth, {}).get("peak_mem_bytes")) for meth in methods]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        reasons = {(r["method"], r["reason"]) for r in rows if r["status"] != "ok" and r["reason"]}
        lines += [f"- `{meth}`: {reason}" for meth, reason in sorted(reasons)] + [""]
        spread = [r for r in rows if r.get("run_ratios") and r["method"] != "plain"]
        if spread:
            lines += [f"Every run's ratio ({sweep.name}):", ""]
            lines += [
                f"- `{r['method']}` at {sweep.variable} = {r['value']}: " + " / ".join(_fmt(x) for x in r["run_ratios"])
                for r in spread
            ] + [""]
    return "\n".join(lines)


def median_of_runs(runs: list[dict]) -> tuple[list[dict], dict]:
    """(records, meta) of the median of several runs (``{"meta", "records"}`` as ``--out`` writes them): per
    point and method, the median of the ratios (each taken within its run; None if some run has none),
    of plain's times and of the peak memories; the worst status (and its reason); the most foreign CPU."""

    def key(r):
        return r["sweep"], r["method"], r["value"]

    by_key: dict = {}
    for run in runs:
        for r in run["records"]:
            by_key.setdefault(key(r), []).append(r)
    records = []
    for r in runs[0]["records"]:
        same = by_key[key(r)]
        ratios = [x["ratio"] for x in same if x.get("ratio") is not None]
        memories = [x["peak_mem_bytes"] for x in same if x.get("peak_mem_bytes")]
        times = [x["median_s"] for x in same if x.get("median_s") is not None]
        worst = next((x for x in same if x["status"] != "ok"), r)
        records.append(
            {
                **r,
                "ratio": statistics.median(ratios) if len(ratios) == len(same) else None,
                "median_s": statistics.median(times) if times else None,
                "peak_mem_bytes": statistics.median(memories) if memories else None,
                "status": worst["status"],
                "reason": worst["reason"],
                "foreign_cpu": max(x.get("foreign_cpu") or 0.0 for x in same),
                "run_ratios": [x.get("ratio") for x in same],
            }
        )
    metas = [run["meta"] for run in runs]
    meta = {
        **metas[0],
        "load_before": metas[0]["load_before"],
        "load_after": metas[-1]["load_after"],
        "total_s": sum(m["total_s"] for m in metas),
        "runs": [
            f"{m['machine']['versions'].get('persample_git')}, load average {m['load_before']} → "
            f"{m['load_after']}, {m['total_s']:.0f} s"
            for m in metas
        ],
    }
    return records, meta


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="timed samples per method (default 3)")
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timed samples per method (default 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=[s.name for s in SWEEPS], help="run one sweep")
    p.add_argument("--save", action="store_true", help="write results/scaling-cpu-<machine>.{json,md,png}")
    p.add_argument("--out", type=Path, help="write OUT.json, OUT.md and OUT.png (stem)")
    p.add_argument(
        "--median",
        type=Path,
        nargs="+",
        metavar="RUN.json",
        help="no timing: write the median of these runs (with --out or --save)",
    )
    args = p.parse_args(argv)
    if args.median:
        records, meta = median_of_runs([json.loads(path.read_text()) for path in args.median])
        meta["command"] = "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
        stems = [args.out] if args.out else []
        if args.save:
            stems.append(bench.RESULTS_DIR / f"scaling-cpu-{bench.machine_slug(meta['machine']['cpu'])}")
        _write(stems, records, meta)
        return records
    warnings.filterwarnings("ignore")
    allocator = bench.tune_malloc()
    torch.set_num_threads(args.threads)
    settings = bench.Settings(torch.device("cpu"), repeats=args.repeats, budget_s=args.budget)
    memory = bench.memory_meter(settings.device)
    meta = {
        "machine": machine(),
        "load_before": bench.load_average(),
        "allocator": allocator,
        "memory_method": memory.description,
        "repeats": args.repeats,
        "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    start = time.perf_counter()
    records = []
    for sweep in SWEEPS:
        if args.only in (None, sweep.name):
            records += sweep_records(sweep, settings, memory, lambda s: print(s, file=sys.stderr, flush=True))
    meta.update(total_s=time.perf_counter() - start, load_after=bench.load_average())
    stems = [args.out] if args.out else []
    if args.save:
        stems.append(bench.RESULTS_DIR / f"scaling-cpu-{bench.machine_slug(bench.device_name(settings.device))}")
    _write(stems, records, meta)
    return records


def _write(stems: list[Path], records: list[dict], meta: dict) -> None:
    text = markdown(records, meta)
    for stem in stems:
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=str))
        stem.with_suffix(".md").write_text(text)
        plot(records, meta, stem.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
