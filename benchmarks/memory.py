"""Peak memory of one call: resident-set growth on the CPU, allocator peak on a GPU.

On the CPU, torch allocates outside Python's heap (tracemalloc misses it) and freed memory
stays with the C allocator, so one process cannot measure several methods in turn. Each CPU
measurement therefore runs in a fresh process (``in_fresh_process``): imports done and model
built, the kernel's resident-set high-water mark is reset (``/proc/self/clear_refs`` = 5,
Linux 4.0+), the method runs once, and the growth is VmHWM minus the resident set just
before. That counts every allocation the call makes (torch, numpy, xarray, Python objects).
One warm-up call comes first, so one-time set-up (lazy imports, kernel caches) is not
counted; glibc's ``malloc_trim`` then hands the memory it freed back to the kernel, so the
measured call has to fault in every page it uses.
On a GPU, torch's own peak counter is exact and resettable in one process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_kib(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM...) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_supported() -> bool:
    """Whether this system lets a process reset its resident-set high-water mark."""
    return _CLEAR_REFS.exists() and os.access(_CLEAR_REFS, os.W_OK)


def _trim() -> None:
    """Return freed heap memory to the kernel (glibc); elsewhere nothing to do."""
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


def rss_peak_growth(fn: Callable[[], Any]) -> int:
    """Bytes by which the resident set peaks above its level before one call of ``fn``,
    after one warm-up call whose freed memory has been handed back."""
    if not rss_supported():
        raise RuntimeError("peak resident memory needs Linux's /proc/self/clear_refs (writable)")
    fn()
    gc.collect()
    _trim()
    before = status_kib("VmRSS")
    _CLEAR_REFS.write_text("5")
    fn()
    return (status_kib("VmHWM") - before) * 1024


def cuda_peak_growth(fn: Callable[[], Any]) -> int:
    """Bytes by which torch's CUDA allocations peak above their level before one call of ``fn``
    (after a warm-up call, as on the CPU)."""
    fn()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def in_fresh_process(module: str, args: list[str], timeout: float = 900) -> dict[str, Any]:
    """Run ``python -m <module> <args>`` from the repository root; its last stdout line is JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1])
