"""Memory over many recordings: 1,000 ``record`` calls in one process on a tiny LLaVA.

The resident set after the first 50 recordings (allocator pools, caches and lazy imports have
settled by then) is the reference; growth after 1,000 beyond it would be a leak a user running
a long sweep would hit. ``python -m attnflow.benchmarks.soak`` prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from attnflow.probes.record import record
from attnflow.toys import tiny
from attnflow.benchmarks.machine import describe

GROWTH_TARGET = 5.0  # percent, from recording 50 to the last


def resident_bytes() -> int:
    """The process's current resident set (Linux /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(recordings: int = 1000, settle: int = 50, every: int = 50) -> dict[str, Any]:
    """Record the tiny LLaVA's sample prompts ``recordings`` times; resident set every ``every``."""
    if not 0 < settle < recordings:
        raise ValueError(f"settle ({settle}) must lie between 0 and recordings ({recordings})")
    model, processor = tiny.build("llava")
    examples = tiny.sample_prompts("llava")
    curve: dict[int, int] = {}
    start = time.perf_counter()
    for i in range(1, recordings + 1):
        record(model, examples, processor=processor, progress=False)
        if i % every == 0 or i in (settle, recordings):
            curve[i] = resident_bytes()
    seconds = time.perf_counter() - start
    growth = 100 * (curve[recordings] - curve[settle]) / curve[settle]
    return {"recordings": recordings, "examples_per_recording": len(examples),
            "model": "toy-llava (attnflow.toys.tiny)", "settle": settle,
            "rss_mb_after_settle": curve[settle] / 2**20, "rss_mb_after_all": curve[recordings] / 2**20,
            "growth_percent": growth,
            "growth_kb_per_recording": (curve[recordings] - curve[settle]) / 1024 / (recordings - settle),
            "target_percent": GROWTH_TARGET, "target_met": growth < GROWTH_TARGET, "seconds": seconds,
            "rss_mb_curve": {str(k): v / 2**20 for k, v in sorted(curve.items())}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recordings", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps({**run(args.recordings), "machine": describe()}))


if __name__ == "__main__":
    main()
