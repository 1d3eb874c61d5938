"""`make bench`: every benchmark, written to ./benchmarks/results/latest.{json,md} (or --out) atomically.

CPU rows always; rows for a LLaVA-1.5-7B-shaped decoder in bf16 when a CUDA device is there
(marked with its name), and a line saying they were skipped when not. ``--smoke`` runs the
same code on a tiny model with one repeat, to check the machinery, not to measure.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnflow.fileio import write_json, write_text
from attnflow.benchmarks import probe, reducers, report, shapes, soak
from attnflow.benchmarks.machine import describe, gpu_name

RESULTS = Path("benchmarks") / "results"  # relative to where it runs: the repository root for `make bench`
METHOD = ("Times: methods alternated in one process, order rotated every round; min and median of the "
          "rounds, ratios to the plain forward as min/min and as the median of per-round ratios; targets are "
          "judged on the median per-round wall-clock ratio. The process's CPU time is given beside it: with "
          "one torch thread it is the work done, which other processes on the cores do not inflate. Peak "
          "memory (CPU): resident-set high-water mark above the level before one call, in a fresh process per "
          "method, after one warm-up call and malloc_trim. Models: LlavaForConditionalGeneration with random "
          "weights, a one-layer CLIP tower and the toy word-level vocabulary, one image (BOS + side² visual "
          "+ text).")


@dataclass(frozen=True)
class Plan:
    """How big and how often: the full benchmark or a smoke run."""

    shape: shapes.Shape
    probe_runs: tuple[tuple[int, int, int], ...]  # (tokens, repeats, warm-up rounds)
    reducer_tokens: int
    reducer_repeats: int
    reducer_batches: tuple[tuple[int, int], ...]  # on the CPU: (batch size, rounds) of the LLaVA-shaped prompt
    soak_recordings: int
    soak_settle: int
    memory: bool = True  # peak memory per method (on the CPU: a fresh process each)


# rounds of the reducer table: a decode step's ratio moves by 10% between spells of this shared machine,
# and the median of 5 per-round ratios followed them (0.95-1.05 for one schedule in two runs)
REDUCER_REPEATS = 15
# batch 16 of 600 tokens: 5 s an unreduced prefill here, so 3 rounds (each far steadier than a 0.3 s one)
FULL = Plan(shapes.CPU_SHAPE, ((600, 5, 1), (2400, 3, 1)), 600, REDUCER_REPEATS, ((1, REDUCER_REPEATS), (16, 3)),
            1000, 50)
SMOKE = Plan(shapes.SMOKE_SHAPE, ((40, 1, 0),), 40, 1, ((1, 1),), 4, 2, memory=False)
GPU_TOKENS = (600, 2400, 4096, 8192)
GPU_BATCHES = (1, 16)  # reducer rows: one prompt (launch-bound on a GPU) and a batch that fills it


def _toy_vlm() -> dict[str, Any] | None:
    """The reducer rows of the trained toy VLM, when data/toy-vlm is there (and its derived
    schedule, data/toy-vlm/schedule.json, when that is)."""
    from attnflow.models import ModelSpecError, resolve

    try:
        folder = resolve("toy-vlm")
    except ModelSpecError:
        return None
    derived = folder / "schedule.json"
    return reducers.run_toy_vlm(repeats=REDUCER_REPEATS, schedule_path=derived if derived.is_file() else None)


def _gpu(plan: Plan) -> tuple[list[dict], list[dict], str]:
    """(probe rows, reducer rows, a sentence) for the LLaVA-1.5-7B shape on the GPU, if any."""
    if not torch.cuda.is_available():
        return [], [], ("Skipped: no CUDA device here (torch.cuda.is_available() is False). With one, "
                        "`make bench` adds rows for a LLaVA-1.5-7B-shaped random decoder (d=4096, 32 layers, "
                        "32 heads, m=11008) in bf16, marked with the GPU's name.")
    shape = plan.shape if plan is SMOKE else shapes.LLAVA_7B_SHAPE
    runs = plan.probe_runs if plan is SMOKE else tuple((t, 5, 1) for t in GPU_TOKENS)
    rows = [probe.run(t, repeats=r, warmup=w, shape=shape, device="cuda", dtype=torch.bfloat16,
                      measure_memory=plan.memory) for t, r, w in runs]
    red = [reducers.run_llava_shaped(tokens=plan.reducer_tokens, shape=shape, device="cuda", dtype=torch.bfloat16,
                                     repeats=plan.reducer_repeats, batch_size=b) for b in GPU_BATCHES]
    return rows, red, f"Rows marked {gpu_name()}: {shape.name}-shaped random decoder in bf16."


def run_gpu(out: Path, command: str) -> dict[str, Any]:
    """Only the GPU rows (``--gpu-only``), written to ``out``/gpu.json and gpu.md."""
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": describe(), "command": command, "method": METHOD, "notes": [],
                               "reducers": [], "soak": None}
    results["probe"], results["reducers"], results["gpu"] = _gpu(FULL)
    results["seconds"] = time.perf_counter() - start
    results["targets"] = report.targets(results)
    write_json(out / "gpu.json", results)
    write_text(out / "gpu.md", report.markdown(results))
    return results


def run(plan: Plan, out: Path, threads: int, command: str) -> dict[str, Any]:
    """Run everything in ``plan``; write ``out``/latest.json and latest.md; return the results."""
    torch.set_num_threads(threads)
    machine = describe()
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine, "command": command, "method": METHOD, "notes": []}
    results["probe"] = [probe.run(t, repeats=r, warmup=w, shape=plan.shape, threads=threads,
                                  measure_memory=plan.memory) for t, r, w in plan.probe_runs]
    results["reducers"] = [reducers.run_llava_shaped(tokens=plan.reducer_tokens, shape=plan.shape, repeats=rounds,
                                                     batch_size=batch) for batch, rounds in plan.reducer_batches]
    toy = None if plan is SMOKE else _toy_vlm()
    if toy is not None:
        results["reducers"].append(toy)
    elif plan is not SMOKE:
        results["notes"].append("The trained toy VLM (data/toy-vlm) is not there yet: its reducer rows are missing.")
    results["soak"] = soak.run(plan.soak_recordings, settle=plan.soak_settle, every=max(1, plan.soak_settle))
    gpu_probe, gpu_reducers, results["gpu"] = _gpu(plan)
    results["probe"] += gpu_probe
    results["reducers"] += gpu_reducers
    results["seconds"] = time.perf_counter() - start
    results["targets"] = report.targets(results)
    write_json(out / "latest.json", results)
    write_text(out / "latest.md", report.markdown(results))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run every attnflow benchmark and write the results.")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for latest.json and latest.md")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, one repeat: checks the code, measures nothing")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU rows, to gpu.json and gpu.md")
    args = parser.parse_args(argv)
    command = "python -m attnflow.benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    results = (run_gpu(args.out, command.strip()) if args.gpu_only else
               run(SMOKE if args.smoke else FULL, args.out, args.threads, command.strip()))
    print(report.markdown(results))


if __name__ == "__main__":
    main()
