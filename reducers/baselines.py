"""The reducers the field compares against, as Schedules for a given model.

At their published defaults (``published``): FastV (arXiv 2403.06764): at layer K=2 keep the
visual tokens the last position attends to most, R=50% dropped. PyramidDrop (arXiv 2410.17247):
keep 50%, 25%, 12.5% at 1/4, 1/2, 3/4 of the depth. DART (arXiv 2502.11494): K=2, reduction
ratio 0.778 (keep 22.2%), duplication against pivots. DivPrune (arXiv 2503.02175): keep 9.8% by
max-min diversity of the LLM's input states, before the first decoder layer. VisionZip (arXiv
2412.04467): its 64-of-576 setting (keep 11.1%: 54 dominant tokens by the vision tower's [CLS]
attention, 10 contextual tokens merged from the rest), before the first decoder layer; only for
towers with a [CLS]. SparseVLM (arXiv
2410.04417): its 192-token setting, keep 300, 200 and 110 of 576 visual tokens from layers 2, 6
and 15 of 32 (scaled to the depth), ranked by its text raters' attention, with its token
recycling (v1.5; its v2.0 code turns recycling off), the recycled tokens counted in each keep.

At the FLOPs another schedule costs (``matched``), each method as one prune stage with the keep
share whose predicted FLOPs ratio is closest to it: FastV, DART and SparseVLM at K=2; DivPrune,
VisionZip, random and spatial pooling (the controls, arXiv 2511.02650 and 2510.07143) before the LLM.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import nn

from attnflow.probes import adapters
from attnflow.reducers.cost import Shape, predict
from attnflow.reducers.inputcut import available_scores, input_cut_refused
from attnflow.reducers.schedule import DEFAULT_PROTECT, Schedule

PDROP_STAGES = ((0.25, 0.5), (0.5, 0.25), (0.75, 0.125))  # (boundary as a share of depth, keep)
SPARSEVLM_STAGES = ((2 / 32, 300 / 576), (6 / 32, 200 / 576), (15 / 32, 110 / 576))


class Method(NamedTuple):
    """A method as one prune stage: its layer, score, published keep (None for the controls, which
    have no default) and whether it merges (VisionZip's contextual tokens) or recycles (SparseVLM)."""

    layer: int
    by: str
    keep: float | None
    merge: bool = False
    recycle: bool = False

    def stage(self, model: nn.Module, keep: float) -> Schedule:
        """This method as one stage keeping ``keep``."""
        return one_stage(model, keep, self.layer, self.by, merge=self.merge, recycle=self.recycle)


METHODS: dict[str, Method] = {
    "fastv": Method(2, "last_row", 0.5),
    "dart": Method(2, "dart", 0.222),
    "divprune": Method(0, "divprune", 0.098),
    "random": Method(0, "random", None),
    "pool": Method(0, "pool", None),
    "visionzip": Method(0, "cls", 64 / 576, merge=True),  # VisionZip's 64-token setting
    "sparsevlm": Method(2, "text", None, recycle=True),  # its default is three stages (``sparsevlm``): one at equal FLOPs
}


def one_stage(model: nn.Module, keep: float, layer: int, by: str = "last_row", *, merge: bool = False,
              recycle: bool = False) -> Schedule:
    """One ``prune_visual`` step at ``layer`` (or the last layer of a shallower model) ranked by ``by``
    (with VisionZip's contextual ``merge`` or SparseVLM's ``recycle``)."""
    depth = len(adapters.decoder_layers(model))
    flags = {key: True for key, on in (("merge", merge), ("recycle", recycle)) if on}
    step = {"op": "prune_visual", "layer": min(layer, depth - 1), "keep": keep, "by": by, **flags}
    return Schedule.for_model(model, [step], protect=DEFAULT_PROTECT)


def fastv(model: nn.Module, keep: float = 0.5, layer: int = 2) -> Schedule:
    """FastV: prune visual tokens at ``layer`` (2, or the last layer of a shallower model)."""
    return one_stage(model, keep, layer)


def _stages(model: nn.Module, stages: tuple[tuple[float, float], ...], by: str, recycle: bool = False) -> Schedule:
    """Prune steps at shares of the depth (rounded, at least layer 1), the smallest keep where two meet
    (each recycling, SparseVLM's, with ``recycle``)."""
    depth = len(adapters.decoder_layers(model))
    keeps: dict[int, float] = {}
    for share, keep in stages:
        layer = min(depth - 1, max(1, math.floor(share * depth + 0.5)))
        keeps[layer] = min(keep, keeps.get(layer, 1.0))
    flags = {"recycle": True} if recycle else {}
    steps = [{"op": "prune_visual", "layer": k, "keep": v, "by": by, **flags} for k, v in sorted(keeps.items())]
    return Schedule.for_model(model, steps, protect=DEFAULT_PROTECT)


def pdrop(model: nn.Module) -> Schedule:
    """PyramidDrop's defaults ([8, 16, 24] of 32 layers, keep 0.5/0.25/0.125) scaled to the depth."""
    return _stages(model, PDROP_STAGES, "last_row")


def sparsevlm(model: nn.Module) -> Schedule:
    """SparseVLM's 192-token setting ([2, 6, 15] of 32 layers, keep 300/200/110 of 576) scaled to the
    depth, recycling at each stage."""
    return _stages(model, SPARSEVLM_STAGES, "text", recycle=True)


def _methods(model: nn.Module) -> dict[str, Method]:
    """The methods that can serve ``model`` (VisionZip needs a [CLS] in its vision tower); those acting
    before the first decoder layer act at layer 1 where a family refuses that (``input_cut_refused``)."""
    usable, late = available_scores(model), input_cut_refused(model) is not None
    return {name: m._replace(layer=max(m.layer, 1)) if late else m for name, m in METHODS.items() if m.by in usable}


def published(model: nn.Module) -> dict[str, Schedule]:
    """Every method with a published default that can serve ``model``, at that default."""
    out = {name: m.stage(model, m.keep) for name, m in _methods(model).items() if m.keep is not None}
    return {"fastv": out["fastv"], "pdrop": pdrop(model), **{k: v for k, v in out.items() if k != "fastv"},
            "sparsevlm": sparsevlm(model)}


def at_flops(model: nn.Module, target: float, shape: Shape, layouts: list[tuple[int, int]],
             method: Method) -> Schedule:
    """``method`` as one stage with the keep share whose predicted FLOPs ratio is closest to ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(30):  # the ratio grows with keep: bisect
        mid = (lo + hi) / 2
        below = predict(method.stage(model, mid), shape, layouts)["flops_ratio"] < target
        lo, hi = (mid, hi) if below else (lo, mid)
    return method.stage(model, round(hi, 4))


def matched(model: nn.Module, target: float, shape: Shape, layouts: list[tuple[int, int]]) -> dict[str, Schedule]:
    """Every method at the FLOPs ratio ``target``, named ``<method>_equal_flops``."""
    return {f"{name}_equal_flops": at_flops(model, target, shape, layouts, m) for name, m in _methods(model).items()}
