"""The median of several ``benchmarks/run.py`` runs, as one headline table.

Usage::

    python benchmarks/median.py RUN1.json RUN2.json [...] [--markdown OUT.md]

Each cell is the median over the runs of that method's ratio to ``plain`` *in the same run* (ratios are
never formed across runs); ``plain (ms)`` is the median of plain's times. A cell is ``wrong``/``failed``/
``n/a`` if that method was so in any run. Below the table, every run's own ratios are listed, so the
spread between runs stays visible.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import headline_table  # noqa: E402

#: Statuses in order of precedence when runs disagree (the worst one is shown).
_WORST_FIRST = ("wrong", "failed", "unsupported", "unavailable", "ok")


def median_records(runs: list[list[dict]]) -> list[dict]:
    """One record per (case, batch size, method) present in every run, with median time and ratio."""
    keyed = [{(r["case"], r["batch_size"], r["method"]): r for r in run} for run in runs]
    common = [key for key in keyed[0] if all(key in k for k in keyed[1:])]
    out = []
    for key in common:
        records = [k[key] for k in keyed]
        merged = dict(records[0])
        statuses = [r["status"] for r in records]
        merged["status"] = min(statuses, key=lambda s: _WORST_FIRST.index(s) if s in _WORST_FIRST else 0)
        ratios = [r["ratio"] for r in records if r["ratio"] is not None]
        times = [r["median_s"] for r in records if r["median_s"] is not None]
        merged["ratio"] = statistics.median(ratios) if len(ratios) == len(records) else None
        merged["median_s"] = statistics.median(times) if len(times) == len(records) else None
        merged["foreign_cpu"] = max((r.get("foreign_cpu") or 0.0) for r in records)
        merged["runs_ratios"] = ratios
        out.append(merged)
    return out


def render(runs: list[list[dict]], paths: list[Path]) -> str:
    merged = median_records(runs)
    lines = [f"# Median of {len(runs)} runs of `benchmarks/run.py`", ""]
    for path, run in zip(paths, runs):
        first = run[0]
        lines.append(
            f"- `{path.name}`: {first['device_name']}, {first['threads']} threads, persample "
            f"{first['versions'].get('persample_git', '?')}, started {first['started']}, "
            f"{first['total_s']:.0f} s, load average {first['load_before']} → {first['load_after']}"
        )
    lines += [
        "",
        "Median ratio to `plain` over the runs (each ratio taken within its own run); bold: fastest "
        "correct method of the row; †: another process used > 10 % of the CPUs in some run.",
        "",
        headline_table(merged),
        "",
        "## Every run's ratio",
        "",
        "| case | method | " + " | ".join(f"`{p.name}`" for p in paths) + " |",
        "|---|---|" + "---:|" * len(paths),
    ]
    for r in merged:
        if r["method"] == "plain":
            continue
        cells = [f"{x:.3g}" for x in r["runs_ratios"]] + [""] * (len(paths) - len(r["runs_ratios"]))
        lines.append(f"| {r['case']} B={r['batch_size']} | `{r['method']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="JSON files written by run.py --json (or --save)")
    p.add_argument("--markdown", type=Path, help="write the table here (default: print it)")
    args = p.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    text = render(runs, args.runs)
    if args.markdown:
        args.markdown.write_text(text)
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
