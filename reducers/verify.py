"""Verify a schedule against the unreduced model, beside the field's reducers: fidelity and cost.

For the schedule and the baselines (reducers.baselines: FastV, PyramidDrop, DART and DivPrune at
their published defaults; FastV, DART, DivPrune, random, pooling and the per-prompt dynamic exit
(reducers.dynamic, its threshold set so its realised mean FLOPs match) at the schedule's FLOPs)
the same inputs run greedy ``generate``
under ``reducers.apply``; each is compared with the unreduced model on: next-token top-1
agreement and KL(full ‖ reduced) at the last prompt position, greedy generated-token
agreement over ``new_tokens`` tokens, and task accuracy when the examples carry answers (the
generated text scored by probes.answers). Cost: the predicted FLOPs ratio (realised, per prompt,
for a dynamic exit: it saves them at batch size 1), T_eq and
KV-cache bytes (reducers.cost), and wall-clock prefill and per-token decode time (over at least
``DECODE_TIMED`` generated tokens) measured in this process, configurations interleaved in every repeat, medians. The rows form a Pareto
table of fidelity (accuracy when there are answers, else agreement) against FLOPs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnflow import parallel
from attnflow.probes import adapters
from attnflow.probes.inputs import as_examples
from attnflow.reducers.apply import apply
from attnflow.reducers.baselines import matched, published
from attnflow.reducers.cost import Shape, fixed_share, forward_ratio, predict
from attnflow.reducers.dynamic import at_flops, realised
from attnflow.reducers.fidelity import (
    answer_accuracy,
    answers_right,
    encode_batches,
    generate_greedy,
    next_token_fidelity,
)
from attnflow.reducers.schedule import Schedule, load_schedule
from attnflow.reducers.speed import medians, speed
from attnflow.reducers.validation import paired_drop_bounds
from attnflow.reducers.verdict import Row, Verdict, mark_pareto


DECODE_TIMED = 8  # decode steps timed per generation at least: over fewer, noise swamps a few-ms step
# the per-prompt exit compared at the schedule's FLOPs: reads from layer 1 on, threshold set by at_flops
DYNAMIC_EXIT = {"op": "visual_exit_dynamic", "from": 1, "threshold": 0.0}


def _ratio(reference: float, reduced: float) -> float | None:
    """reference / reduced, None when either time is not positive (a verdict row keeps None then)."""
    return reference / reduced if reference > 0 and reduced > 0 else None


def verify(model: nn.Module, schedule: "Schedule | dict[str, Any] | str | Path", inputs: Any, processor: Any, *,
           new_tokens: int = 8, batch_size: int = 8, repeats: int = 5, baselines: bool = True) -> Verdict:
    """Fidelity and cost of ``schedule`` (and, with ``baselines``, of FastV and PyramidDrop)
    on ``inputs`` (Examples or a JSONL path), against the unreduced model; wall-clock time is
    measured on the first batch. Under a launcher the ranks split the generations and rank 0
    alone times; every rank returns the same Verdict."""
    sched = load_schedule(schedule)
    sched.check_model(model)
    if new_tokens < 1 or batch_size < 1 or repeats < 1:
        raise ValueError("new_tokens, batch_size and repeats must be positive")
    examples = as_examples(inputs)
    world = parallel.world()
    device = next(model.parameters()).device
    tok = getattr(processor, "tokenizer", processor)
    batches = encode_batches(processor, examples, batch_size, device)
    timing_batch = encode_batches(processor, examples[:batch_size], len(examples), device)[0]
    one = encode_batches(processor, examples[:1], 1, device)[0]
    image_id = adapters.image_token_id(model)
    layouts = [(int(am.sum()), int(((ids == image_id) & am.bool()).sum()) if image_id is not None else 0)
               for b in batches for ids, am in zip(b["input_ids"], b["attention_mask"])]
    shape = Shape.of(model)
    schedules: dict[str, Schedule] = {"schedule": sched}
    costs = {"schedule": _cost(model, sched, shape, layouts, batches)}
    if baselines:
        target = costs["schedule"]["flops_ratio"]
        schedules.update({**published(model), **matched(model, target, shape, layouts)})
        dynamic = at_flops(model, Schedule.for_model(model, [DYNAMIC_EXIT]), batches, target)
        schedules["dynamic_exit_equal_flops"], costs["dynamic_exit_equal_flops"] = dynamic.schedule, dynamic.cost
    with torch.no_grad():
        full = generate_greedy(model, batches, tok, new_tokens)
        runs = {}
        for name, s in schedules.items():
            with apply(model, s):
                runs[name] = generate_greedy(model, batches, tok, new_tokens)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        configs = {"unreduced": None, **schedules}
        timing = (timing_batch,) if timing_batch["input_ids"].shape[0] == 1 else (timing_batch, one)
        timed = [{name: medians(t) for name, t in speed(model, configs, b, new_tokens=max(new_tokens, DECODE_TIMED),
                                                        repeats=repeats,
                                                        pad=pad).items()} for b in timing] if world.main else None
        timed = parallel.broadcast(timed)  # timed by rank 0 alone, the other ranks idle meanwhile
        times, times_b1 = timed[0], timed[-1]  # a timing batch of one prompt is timed once
    full_accuracy, full_by_type = answer_accuracy(full, examples)
    fixed = fixed_share(model, timing_batch)
    rows = []
    reference = answers_right(runs["schedule"], examples)
    for name, s in schedules.items():
        run = runs[name]
        fidelity = next_token_fidelity(full.first_logits, run.first_logits)
        accuracy, by_type = answer_accuracy(run, examples)
        cost = costs[name] if name in costs else predict(s, shape, layouts)
        t, t0, u, u0 = times[name], times["unreduced"], times_b1[name], times_b1["unreduced"]
        rows.append(Row(
            name=name, steps=s.steps,
            agreement=fidelity["agreement"], kl=fidelity["kl"], generation_agreement=float((full.tokens == run.tokens).float().mean()),
            accuracy=accuracy, accuracy_delta=None if accuracy is None else accuracy - full_accuracy,
            accuracy_by_type=by_type, flops_ratio=cost["flops_ratio"],
            visual_tokens_equivalent=cost["visual_tokens_equivalent"], kv_bytes=cost["kv_bytes"],
            kv_bytes_ratio=cost["kv_bytes_ratio"], decode_flops_ratio=cost["decode_flops_ratio"],
            prefill_ms=t["prefill_ms"], decode_ms_per_token=t["decode_ms_per_token"],
            prefill_speedup=_ratio(t0["prefill_ms"], t["prefill_ms"]),
            decode_speedup=_ratio(t0["decode_ms_per_token"], t["decode_ms_per_token"]),
            prefill_ms_b1=u["prefill_ms"], decode_ms_per_token_b1=u["decode_ms_per_token"],
            prefill_speedup_b1=_ratio(u0["prefill_ms"], u["prefill_ms"]),
            decode_speedup_b1=_ratio(u0["decode_ms_per_token"], u["decode_ms_per_token"]),
            versus_schedule=gap_bounds(answers_right(run, examples), reference),
            forward_flops_ratio=forward_ratio(cost, fixed), scoring_flops_ratio=cost["scoring_flops_ratio"]))
    mark_pareto(rows)
    return Verdict(model=sched.model, device=str(device), backend=adapters.attn_implementation(model),
                   dtype=str(next(model.parameters()).dtype).removeprefix("torch."), n_examples=len(examples),
                   new_tokens=new_tokens, repeats=repeats, timing_batch=int(timing_batch["input_ids"].shape[0]),
                   unreduced={"accuracy": full_accuracy, "accuracy_by_type": full_by_type,
                              "prefill_ms": times["unreduced"]["prefill_ms"],
                              "decode_ms_per_token": times["unreduced"]["decode_ms_per_token"],
                              "prefill_ms_b1": times_b1["unreduced"]["prefill_ms"],
                              "decode_ms_per_token_b1": times_b1["unreduced"]["decode_ms_per_token"],
                              "visual_tokens": costs["schedule"]["visual_tokens"],
                              "fixed_share": fixed},
                   rows=rows)


def gap_bounds(right: list[bool | None], reference: list[bool | None]) -> list[float] | None:
    """One-sided 95% (lower, upper) bounds on the accuracy of the answers ``right`` minus that of
    ``reference`` on the same prompts (``answers_right``; None: no answer), paired prompt by prompt
    (Tango's interval: only the prompts one gets right and the other wrong count); None without answers."""
    pairs = [(a, b) for a, b in zip(right, reference) if a is not None]
    if not pairs:
        return None
    ahead, behind = sum(a and not b for a, b in pairs), sum(b and not a for a, b in pairs)
    return list(paired_drop_bounds(ahead, behind, len(pairs)))


def _cost(model: nn.Module, schedule: Schedule, shape: Shape, layouts: list[tuple[int, int]],
          batches: list[dict]) -> dict[str, Any]:
    """The predicted cost of a static schedule; a dynamic exit's realised one on ``batches``."""
    if schedule.steps_of("visual_exit_dynamic"):
        return realised(model, schedule, batches).cost
    return predict(schedule, shape, layouts)


def verify_schedule(model: nn.Module, schedule: Schedule, inputs: Any, processor: Any,
                    budget: Any = None, **options: Any) -> Verdict:
    """``verify`` once, recording the result in ``schedule.verified`` (with ``within_budget``
    when a ``budget`` with ``holds()`` is given); ``options`` go to ``verify``."""
    verdict = verify(model, schedule, inputs, processor, **options)
    schedule.verified = verdict.verified()
    if budget is not None:
        schedule.verified["within_budget"] = budget.holds(schedule.verified)
    return verdict
