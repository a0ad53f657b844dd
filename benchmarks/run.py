"""Benchmark per-example gradient methods: speed and peak memory, checked against persample.

Usage::

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--json OUT.json] [--markdown OUT.md]
                             [--case SUBSTR]... [--method SUBSTR]... [--threads N] [--repeats N]

For every (case, method) pair: prepare the method (untimed), call its step
once and check the output against persample's per-example gradients, call it
once more to warm up (and size the samples), then time ``--repeats`` samples (fewer if one call is
slow, see ``--budget``), each of as many back-to-back calls as fill ``MIN_SAMPLE_S``, and take the
median time per call; finally measure the peak memory of one
more call. Each sample of a method follows a sample of ``plain`` on the same problem (timed
alike), and the ratio is the median over samples of the sample's time over that plain sample's:
both see the same state of the machine, so a drift of its speed during the run cancels
(``--unpaired``: the method's median over ``plain``'s median in the same run, as before
2026-12-08).
A method that fails or does not support a model is recorded with the reason;
it never stops the run. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `cases`, `methods` (opacus ships a `benchmarks` package)
# persample from this checkout, not whichever copy is installed (an editable install of another
# worktree would otherwise be measured under this checkout's commit)
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import persample  # noqa: E402
from cases import Case, all_cases, select_cases  # noqa: E402
from methods import (
    Method,
    Unsupported,
    WrongResult,
    all_methods,
    max_rel_err,  # noqa: E402
    reference_quantities,
    select_methods,
)

TOLERANCE = 1e-3  # max_rel_err above this (float32) makes the status "wrong"
AUTOCAST_TOLERANCE = 5e-2  # under bf16/fp16 autocast (the reference runs under it too)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
WARMUP_CALLS = 2  # untimed calls before timing; the first one's output is checked
MIN_REPEATS = 3  # the time budget never cuts the repeats below this
MIN_SAMPLE_S = 0.02  # each timed sample repeats the call until it lasts at least this long
CONTENTION = 0.10  # other processes using more than this share of all CPUs: timing is retried
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------ the machine
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with its logical CPU count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def machine_slug(name: str) -> str:
    """A short file-name-friendly machine name, e.g. ``intel-xeon-2cpu``."""
    name = re.sub(r"\((\d+) logical CPUs\)", r" \1cpu ", name)
    name = re.sub(r"\((R|TM|tm)\)|\bCPU\b|Processor|NVIDIA|@.*?GHz", " ", name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_revision() -> str | None:
    """The repository's commit (with ``-dirty`` if the tree has changes), or None outside git."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def load_average() -> float | None:
    """The 1-minute load average (other processes competing for the cores), where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def versions() -> dict[str, str | None]:
    """Versions of torch, persample and the peers (None when not installed)."""
    out: dict[str, str | None] = {
        "torch": torch.__version__,
        "persample": persample.__version__,
        "python": platform.python_version(),
    }
    out["persample_git"] = git_revision()
    out["persample_path"] = str(Path(persample.__file__).resolve().parent)
    for key, dist in (("opacus", "opacus"), ("backpack", "backpack-for-pytorch"), ("transformers", "transformers")):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


# ------------------------------------------------------------------ peak memory
class CudaPeak:
    """Peak of ``torch.cuda.max_memory_allocated`` during one call, above what was allocated before it."""

    description = (
        "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
        "memory_allocated() before the call (tensors only; excludes the caching "
        "allocator's reserve and the CUDA context)"
    )

    def measure(self, call: Callable[[], object]) -> int:
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return max(0, peak - before)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5": reset VmHWM to the current RSS


def _malloc_trim() -> None:
    """Return freed heap memory to the OS, so that RSS before a call is what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """Linux peak resident set size during one call, above the RSS before it.

    Before the call: garbage-collect, ``malloc_trim(0)``, read VmRSS, then write
    "5" to /proc/self/clear_refs (resets VmHWM to the current RSS). After it:
    VmHWM − RSS before. Process-wide: it includes allocator overhead, pages
    touched by libraries (oneDNN scratch space, thread stacks) and the call's
    output, which is still alive when VmHWM is read.
    """

    description = (
        "Linux peak RSS: VmHWM after the call, reset beforehand by writing 5 to "
        "/proc/self/clear_refs, minus VmRSS before the call (after gc and malloc_trim); "
        "process-wide resident memory, including allocator overhead"
    )

    def measure(self, call: Callable[[], object]) -> int:
        gc.collect()
        _malloc_trim()
        before = _status_kib("VmRSS")
        _reset_peak_rss()
        out = call()
        peak = _status_kib("VmHWM")
        del out
        return max(0, peak - before) * 1024

    @staticmethod
    def unavailable_reason() -> str | None:
        """None if resetting and reading the peak RSS works here, else why not."""
        try:
            _reset_peak_rss()
            base = _status_kib("VmRSS")
            block = torch.ones(16 << 20)  # 64 MiB, touched
            del block
            grew = _status_kib("VmHWM") - base
            _malloc_trim()
            _reset_peak_rss()
            reset_ok = _status_kib("VmHWM") - _status_kib("VmRSS") < 8 << 10
        except OSError as err:
            return f"cannot reset or read the peak RSS: {err}"
        if grew < 60 << 10 or not reset_ok:
            return "VmHWM did not follow a 64 MiB allocation or did not reset"
        return None


