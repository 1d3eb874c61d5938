"""The reducers the field compares against, as Schedules for a given model.

FastV (arXiv 2403.06764): at layer K=2 keep the visual tokens the last position attends to
most, R=50% dropped. PyramidDrop (arXiv 2410.17247): keep 50%, 25%, 12.5% at 1/4, 1/2, 3/4 of
the depth. ``fastv_at_flops`` gives FastV the FLOPs another schedule costs, for a like-for-like
comparison.
"""

from __future__ import annotations

import math

from torch import nn

from attnflow.probes import adapters
from attnflow.reducers.cost import Shape, predict
from attnflow.reducers.schedule import DEFAULT_PROTECT, Schedule

PDROP_STAGES = ((0.25, 0.5), (0.5, 0.25), (0.75, 0.125))  # (boundary as a share of depth, keep)


def fastv(model: nn.Module, keep: float = 0.5, layer: int = 2) -> Schedule:
    """FastV: prune visual tokens at ``layer`` (2, or the last layer of a shallower model)."""
    depth = len(adapters.decoder_layers(model))
    return Schedule.for_model(model, [{"op": "prune_visual", "layer": min(layer, depth - 1), "keep": keep}],
                              protect=DEFAULT_PROTECT)


def pdrop(model: nn.Module) -> Schedule:
    """PyramidDrop's defaults ([8, 16, 24] of 32 layers, keep 0.5/0.25/0.125) scaled to the depth."""
    depth = len(adapters.decoder_layers(model))
    stages: dict[int, float] = {}
    for share, keep in PDROP_STAGES:
        layer = min(depth - 1, max(1, math.floor(share * depth + 0.5)))
        stages[layer] = min(keep, stages.get(layer, 1.0))
    steps = [{"op": "prune_visual", "layer": k, "keep": v} for k, v in sorted(stages.items())]
    return Schedule.for_model(model, steps, protect=DEFAULT_PROTECT)


def fastv_at_flops(model: nn.Module, target: float, shape: Shape, layouts: list[tuple[int, int]]) -> Schedule:
    """FastV K=2 with the keep share whose predicted FLOPs ratio is closest to ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(30):  # the ratio grows with keep: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict(fastv(model, mid), shape, layouts)["flops_ratio"] < target else (lo, mid)
    return fastv(model, round(hi, 4))
