"""What reducing buys: prefill and per-token decode wall-clock of FastV (K=2, R=50%),
PyramidDrop, DivPrune (keep 9.8%, before the LLM) and a derived schedule against the unreduced model, beside each one's predicted
FLOPs ratio (attnflow.reducers.cost) and its attainable speedup (attnflow.reducers.speed.attainable:
the decoder layers timed alone at the widths the configuration gives them, as if shortening cost
nothing).

Every configuration runs the same model object under ``attnflow.reducers.apply`` (real
shortening), timed by the harness ``verify`` uses (attnflow.reducers.speed): one process, all
configurations alternated, decode per token = the N decode steps of a generation of N+1 tokens,
stamped inside it as each token's logits arrive, per round.
``python -m attnflow.benchmarks.reducers`` prints the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnflow import timing
from attnflow.probes import adapters
from attnflow.reducers.baselines import fastv, pdrop, published
from attnflow.reducers.cost import Shape, fixed_share, forward_ratio, predict
from attnflow.reducers.schedule import Schedule, load_schedule
from attnflow.reducers.speed import attainable, layer_widths, speed
from attnflow.benchmarks import shapes
from attnflow.benchmarks.machine import describe, gpu_name

# measured prefill speedup >= 0.85 x the speedup the forward's FLOPs predict (the decoder layers' by the cost
# model, the vision tower's and unembedding's as counted: reducers.cost.fixed_share); decode the same
SPEEDUP_TARGET = 0.85
DECODE_FLOOR = 1.0  # a decode step under a schedule is no slower than the unreduced model's
# decode steps timed per generation: a schedule's first decode step carries its layer hooks and one sync
# (later ones run without them when nothing is cut), a one-off that 8 tokens would weigh four times as much
DECODE_TOKENS = 32


def configs(schedule: Schedule | None, model: nn.Module) -> dict[str, Schedule | None]:
    """The benchmark's configurations: unreduced, FastV (K=2, 50%), PDrop, DivPrune at its default and
    ``schedule`` when given."""
    out: dict[str, Schedule | None] = {"unreduced": None, "fastv": fastv(model, keep=0.5, layer=2),
                                       "pdrop": pdrop(model), "divprune": published(model)["divprune"]}
    if schedule is not None:
        out["schedule"] = schedule
    return out


def run_model(model: nn.Module, batch: dict[str, torch.Tensor], *, pad_token_id: int,
              schedule: Schedule | None = None, repeats: int = 5, new_tokens: int = DECODE_TOKENS,
              device: str = "cpu") -> dict[str, Any]:
    """Measured prefill and decode speedups of each configuration next to its predicted ratios."""
    chosen = configs(schedule, model)
    timed = speed(model, chosen, batch, new_tokens=new_tokens, repeats=repeats, pad=pad_token_id)
    image = adapters.image_token_id(model)
    layout = [(int(am.sum()), int(((ids == image) & am).sum()))
              for ids, am in zip(batch["input_ids"], batch["attention_mask"].bool())]
    shape = Shape.of(model)
    unreduced_s = timing.stats(timed["unreduced"]["prefill"], timed["unreduced"]["prefill"])["median_s"]
    fixed = fixed_share(model, batch)
    widths = {name: layer_widths(model, s, batch) for name, s in chosen.items() if s is not None}
    # the decoder layers timed alone: 10 rounds per speed round at batch 1, fewer (at least 3) for a batch whose
    # layer calls take seconds
    reachable = attainable(model, widths, batch, unreduced_s, repeats=max(3, 10 * repeats // len(batch["input_ids"])))
    rows: dict[str, Any] = {}
    for name, s in chosen.items():
        pred = predict(s, shape, layout) if s is not None else {"flops_ratio": 1.0, "decode_flops_ratio": 1.0,
                                                                          "scoring_flops_ratio": 0.0}
        row: dict[str, Any] = {"steps": s.steps if s is not None else [], "predicted_flops_ratio": pred["flops_ratio"],
                               "predicted_speedup": 1 / pred["flops_ratio"],
                               "predicted_forward_speedup": 1 / forward_ratio(pred, fixed),
                               "predicted_decode_flops_ratio": pred["decode_flops_ratio"],
                               "predicted_decode_speedup": 1 / pred["decode_flops_ratio"]}
        for tag in ("", "cpu_"):
            prefill = timing.stats(timed[name][f"{tag}prefill"], timed["unreduced"][f"{tag}prefill"])
            dec = timing.stats(timed[name][f"{tag}decode"], timed["unreduced"][f"{tag}decode"])
            row.update({f"{tag}prefill_min_s": prefill["min_s"], f"{tag}prefill_median_s": prefill["median_s"],
                        f"{tag}prefill_speedup": 1 / prefill["ratio_median"],
                        f"{tag}prefill_speedup_min": 1 / prefill["ratio_min"],
                        f"{tag}decode_median_s_per_token": dec["median_s"],
                        f"{tag}decode_speedup": 1 / dec["ratio_median"]})
        if s is not None:
            row["speedup_vs_predicted"] = row["prefill_speedup"] / row["predicted_speedup"]
            row["cpu_speedup_vs_predicted"] = row["cpu_prefill_speedup"] / row["predicted_speedup"]
            row["speedup_vs_forward"] = row["prefill_speedup"] / row["predicted_forward_speedup"]
            row["target_met"] = row["speedup_vs_forward"] >= SPEEDUP_TARGET
            row["decode_vs_predicted"] = row["decode_speedup"] / row["predicted_decode_speedup"]
            row["decode_target_met"] = (row["decode_speedup"] >= DECODE_FLOOR
                                        and row["decode_vs_predicted"] >= SPEEDUP_TARGET)
            row["attainable_speedup"] = reachable[name]
            row["speedup_vs_attainable"] = row["prefill_speedup"] / reachable[name]
        rows[name] = row
    return {"tokens": layout[0][0], "visual_tokens": layout[0][1], "fixed_share": fixed, "new_tokens": new_tokens,
            "repeats": repeats,
            "backend": adapters.attn_implementation(model), "dtype": str(next(model.parameters()).dtype)[6:],
            "configs": rows}


def run_llava_shaped(*, tokens: int = 600, shape: shapes.Shape = shapes.CPU_SHAPE, device: str = "cpu",
                     dtype: torch.dtype = torch.float32, repeats: int = 5, new_tokens: int = DECODE_TOKENS,
                     batch_size: int = 1) -> dict[str, Any]:
    """The reducer benchmark on a LLaVA-shaped random model (576 visual tokens at 600 tokens), the
    prompt repeated ``batch_size`` times in one batch."""
    model, processor, example = shapes.build(shape, tokens, device=device, dtype=dtype)
    batch = {k: v.repeat(batch_size, *[1] * (v.dim() - 1)) for k, v in shapes.encode(processor, example, device).items()}
    out = run_model(model, batch, pad_token_id=processor.tokenizer.pad_token_id, repeats=repeats,
                    new_tokens=new_tokens, device=device)
    label = shape.name if batch_size == 1 else f"{shape.name}, batch {batch_size}"
    return {"model": label, "batch_size": batch_size, "device": gpu_name() if device != "cpu" else "cpu", **out}


def run_toy_vlm(*, repeats: int = 5, new_tokens: int = DECODE_TOKENS, schedule_path: Path | None = None) -> dict[str, Any]:
    """The reducer benchmark on the trained toy VLM and one held-out prompt; with its derived
    schedule when ``schedule_path`` names one."""
    from attnflow.models import default_inputs, load_model
    from attnflow.probes.inputs import as_examples, encode

    model, processor = load_model("toy-vlm")
    schedule = load_schedule(schedule_path) if schedule_path else None
    batch = dict(encode(processor, as_examples(default_inputs("toy-vlm"))[:1]))
    tok = getattr(processor, "tokenizer", processor)
    out = run_model(model, batch, pad_token_id=tok.pad_token_id, schedule=schedule, repeats=repeats,
                    new_tokens=new_tokens)
    return {"model": "toy-vlm", "device": "cpu", "schedule": str(schedule_path) if schedule_path else None, **out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=DECODE_TOKENS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1, help="the LLaVA-shaped prompt repeated in one batch")
    parser.add_argument("--toy-vlm", action="store_true", help="the trained toy VLM instead of the LLaVA shape")
    parser.add_argument("--schedule", type=Path, help="the toy VLM's derived schedule (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = (run_toy_vlm(repeats=args.repeats, new_tokens=args.new_tokens, schedule_path=args.schedule)
           if args.toy_vlm else run_llava_shaped(tokens=args.tokens, repeats=args.repeats, new_tokens=args.new_tokens,
                                  batch_size=args.batch_size))
    print(json.dumps({**out, "machine": describe()}))


if __name__ == "__main__":
    main()
