"""Shared timing, memory and reporting helpers for the benchmark scripts.

Every speed figure these scripts report is a *paired ratio*: the compared variants run one
after another inside each repetition (in an order that rotates between repetitions), and each
variant's time is divided by the baseline's time from the same repetition. Load from other
processes then hits both sides of a ratio alike, which absolute times on a shared machine
cannot offer. The median ratio is the result; the spread is the interquartile range of the
per-repetition ratios (the full range is kept in the returned dict too).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import torch

# glibc keeps freed blocks below its (adaptive) mmap threshold inside the heap, so the resident
# size of a process would not fall back after a step and its peak would not show a second step's
# use. A fixed threshold of 128 KiB sends every tensor of interest to mmap, returned at free.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu")


def default_clock(device: torch.device) -> str:
    """``cpu`` (this process's CPU time) on a CPU run with one torch thread, else ``wall``.

    With one thread, CPU time is the work done, while wall time also counts the time other
    processes held the core; with several threads CPU time would add up idle spinning threads,
    and on CUDA the work is not on the CPU at all.
    """
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def interleaved_times(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` times, after ``warmup`` untimed calls.

    Within a repetition every function runs once; the starting function rotates so that none
    always runs first (after an idle pause) or last. ``clock``: ``wall`` or ``cpu`` (see
    :func:`default_clock`).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.process_time
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = now()
            fns[name]()
            synchronize(device)
            times[name].append(now() - start)
    return times


def paired_ratios(times: Mapping[str, Sequence[float]], baseline: str) -> dict[str, dict]:
    """Per-repetition ratio of each variant to ``baseline``: median, quartiles, min and max; and
    ``best``, the ratio of the two fastest times."""
    out = {}
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, times[baseline])]
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        out[name] = {
            "median": statistics.median(ratios),
            "q1": q1,
            "q3": q3,
            "min": min(ratios),
            "max": max(ratios),
            "median_s": statistics.median(values),
            # Other processes only ever add time, so the fastest repetitions are the least
            # disturbed; their ratio is a second, often steadier estimate on a shared machine.
            "best": min(values) / min(times[baseline]),
        }
    return out


def format_ratio(stats: Mapping[str, float]) -> str:
    """``1.23 [1.20-1.31] 1.22``: median and interquartile range of the paired ratios, then the
    ratio of the fastest times."""
    return f"{stats['median']:.3f} [{stats['q1']:.3f}-{stats['q3']:.3f}] {stats['best']:.3f}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device, clock: str | None = None) -> str:
    """One line naming the hardware, torch version, clock and date, for the docs."""
    if device.type == "cuda":
        hardware = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        hardware = f"CPU {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    timing = f"; {clock} clock" if clock else ""
    return f"{hardware}; torch {torch.__version__}{timing}; {date}"


def command_line() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- peak memory -------------------------------------------------------------------------------


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


class PeakMemory:
    """Peak extra memory of a block of code, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at entry (tensor bytes
    the caching allocator handed out). CPU (Linux): the process's resident-size high-water mark
    (``VmHWM``, reset at entry through ``/proc/self/clear_refs``) above its resident size at
    entry; this counts every byte the process touched, ATen's included, and is honest only with
    :data:`MEMORY_ENV` set before the process starts (see there), which :func:`run_child` does.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self._base = _proc_status_mib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._base
        else:
            self.mib = _proc_status_mib("VmHWM") - self._base


def run_child(argv: Sequence[str], timeout: float = 900) -> dict:
    """Run ``python <argv>`` in a fresh process with :data:`MEMORY_ENV`; parse its last stdout
    line as JSON. One process per measurement keeps earlier variants' memory out of it."""
    env = {**os.environ, **MEMORY_ENV}
    result = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
