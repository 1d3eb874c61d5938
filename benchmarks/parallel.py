"""`python -m attnflow.benchmarks.parallel`: wall time of `attnflow record` and of `attnflow analyze`
(knockout and logit lens included) in one process and under `torchrun --nproc-per-node N`.

Runs the CLI as a user does, on the default trained model's held-out prompts: one process with
one thread, one process with N threads (the same cores as N ranks), and N ranks of one thread
each; the commands alternate within every round. Outputs of the N-rank runs are checked equal to
the one-process ones. Writes ``benchmarks/results/parallel.{json,md}`` atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from attnflow import DEFAULT_MODEL
from attnflow.benchmarks.machine import describe
from attnflow.fileio import write_json, write_text
from attnflow.models import default_inputs
from attnflow.probes.io import load_trace

RESULTS = Path("benchmarks") / "results"
ATTNFLOW = str(Path(sys.executable).parent / "attnflow")


def command(args: list[str], ranks: int) -> list[str]:
    """The argv of one attnflow command, under torchrun when ``ranks`` > 1."""
    if ranks == 1:
        return [ATTNFLOW, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "--no-python", ATTNFLOW, *args]


def timed(args: list[str], ranks: int, threads: int, cwd: Path) -> float:
    """Seconds one command takes from launch to exit (model loading included)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command(args, ranks), cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--limit", type=int, default=128, help="held-out prompts used")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="attnflow-bench-parallel-"))
    source = default_inputs(opts.model)
    inputs = work / "inputs.jsonl"
    lines = [json.loads(line) for line in source.read_text().splitlines()[:opts.limit]]
    for row in lines:  # image paths made absolute: the copy lives elsewhere
        row["images"] = [str(source.parent / p) for p in ([row.pop("image")] if "image" in row else row.pop("images", []))]
    inputs.write_text("".join(json.dumps(row) + "\n" for row in lines))
    configs = {"1 process, 1 thread": (1, 1), f"1 process, {opts.ranks} threads": (1, opts.ranks),
               f"{opts.ranks} processes, 1 thread each": (opts.ranks, 1)}
    stages = {"record": lambda tag: ["record", "--model", opts.model, "--inputs", str(inputs), "--out",
                                     f"{tag}.nc", "--batch-size", "16"],
              "analyze": lambda tag: ["analyze", f"{tag}.nc", "--model", opts.model, "--out", f"{tag}.json",
                                      "--batch-size", "16"]}
    seconds: dict[str, dict[str, list[float]]] = {s: {c: [] for c in configs} for s in stages}
    for _ in range(opts.rounds):
        for name, (ranks, threads) in configs.items():
            tag = f"r{ranks}t{threads}"
            for stage, args in stages.items():
                seconds[stage][name].append(timed(args(tag), ranks, threads, work))
    one, many = f"r1t{opts.ranks}", f"r{opts.ranks}t1"
    diff = float(max(np.nanmax(np.abs(load_trace(work / f"{one}.nc")[v].values
                                      - load_trace(work / f"{many}.nc")[v].values))
                     for v in ("received", "last_row", "resid_last")))
    findings = [json.loads((work / f"{t}.json").read_text()) for t in (one, many)]
    result = {"model": opts.model, "prompts": len(lines), "ranks": opts.ranks, "rounds": opts.rounds,
              "seconds": {s: {c: statistics.median(v) for c, v in per.items()} for s, per in seconds.items()},
              "all_seconds": seconds, "trace_max_abs_diff": diff,
              "same_exit": findings[0]["exit"]["layers"] == findings[1]["exit"]["layers"],
              "machine": describe()}
    rows = ["| stage | " + " | ".join(configs) + " |", "|---" * (len(configs) + 1) + "|"]
    for stage, per in result["seconds"].items():
        rows.append(f"| {stage} | " + " | ".join(f"{per[c]:.1f} s" for c in configs) + " |")
    text = (f"# Data parallelism: wall time, {opts.model}, {len(lines)} prompts\n\n"
            f"Median of {opts.rounds} rounds, each command from launch to exit (model loading included); "
            f"{result['machine']['cores']} cores, {result['machine']['cpu']}, {result['machine']['date']}.\n\n"
            + "\n".join(rows) + f"\n\nTrace of {opts.ranks} ranks vs one process: max |diff| {diff:.2g}; "
            f"same exit layers: {result['same_exit']}.\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "parallel.json", result)
    write_text(RESULTS / "parallel.md", text)
    print(text)


if __name__ == "__main__":
    main()
