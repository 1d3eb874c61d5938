"""Wall-clock and CPU time of several methods measured in one process, alternated, with
paired ratios.

Each round runs every method once, in an order rotated per round, so slow spells of a shared
machine fall on all methods alike; ratios to the baseline are taken within each round
(paired) and summarised by their median, beside the ratio of the fastest runs. The process's
CPU time is recorded beside the wall-clock: with one torch thread it is the work done, which
other processes competing for the cores do not inflate the way they inflate wall-clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Samples:
    """Seconds per method and round: wall-clock and this process's CPU time."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it counts that work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(fn: Callable[[], Any], device: str = "cpu") -> tuple[float, float]:
    """(wall, CPU) seconds of one call of ``fn``, the device synchronised before and after."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(methods: dict[str, Callable[[], Any]], repeats: int, *, device: str = "cpu",
                warmup: int = 1) -> Samples:
    """``repeats`` timed rounds of every method, after ``warmup`` untimed rounds."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            methods[name]()
    out = Samples({name: [] for name in names}, {name: [] for name in names})
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, cpu = clock(methods[name], device)
            out.wall[name].append(wall)
            out.cpu[name].append(cpu)
    return out


def stats(times: list[float], base: list[float]) -> dict[str, float]:
    """min and median of ``times``; against ``base`` (same rounds), the ratio of minimums and
    the median of the per-round ratios."""
    return {"min_s": min(times), "median_s": statistics.median(times), "ratio_min": min(times) / min(base),
            "ratio_median": statistics.median(t / b for t, b in zip(times, base))}


def summarize(samples: Samples, baseline: str) -> dict[str, dict[str, float]]:
    """Per method: wall-clock stats, and the same for CPU time under keys prefixed ``cpu_``."""
    out = {}
    for name in samples.wall:
        cpu = stats(samples.cpu[name], samples.cpu[baseline])
        out[name] = {**stats(samples.wall[name], samples.wall[baseline]),
                     **{f"cpu_{k}": v for k, v in cpu.items()}, "repeats": len(samples.wall[name])}
    return out