class NoPeak:
    """No honest peak-memory measure on this platform: every record gets null."""

    def __init__(self, reason: str):
        self.description = f"not measured: {reason}"

    def measure(self, call: Callable[[], object]) -> None:
        return None


def memory_meter(device: torch.device):
    if device.type == "cuda":
        return CudaPeak()
    reason = RssPeak.unavailable_reason()
    return NoPeak(reason) if reason else RssPeak()


# ------------------------------------------------------------------ allocator
#: glibc ``mallopt`` parameters and the values the benchmark sets (see :func:`tune_malloc`).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
MALLOC_SETTINGS = {"mmap_threshold": 32 << 20, "mmap_max": 0, "trim_threshold": 1 << 30, "top_pad": 64 << 20}


def tune_malloc() -> str:
    """Keep freed CPU memory in the process instead of handing it back to the OS after every call.

    With glibc's defaults, tensors above 128 KiB–32 MiB are ``mmap``-ed and
    unmapped on free, and the heap is trimmed, so a step that allocates a few
    MiB page-faults on fresh memory every call: on a VM that costs as much as
    the arithmetic and makes the timing of allocation-heavy methods swing by
    ±30% between runs. Raising the mmap and trim thresholds (the advice of
    PyTorch's CPU performance guides, which suggest jemalloc or tcmalloc for
    the same reason) applies to every method alike. Returns a description for
    the results.

    ``mmap_max = 0`` serves every block from the heap, however large. Without
    it, blocks of 32 MiB or more (the largest mmap threshold glibc accepts) were
    still ``mmap``-ed, page-faulted and unmapped at every call, unless the heap
    happened to hold a free chunk that large, left there by whatever ran
    before. On MLP B=32 (a 51 MiB per-example weight gradient) hand-written
    ``vmap(grad)`` timed right after ``loop`` took 1 page fault per call and
    ``persample.per_sample_grads`` after it 12,546 (18.8 vs 45.5 ms, 1 thread);
    in the other order both took 12,546. That order effect was the whole
    "persample-grads 2.6-4× slower than torch.func" of issue 14.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(
            libc.mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_THRESHOLD, MALLOC_SETTINGS["mmap_threshold"]),
                (_M_MMAP_MAX, MALLOC_SETTINGS["mmap_max"]),
                (_M_TRIM_THRESHOLD, MALLOC_SETTINGS["trim_threshold"]),
                (_M_TOP_PAD, MALLOC_SETTINGS["top_pad"]),
            )
        )
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "default (glibc mallopt unavailable)"
    return "glibc mallopt: no mmap (mmap max 0, threshold {} MiB), trim threshold {} MiB, top pad {} MiB".format(
        *(MALLOC_SETTINGS[k] >> 20 for k in ("mmap_threshold", "trim_threshold", "top_pad"))
    )


# ------------------------------------------------------------------ timing
def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def cpu_ticks() -> tuple[int, int] | None:
    """(busy CPU ticks of the whole machine, CPU ticks of this process), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq + steal, int(own[11]) + int(own[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


class ForeignLoad:
    """The share of the machine's CPU time used by OTHER processes between ``start()`` and ``share()``.

    Ratios are only as good as the machine is quiet: on a shared 2-core
    machine another process's threads can slow a step many times over.
    """

    def start(self) -> None:
        self.ticks, self.wall = cpu_ticks(), time.perf_counter()

    def share(self) -> float | None:
        now = cpu_ticks()
        if self.ticks is None or now is None:
            return None
        capacity = (time.perf_counter() - self.wall) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        foreign = (now[0] - self.ticks[0]) - (now[1] - self.ticks[1])
        return round(min(1.0, max(0.0, foreign / capacity)), 3) if capacity > 0 else None


def timed_sample(call: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    """Seconds per call, averaged over ``calls`` back-to-back calls (synchronised at both ends)."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    sync()
    return (time.perf_counter() - start) / calls


def calls_per_sample(seconds_per_call: float) -> int:
    """Calls in one timed sample: enough to last ``MIN_SAMPLE_S``, so that a sub-millisecond step
    is not timed by single calls, whose spread is the timer's and the scheduler's."""
    return max(1, math.ceil(MIN_SAMPLE_S / max(seconds_per_call, 1e-9)))


@dataclass(frozen=True)
class Baseline:
    """``plain``'s step on the same problem, timed just before every sample of another method, so that
    each ratio is taken between two neighbouring samples (a drift of the machine's speed during the
    run, which moves both alike, cancels; see :func:`timed_repeats`)."""

    step: Callable[[], object]
    calls: int  # calls per baseline sample (:func:`calls_per_sample` of plain's own time)
    release: Callable[[], None] = lambda: None


def timed_repeats(
    step: Callable[[], object],
    count: int,
    sync,
    *,
    retries: int,
    wait_s: float,
    calls: int = 1,
    baseline: Baseline | None = None,
) -> tuple[list[float], list[float] | None, float | None, int]:
    """``count`` timed samples of ``calls`` calls each, retried (after ``wait_s``) while other
    processes load the CPU. With a ``baseline``, each sample is preceded by one baseline sample.

    Returns the per-call times of the least contended attempt, the baseline's per-call times of the
    same attempt (None without a baseline), its foreign CPU share and the number of attempts.
    """
    best: tuple[list[float], list[float] | None, float | None] | None = None
    attempts = 0
    for attempts in range(1, retries + 2):
        load = ForeignLoad()
        load.start()
        times, base = [], [] if baseline is not None else None
        for _ in range(count):
            if baseline is not None and base is not None:
                base.append(timed_sample(baseline.step, baseline.calls, sync))
            times.append(timed_sample(step, calls, sync))
        share = load.share()
        if best is None or (share is not None and best[2] is not None and share < best[2]):
            best = (times, base, share)
        if share is None or share <= CONTENTION:
            break
        if attempts <= retries:
            time.sleep(wait_s)
    return best[0], best[1], best[2], attempts


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """The median over samples of each sample's time over the baseline sample taken just before it."""
    return statistics.median(t / b for t, b in zip(times, baseline))


def repeats_within_budget(seconds_per_call: float, repeats: int, budget_s: float) -> int:
    """``repeats``, cut so that timing fits ``budget_s``, but never below ``MIN_REPEATS``."""
    affordable = int(budget_s // max(seconds_per_call, 1e-9))
    return max(min(repeats, MIN_REPEATS), min(repeats, affordable))


# ------------------------------------------------------------------ one record
def classify_failure(err: BaseException) -> tuple[str, str]:
    """(status, one-line reason) for an exception raised by a method."""
    if (
        isinstance(err, (Unsupported, NotImplementedError, persample.UnsupportedModelError))
        or type(err).__name__ == "NotExact"
    ):  # persample's fast engine: cannot be exact here
        status = "unsupported"
    elif isinstance(err, WrongResult):
        status = "wrong"
    else:
        status = "failed"
    first_line = (str(err).strip().splitlines() or [""])[0]
    reason = f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
    return status, reason[:300]


def measure_method(
    method: Method, problem, reference, settings: "Settings", memory, baseline: Baseline | None = None
) -> dict:
    """Check, time and measure one method on one problem; never raises. With a ``baseline`` (plain's
    step), ``paired_ratio`` is the median of the method's samples over the baseline's interleaved ones."""
    record = {
        "paired_ratio": None,
        "median_s": None,
        "min_s": None,
        "peak_mem_bytes": None,
        "max_rel_err": None,
        "repeats": 0,
        "status": "ok",
        "reason": "",
        "foreign_cpu": None,
        "attempts": 0,
    }
    missing = method.missing_requirements()
    if missing:
        return {**record, "status": "unavailable", "reason": f"not installed: {', '.join(missing)}"}
    sync = synchronizer(settings.device)
    try:
        with settings.autocasting():
            prepared = _autocast_prepared(method.prepare(problem), settings)
        tolerance = TOLERANCE if settings.autocast is None else AUTOCAST_TOLERANCE
        checked = check_output(prepared, reference, sync, tolerance)
        reason = "; ".join(filter(None, [checked.pop("reason", ""), prepared.notes]))
        record.update(checked, reason=reason)
        for _ in range(WARMUP_CALLS - 2):  # the checked call was the first warm-up call
            timed_sample(prepared.step, 1, sync)
        per_call = timed_sample(prepared.step, 1, sync)  # the last warm-up call sizes the samples
        calls = calls_per_sample(per_call)
        count = repeats_within_budget(per_call * calls, settings.repeats, settings.budget_s)
        times, base, foreign, attempts = timed_repeats(
            prepared.step,
            count,
            sync,
            retries=settings.retries,
            wait_s=settings.wait_s,
            calls=calls,
            baseline=baseline,
        )
        record.update(
            paired_ratio=paired_ratio(times, base) if base else None,
            median_s=statistics.median(times),
            min_s=min(times),
            repeats=count,
            calls_per_sample=calls,
            foreign_cpu=foreign,
            attempts=attempts,
        )
        prepared.release()
        record["peak_mem_bytes"] = memory.measure(prepared.step)
        prepared.release()
    except Exception as err:  # noqa: BLE001 - every failure is recorded, none stops the run
        status, reason = classify_failure(err)
        record.update(status=status, reason=reason, median_s=None, min_s=None, repeats=0, paired_ratio=None)
    return record


def check_output(prepared, reference, sync, tolerance: float = TOLERANCE) -> dict:
    """Call the step once and compare its converted output with the reference."""
    raw = prepared.step()
    sync()
    try:
        outputs = prepared.convert(raw)
        if reference is None:
            return {}
        err, where, mismatches = max_rel_err(outputs, reference)
    except WrongResult as bad:
        return {"status": "wrong", "reason": str(bad)}
    finally:
        del raw
        prepared.release()
    finite = err if err is not None and math.isfinite(err) else None
    if mismatches:
        rest = "" if err is None else f"; the other parameters: max_rel_err {err:.3g}"
        return {"status": "wrong", "max_rel_err": finite, "reason": "; ".join(mismatches[:3]) + rest}
    if err is None or not err <= tolerance:
        return {"status": "wrong", "max_rel_err": finite, "reason": f"max_rel_err {err} at {where}"}
    return {"max_rel_err": err}


def reference_for(problem):
    """Reference quantities from ``persample.per_sample_grads`` (None, reason) if that fails."""
    try:
        grads = persample.per_sample_grads(problem.model, problem.loss_fn, problem.inputs, problem.targets)
        return reference_quantities(grads, problem.example_weights), ""
    except Exception as err:  # noqa: BLE001
        return None, classify_failure(err)[1]


# ------------------------------------------------------------------ the run
class Progress:
    """A tqdm bar over (case, method) pairs, or plain lines on stderr without tqdm."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="pair", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class Settings:
    """How each method is measured."""

    device: torch.device
    repeats: int  # timed samples (cut by the budget for slow methods, never below MIN_REPEATS)
    budget_s: float  # seconds of timed calls per method
    retries: int = 0  # re-timings when other processes load the CPU (see ForeignLoad)
    wait_s: float = 10.0  # pause before each re-timing
    autocast: str | None = None  # "bf16"/"fp16": every call (the reference's too) under torch.autocast
    paired: bool = True  # each sample after a sample of plain: ratios of neighbouring samples (Baseline)

    def autocasting(self):
        """The autocast context of every call (a no-op context without ``autocast``)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.autocast])


def _autocast_prepared(prepared, settings: "Settings"):
    """``prepared`` with its step (and its conversion) run under the run's autocast."""
    if settings.autocast is None:
        return prepared
    step, convert = prepared.step, prepared.convert

    def autocast_step():
        with settings.autocasting():
            return step()

    def autocast_convert(raw):
        with settings.autocasting():
            return convert(raw)

    return dataclasses.replace(prepared, step=autocast_step, convert=autocast_convert)


def run_case(
    case: Case, methods: list[Method], settings: Settings, *, memory, common: dict, progress: Progress
) -> list[dict]:
    """Records of every method on one case; ratios are to this case's ``plain``."""
    try:
        problem = case.build(settings.device)
        with settings.autocasting():
            reference, reference_error = reference_for(problem)
    except Exception as err:  # noqa: BLE001 - e.g. transformers missing for GPT-2
        problem, reason = None, f"case could not be built: {classify_failure(err)[1]}"
        build_status = "unavailable" if isinstance(err, ImportError) else "failed"
    records = []
    baseline = None
    if problem is not None and settings.paired and any(m.name == "plain" for m in methods):
        baseline = _plain_baseline(next(m for m in methods if m.name == "plain"), problem, settings)
    for method in methods:
        progress.start(f"{case.label} {method.name}")
        if problem is None:
            result = {
                "median_s": None,
                "min_s": None,
                "peak_mem_bytes": None,
                "max_rel_err": None,
                "repeats": 0,
                "status": build_status,
                "reason": reason,
                "foreign_cpu": None,
                "attempts": 0,
            }
        else:
            paired = baseline if method.name != "plain" else None
            result = measure_method(method, problem, reference, settings, memory, baseline=paired)
        if problem is not None and reference is None and result["status"] == "ok":
            result["reason"] = f"unchecked: reference failed ({reference_error})"
        records.append(
            {
                "case": case.name,
                "method": method.name,
                "batch_size": case.batch_size,
                "description": case.description,
                **result,
                **common,
            }
        )
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()  # hand back what one method cached before the next one runs
        progress.advance()
    if baseline is not None:
        baseline.release()
    plain = next((r["median_s"] for r in records if r["method"] == "plain"), None)
    for r in records:
        r["ratio_of_medians"] = r["median_s"] / plain if plain and r["median_s"] is not None else None
        paired = r.get("paired_ratio")
        r["ratio"] = r["ratio_of_medians"] if paired is None or r["method"] == "plain" else paired
    return records


def _plain_baseline(plain: Method, problem, settings: Settings) -> Baseline | None:
    """``plain``'s step made ready and warmed up as a :class:`Baseline`, or None where it fails (the
    ratios are then those of the medians, as with ``--unpaired``)."""
    sync = synchronizer(settings.device)
    try:
        with settings.autocasting():
            prepared = _autocast_prepared(plain.prepare(problem), settings)
        for _ in range(WARMUP_CALLS):
            timed_sample(prepared.step, 1, sync)
        calls = calls_per_sample(timed_sample(prepared.step, 1, sync))
    except Exception:  # noqa: BLE001 - plain's own record says why
        return None
    return Baseline(step=prepared.step, calls=calls, release=prepared.release)


def run(
    cases: list[Case],
    methods: list[Method],
    settings: Settings,
    *,
    threads: int,
    show_progress: bool = True,
    allocator: str = "default",
) -> tuple[list[dict], dict]:
    """Every (case, method) record, and the run's metadata (``allocator``: how the process's
    allocator was set up, recorded as is)."""
    torch.set_num_threads(threads)
    memory = memory_meter(settings.device)
    device = settings.device
    meta = {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "memory_method": memory.description,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_before": load_average(),
        "autocast": settings.autocast,
        "allocator": allocator,
        "paired": settings.paired,
    }
    common = {
        "device": meta["device"],
        "device_name": meta["device_name"],
        "threads": meta["threads"],
        "torch_version": torch.__version__,
        "persample_version": persample.__version__,
    }
    progress = Progress(len(cases) * len(methods), enabled=show_progress)
    records: list[dict] = []
    start = time.perf_counter()
    try:
        for case in cases:
            records += run_case(case, methods, settings, memory=memory, common=common, progress=progress)
    finally:
        progress.close()
    meta["total_s"] = time.perf_counter() - start
    meta["load_after"] = load_average()
    return records, meta


# ------------------------------------------------------------------ output
def _fmt_ratio(r: float) -> str:
    return f"{r:.2f}" if r < 10 else f"{r:.1f}" if r < 100 else f"{r:.0f}"


def _fmt_ms(s: float | None) -> str:
    return "" if s is None else f"{s * 1e3:#.3g}" if s < 0.1 else f"{s * 1e3:.0f}"


def contended(record: dict) -> bool:
    """Whether other processes used more than ``CONTENTION`` of the CPUs while it was timed."""
    return (record.get("foreign_cpu") or 0.0) > CONTENTION


def _cell(record: dict | None, fastest: bool) -> str:
    if record is None:
        return ""
    status, ratio = record["status"], record["ratio"]
    mark = "†" if contended(record) else ""
    if status == "ok" and ratio is not None:
        return (f"**{_fmt_ratio(ratio)}**" if fastest else _fmt_ratio(ratio)) + mark
    if status == "wrong":
        return f"{_fmt_ratio(ratio)}{mark} wrong" if ratio is not None else "wrong"
    return {"failed": "failed", "unsupported": "n/a", "unavailable": "–"}.get(status, status)


def _groups(records: list[dict]) -> list[tuple[str, list[dict]]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["case"], r["batch_size"]), []).append(r)
    return [(f"{case} B={b}", rs) for (case, b), rs in groups.items()]


def _method_order(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in records))


