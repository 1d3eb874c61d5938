"""A training-free per-prompt visual exit (issue #14), derived from the findings, and the same
exit at the FLOPs of a static one.

``visual_exit_dynamic`` (reducers.schedule) lets each prompt's unprotected visual tokens leave
after the first layer at which the last prompt position pays them a share of its attention
below a threshold: FastV's attention allocation (arXiv 2403.06764) read online, during the
prefill. ``from_findings`` derives the step. Its threshold is the mean share the last
position pays visual tokens (the findings' ``observational_last`` curve) at layer E-1, E being
the findings' exit layer (the knockout's when present, else the observational one): the last
layer the static exit at E still lets them through, so a prompt leaves once it reads its visual
tokens less than the average prompt did there. Its ``from`` is the earliest exit layer of any
question type (the knockout's ``by_qtype``): before it no type of question can lose them
within the knockout's tolerance (without that, E). ``to`` is left to the caller: omitted,
a prompt whose share never falls keeps its visual tokens.

``at_flops`` compares it with a static schedule at equal average FLOPs: one pass with
threshold 0 (nothing leaves, so every share the exit could read is recorded, and the shares
of a prompt that has not left do not depend on the threshold) gives each prompt's exit layer
for any threshold; the threshold is bisected over the midpoints between the recorded shares
to the realised FLOPs closest to the target; a second pass runs the chosen schedule for real
and its realised cost (reducers.cost with the exit layers the planner recorded, ``realised``)
is returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from attnflow.analyses.findings import Findings
from attnflow.probes import adapters
from attnflow.reducers.apply import apply
from attnflow.reducers.cost import Shape, predict
from attnflow.reducers.plan import Planner
from attnflow.reducers.schedule import Schedule, ScheduleError, exit_checks


@dataclass
class Realised:
    """A dynamic-exit schedule and what it did on a set of prompts."""

    schedule: Schedule
    exits: list[int]  # per prompt, the realised exit layer (num_layers: its visual tokens stayed)
    cost: dict[str, float]  # reducers.cost.predict with those exits: the realised cost


def derived_step(findings: "Findings | dict[str, Any] | str | Path", num_layers: int) -> dict[str, Any]:
    """The ``visual_exit_dynamic`` step the findings suggest (see the module docstring)."""
    ex = Findings.load(findings).exit
    if not ex["applies"]:
        raise ScheduleError(f"the findings' exit analysis does not apply: {ex.get('reason')}")
    layers = ex["layers"]
    chosen = layers.get("knockout") or layers["observational"]
    exit_layer = min(max(int(chosen["layer"]), 1), num_layers)
    by_type = (layers.get("knockout") or {}).get("by_qtype") or {}
    start = min(max(min(by_type.values(), default=exit_layer), 1), num_layers - 1)
    return {"op": "visual_exit_dynamic", "from": start,
            "threshold": float(ex["curves"]["observational_last"][exit_layer - 1])}


def from_findings(model: nn.Module, findings: "Findings | dict[str, Any] | str | Path") -> Schedule:
    """A schedule of the one dynamic exit ``derived_step`` gives for ``model``."""
    return Schedule.for_model(model, [derived_step(findings, len(adapters.decoder_layers(model)))])


def with_threshold(schedule: Schedule, threshold: float) -> Schedule:
    """``schedule`` with its ``visual_exit_dynamic`` step's threshold set to ``threshold``."""
    if not schedule.steps_of("visual_exit_dynamic"):
        raise ScheduleError("the schedule has no visual_exit_dynamic step")
    steps = [{**s, "threshold": threshold} if s["op"] == "visual_exit_dynamic" else dict(s) for s in schedule.steps]
    return Schedule(model=dict(schedule.model), steps=steps, protect=dict(schedule.protect))


def realised(model: nn.Module, schedule: Schedule, batches: list[dict]) -> Realised:
    """Prefill ``batches`` (left-padded, as reducers.fidelity.encode_batches gives them) under
    ``schedule`` (one with a ``visual_exit_dynamic`` step): each prompt's exit layer and the realised cost."""
    exits, layouts = [], []
    for planner, batch in _prefills(model, schedule, batches):
        exits += planner.exit_layers.tolist()
        layouts += _layouts(model, batch)
    return Realised(schedule, exits, predict(schedule, Shape.of(model), layouts, exits))


def at_flops(model: nn.Module, schedule: Schedule, batches: list[dict], target: float) -> Realised:
    """``schedule``'s dynamic exit with the threshold whose realised mean FLOPs ratio over the
    prompts of ``batches`` is the closest to ``target`` (ties: the higher ratio)."""
    step = next(iter(schedule.steps_of("visual_exit_dynamic")), None)
    if step is None:
        raise ScheduleError("at_flops matches a visual_exit_dynamic step; the schedule has none")
    checks = exit_checks(step, schedule.num_layers)
    read, layouts = [], []
    for planner, batch in _prefills(model, with_threshold(schedule, 0.0), batches):
        read.append(torch.stack([planner.shares[layer] for layer in checks], 1).cpu())
        layouts += _layouts(model, batch)
    shares, shape = torch.cat(read), Shape.of(model)  # shares [P, layers read]
    edges = torch.cat([torch.zeros(1), shares.flatten().unique(), torch.ones(1)])
    candidates = [0.0, *((edges[1:] + edges[:-1]) / 2).tolist()[1:]]  # between consecutive shares; 0: none leaves
    leave_at = torch.tensor(list(checks)) + 1

    @cache
    def flops(i: int) -> float:
        below = shares < candidates[i]
        exits = torch.where(below.any(1), leave_at[below.int().argmax(1)], step["to"] or schedule.num_layers)
        return predict(schedule, shape, layouts, exits.tolist())["flops_ratio"]

    lo, hi = 0, len(candidates) - 1  # the ratio falls as the threshold grows: bisect to the first at or below target
    if flops(hi) > target:
        lo = hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if flops(mid) <= target else (mid + 1, hi)
    if lo > 0 and abs(flops(lo - 1) - target) <= abs(flops(lo) - target):
        lo -= 1
    return realised(model, with_threshold(schedule, candidates[lo]), batches)


def _layouts(model: nn.Module, batch: dict) -> list[tuple[int, int]]:
    """Per prompt of ``batch``: (real tokens, visual tokens), the layouts reducers.cost reads."""
    real = batch["attention_mask"].bool()
    visual = ((batch["input_ids"] == adapters.image_token_id(model)) & real).sum(1)
    return [(int(n), int(v)) for n, v in zip(real.sum(1), visual)]


def _prefills(model: nn.Module, schedule: Schedule, batches: list[dict]) -> Iterator[tuple[Planner, dict]]:
    """Prefill each batch under ``schedule``; yields its planner (what the prefill decided) and the batch."""
    with torch.no_grad():
        for batch in batches:
            with apply(model, schedule) as planner:
                model(**batch)
            yield planner, batch
