"""`python -m attnflow.benchmarks.proportional`: DivPrune before the LLM with and without ToMe's
proportional attention (arXiv 2210.09461), at DivPrune's published keep (9.8%) and wider, on every
trained model.

Per model, fresh prompts of its task drawn from a seed of their own (neither a training, calibration
nor held-out seed), the unreduced model's greedy answers, and for each keep the net accuracy drop
(answers broken less answers fixed) with its paired one-sided 95% bounds (Tango's, as derive
validates) and the mean next-token KL. Writes ``benchmarks/results/proportional.{json,md}``
atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from attnflow.fileio import write_json, write_text
from attnflow.models import load_model
from attnflow.reducers import Schedule
from attnflow.reducers.derive import Probe
from attnflow.reducers.validation import paired_drop_bounds
from attnflow.benchmarks.schedules import task_prompts

RESULTS = Path("benchmarks") / "results"
SEED = 20_261_128
MODELS = ("toy-llava-scenes", "toy-idefics3-scenes", "toy-vlm")
KEEPS = (0.098, 0.2, 0.4)


def run_model(name: str, n: int, keeps: tuple[float, ...] = KEEPS, batch_size: int = 16) -> dict[str, Any]:
    """Net accuracy drop (points, with 95% bounds) and mean KL of DivPrune at each keep, plain and proportional."""
    model, processor = load_model(name)
    probe = Probe(model, processor, task_prompts(name, n, SEED), batch_size)
    rows = []
    for keep in keeps:
        for proportional in (False, True):
            step = {"op": "prune_visual", "layer": 0, "keep": keep, "by": "divprune", "proportional": proportional}
            losses = probe.losses(Schedule.for_model(model, [step]), 0, len(probe.batches))
            broken, fixed = int(losses.broken.sum()), int(losses.fixed.sum())
            low, high = paired_drop_bounds(broken, fixed, n)
            rows.append({"keep": keep, "proportional": proportional, "broken": broken, "fixed": fixed,
                         "drop_points": 100 * (broken - fixed) / n, "drop_bounds_points": [100 * low, 100 * high],
                         "kl": float(losses.kl.mean())})
    return {"model": name, "prompts": n, "unreduced_accuracy": float(np.mean(probe.right)), "rows": rows}


def markdown(results: list[dict[str, Any]]) -> str:
    """One table per model: plain against proportional at each keep."""
    out = ["# DivPrune with and without proportional attention", "", __doc__.split("\n\n")[1].replace("\n", " ")]
    for res in results:
        out += ["", f"## {res['model']} ({res['prompts']} prompts, unreduced accuracy {100 * res['unreduced_accuracy']:.2f}%)",
                "", "| keep | proportional attention | net drop (points) | one-sided 95% bounds | broken / fixed | KL |",
                "|---|---|---|---|---|---|"]
        for r in res["rows"]:
            lo, hi = r["drop_bounds_points"]
            out.append(f"| {100 * r['keep']:.1f}% | {'yes' if r['proportional'] else 'no'} | {r['drop_points']:.2f} | "
                       f"{lo:.2f} to {hi:.2f} | {r['broken']} / {r['fixed']} | {r['kl']:.4f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--prompts", type=int, default=1600)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    results = [run_model(name, args.prompts) for name in args.models]
    write_json(args.out / "proportional.json", results)
    write_text(args.out / "proportional.md", markdown(results))
    print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