def headline_table(records: list[dict]) -> str:
    """Markdown: one row per case and batch size, one column per method, cells = time ratio to plain.

    The fastest correct method of a row (plain aside) is in bold. ``wrong``:
    timed but the output disagrees with persample; ``failed``: raised;
    ``n/a``: the method does not support the model; ``–``: not installed.
    """
    methods = [m for m in _method_order(records) if m != "plain"]
    lines = [
        "| case | plain (ms) | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for label, rs in _groups(records):
        by_method = {r["method"]: r for r in rs}
        ok = [r for r in rs if r["method"] != "plain" and r["status"] == "ok" and r["ratio"] is not None]
        best = min(ok, key=lambda r: r["ratio"])["method"] if ok else None
        plain = by_method.get("plain")
        plain_cell = (
            _fmt_ms(plain["median_s"]) + ("†" if contended(plain) else "")
            if plain and plain["median_s"] is not None
            else "failed"
        )
        cells = [_cell(by_method.get(m), m == best) for m in methods]
        lines.append(f"| {label} | {plain_cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def records_table(records: list[dict]) -> str:
    """Markdown: every record with its time, ratio, peak memory, error and status."""
    lines = [
        "| case | B | method | median (ms) | min (ms) | ratio | ratio of medians | peak mem (MiB) | max rel err "
        "| repeats | other CPU | status |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        mem = "" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        ratio = "" if r["ratio"] is None else _fmt_ratio(r["ratio"])
        of_medians = "" if r.get("ratio_of_medians") is None else _fmt_ratio(r["ratio_of_medians"])
        other = "" if r.get("foreign_cpu") is None else f"{r['foreign_cpu']:.0%}"
        lines.append(
            f"| {r['case']} | {r['batch_size']} | `{r['method']}` | {_fmt_ms(r['median_s'])} | "
            f"{_fmt_ms(r.get('min_s'))} | {ratio} | {of_medians} | {mem} | {err} | {r['repeats']} | {other} | "
            f"{r['status']} |"
        )
    return "\n".join(lines)


def notes_list(records: list[dict]) -> str:
    """Markdown bullets: the reason of every record that has one."""
    notes = [
        f"- {r['case']} B={r['batch_size']} `{r['method']}` ({r['status']}): {r['reason']}"
        for r in records
        if r["reason"]
    ]
    return "\n".join(notes) or "- none"


def render_markdown(records: list[dict], meta: dict) -> str:
    v = meta["versions"]
    peers = ", ".join(f"{k} {v[k] or 'not installed'}" for k in ("opacus", "backpack", "transformers"))
    return "\n".join(
        [
            f"# persample benchmarks: {meta['device_name']}",
            "",
            f"- Device: {meta['device']}, {meta['device_name']}; {meta['threads']} torch threads"
            + (f"; every call under torch.autocast({meta['autocast']})" if meta.get("autocast") else ""),
            f"- torch {v['torch']}, persample {v['persample']} (git {v['persample_git']}), "
            f"Python {v['python']}; {peers}",
            f"- Command: `{meta.get('command', '')}`; started {meta['started']}, took {meta['total_s']:.0f} s; "
            f"1-min load average {meta['load_before']} before, {meta['load_after']} after",
            f"- Time: median over `repeats` samples of the time per call, each sample being as many back-to-back "
            f"calls as last {MIN_SAMPLE_S * 1e3:.0f} ms, after {WARMUP_CALLS} warm-up calls; ratio = "
            + (
                "median over samples of the sample's time / the `plain` sample timed just before it (paired; "
                "`ratio of medians`: median / `plain` median in the same run)"
                if meta.get("paired")
                else "median / `plain` median in the same run"
            )
            + " (lower is better). Each call is a full step, forward pass included.",
            f"- Peak memory: {meta['memory_method']}.",
            f"- Allocator: {meta.get('allocator', 'default')} (`--default-malloc` keeps glibc's defaults).",
            f"- Contention: `other CPU` is the share of all CPUs that other processes used while a method was "
            f"timed; above {CONTENTION:.0%} the timing was retried up to `--retries` times and the least "
            "contended attempt kept.",
            f"- Checked against `persample.per_sample_grads`: max |a−b| / max |b| over all parameters; "
            f"status `wrong` above {TOLERANCE:g}.",
            "",
            "## Headline: time ratio to `plain`",
            "",
            headline_table(records),
            "",
            "Bold: fastest correct method of the row (plain aside). `wrong`: output disagrees with persample; "
            "`failed`: raised an error; `n/a`: model not supported; `–`: not installed; "
            f"†: other processes used more than {CONTENTION:.0%} of the CPUs while it was timed (see `other CPU`).",
            "",
            "## All records",
            "",
            records_table(records),
            "",
            "## Notes and failures",
            "",
            notes_list(records),
            "",
        ]
    )


def write_json(records: list[dict], meta: dict, path: Path) -> None:
    run_info = {
        k: meta.get(k)
        for k in (
            "versions",
            "memory_method",
            "started",
            "total_s",
            "load_before",
            "load_after",
            "command",
            "allocator",
            "autocast",
        )
    }
    out = [{**r, **run_info} for r in records]
    path.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")


# ------------------------------------------------------------------ CLI
def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="reduced case set and fewer repeats (< 3 min on 2 CPU cores)")
    p.add_argument(
        "--large",
        action="store_true",
        help="add the opt-in large cases (gpt2-large-b8: 35.7 M parameters, T=256; seconds per "
        "plain step on 2 CPU cores)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--autocast",
        choices=tuple(AUTOCAST_DTYPES),
        help="run every call (and the reference) under torch.autocast in this dtype; "
        f"outputs are checked at max_rel_err {AUTOCAST_TOLERANCE:g}",
    )
    p.add_argument("--json", type=Path, help="write the records as a JSON list here")
    p.add_argument("--markdown", type=Path, help="write the headline table and all records as markdown here")
    p.add_argument(
        "--save",
        action="store_true",
        help="also write benchmarks/results/<device>-<machine>.json and .md (the committed results)",
    )
    p.add_argument(
        "--case",
        action="append",
        help="only cases whose label (e.g. mlp-b32) contains this, opt-in ones (gpt2-padded-b16) included; repeatable",
    )
    p.add_argument(
        "--method", action="append", help="only methods whose name contains this (plain always runs); repeatable"
    )
    p.add_argument("--threads", type=int, help="torch threads (default: 2 on CPU, torch's default on CUDA)")
    p.add_argument(
        "--repeats",
        type=int,
        help="timed samples per method (default: 9 on CPU, 25 on CUDA, 5 with "
        f"--quick); a sample is as many calls as last {MIN_SAMPLE_S * 1e3:.0f} ms",
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default allocator settings (see benchmarks/README.md, Timing)",
    )
    p.add_argument(
        "--budget",
        type=float,
        help="seconds of timed calls per method before the repeats are cut "
        f"(never below {MIN_REPEATS}); default 60, 10 with --quick",
    )
    p.add_argument(
        "--retries",
        type=int,
        help="re-time a method up to N times while other processes use more "
        f"than {CONTENTION:.0%}% of the CPUs (default 2, 0 with --quick)",
    )
    p.add_argument("--retry-wait", type=float, default=10.0, help="seconds to wait before a re-timing (default 10)")
    p.add_argument(
        "--unpaired",
        action="store_true",
        help="time plain once per case, not before each sample of every method (ratios of medians)",
    )
    p.add_argument("--list", action="store_true", help="list the selected cases and methods and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else (25 if args.device == "cuda" else 9)
    if args.budget is None:
        args.budget = 10.0 if args.quick else 60.0
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    if args.threads is None:
        args.threads = 2 if args.device == "cpu" else torch.get_num_threads()
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be positive")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    cases = select_cases(all_cases(quick=args.quick, large=args.large, opt_in=bool(args.case)), args.case)
    methods = select_methods(all_methods(), args.method)
    if args.list:
        print("cases:  ", " ".join(c.label for c in cases))
        print("methods:", " ".join(m.name for m in methods))
        return []
    if not cases:
        sys.exit(f"no case matches {args.case}; see --list")
    warnings.filterwarnings("ignore")  # peers warn on every wrap; failures are recorded, not warned
    settings = Settings(
        torch.device(args.device),
        repeats=args.repeats,
        budget_s=args.budget,
        retries=args.retries,
        wait_s=args.retry_wait,
        autocast=args.autocast,
        paired=not args.unpaired,
    )
    # A process-wide setting: made here, by the script, never by run() (which tests call in-process).
    allocator = tune_malloc() if args.device == "cpu" and not args.default_malloc else "default"
    records, meta = run(
        cases, methods, settings, threads=args.threads, show_progress=not args.no_progress, allocator=allocator
    )
    meta["command"] = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    markdown = render_markdown(records, meta)
    outputs = [(args.json, args.markdown)]
    if args.save:
        stem = RESULTS_DIR / f"{meta['device']}-{machine_slug(meta['device_name'])}"
        outputs.append((stem.with_suffix(".json"), stem.with_suffix(".md")))
    for json_path, md_path in outputs:
        if json_path:
            write_json(records, meta, json_path)
        if md_path:
            md_path.write_text(markdown)
    print(headline_table(records))
    print(
        f"\n{len(records)} records in {meta['total_s']:.0f} s on {meta['device_name']}, {meta['threads']} threads",
        file=sys.stderr,
    )
    return records


if __name__ == "__main__":
    main()
