"""The Schedule contract (reducers, saved per model): which tokens each decoder layer keeps.

JSON form (``attnflow_schedule: 2``)::

    {"attnflow_schedule": 2,
     "model": {"model_type": "llava", "fingerprint": "sha256:...", "num_layers": 6},
     "protect": {"visual_sinks": [0, 5]},
     "steps": [{"op": "prune_visual", "layer": 2, "keep": 0.5, "by": "last_row"},
               {"op": "visual_exit", "layer": 5},
               {"op": "skip_layers", "layers": [4], "tokens": "visual"}],
     "derived_from": {...} | null, "predicted": {...}, "verified": {...}}

Semantics. Layers are 0-indexed decoder layers. ``prune_visual`` removes visual tokens from
``layer`` on, keeping ``round(keep * V)`` of each sample's V unprotected visual tokens (keep is
a share of the *original* count, so PyramidDrop's 0.5/0.25/0.125 are written as they are),
ranked ``by`` one of reducers.scores.SCORES from layer ``layer - 1``: ``last_row`` (default: the
head-mean attention the last prompt position pays them, FastV), ``random`` (with ``seed``),
``pool``, ``divprune``, ``dart``, ``cls`` or ``text`` (SparseVLM's raters). A prune step at layer 0 by ``random``, ``pool``,
``divprune`` or ``cls`` (scores that need no LLM attention; ``cls`` only there) drops its tokens
before the first decoder layer
(reducers.inputcut), as DivPrune does. ``"merge": true`` on a ``cls`` step is VisionZip's contextual
merge (arXiv 2412.04467): of the kept share, a sixth-and-a-bit (10 of VisionZip's 64) are contextual
tokens, each the sum of a target token and the mean of the dropped tokens most like it
(reducers.scores.contextual_merge); the rest are the dominant tokens by [CLS] attention.
``"recycle": true`` on any prune step is SparseVLM's token recycling (arXiv 2410.04417): of the
kept share, a few tokens (⌊n/10⌋+1 for the n = 30% best-scored of the dropped) are the centres of
density-peaks clusters of those dropped tokens, their states (entering the step's layer) replaced
by their cluster's mean; the rest are the top-scored (reducers.scores.recycle).
``"proportional": true`` on a layer-0 step is ToMe's proportional attention (arXiv 2210.09461): each
kept visual token stands for itself and the dropped ones whose nearest kept token (cosine of the LLM's
input embeddings) it is, and log(that count) is added to its attention logits in every layer, so the
softmax sees the image's share of attention as the unreduced model does (reducers.scores.proportional_sizes).
``visual_exit`` removes every unprotected visual token from ``layer`` on.
``visual_exit_dynamic`` (``{"op": "visual_exit_dynamic", "from": 2, "to": 6, "threshold": 0.05}``)
is the same exit decided per prompt during the prefill: after each layer l with
``from - 1 <= l <= to - 2``, the share of the head-mean attention the last prompt position pays
the sample's remaining unprotected visual tokens (the ``last_row`` score, FastV arXiv 2403.06764)
is summed, and the sample's unprotected visual tokens leave from layer l+1 at the first such
layer where that share is below ``threshold``; at layer ``to`` they leave anyway (omitted: never
forced, ``to`` = the number of layers). The criterion is observational: it reads the attention the
model pays anyway, not what removing the tokens would change (the knockout's causal question), so
it costs one attention row per layer and no extra forward. Threshold 0 removes nothing; a threshold
above 1 exits every sample at ``from``. A schedule holds at most one exit, static or dynamic; its
prune steps lie at or before ``from`` (after a dynamic exit nothing may be left to prune), and no
layer whose attention it reads (``from - 1`` to ``to - 2``) is skipped. ``skip_layers`` lets
tokens bypass whole layers (``tokens: "all"``) or lets only the unprotected visual tokens bypass
them (``"visual"``: their residual stream passes the layer unchanged, the other tokens do not
see them there). Only visual tokens are ever removed (BOS, system and text tokens always stay,
whatever the ops), and of those never the ones whose index among a sample's visual tokens
(0-based, across its images) is listed in ``protect.visual_sinks`` (indices rather than a flag,
so that a schedule applies on its own, without the findings it came from); protected sinks are
kept without taking a place in the ranking. A whole-layer skip acts on every token. Kept tokens keep their original
RoPE positions; pads are dropped with the first cut.

Apart from those, no op acts on layer 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from attnflow.errors import UserError
from attnflow.fileio import write_json
from attnflow.probes import adapters
from attnflow.reducers.scores import INPUT_SCORES, SCORES

SCHEDULE_VERSION = 2
OPS: tuple[str, ...] = ("prune_visual", "visual_exit", "visual_exit_dynamic", "skip_layers")
SKIP_TOKENS: tuple[str, ...] = ("all", "visual")
DEFAULT_PROTECT: dict[str, Any] = {"visual_sinks": []}
_STEP_KEYS: dict[str, dict[str, Any]] = {  # op -> {key: default, or ... when required}
    "prune_visual": {"layer": ..., "keep": ..., "by": "last_row", "seed": None, "merge": False,
                     "recycle": False, "proportional": False},
    "visual_exit": {"layer": ...},
    "visual_exit_dynamic": {"from": ..., "to": None, "threshold": ...},
    "skip_layers": {"layers": ..., "tokens": "all"},
}


class ScheduleError(UserError, ValueError):
    """A schedule is malformed, inconsistent, or made for another model."""


@dataclass
class Schedule:
    """A per-model pruning schedule (see the module docstring for the JSON and semantics)."""

    model: dict[str, Any]
    steps: list[dict[str, Any]]
    protect: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_PROTECT)))
    derived_from: dict[str, Any] | None = None
    predicted: dict[str, Any] = field(default_factory=dict)
    verified: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checked = _validate(self.to_dict(), "schedule")
        self.steps, self.protect = checked["steps"], checked["protect"]

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @classmethod
    def for_model(cls, model: nn.Module, steps: list[dict[str, Any]], *,
                  protect: dict[str, Any] | None = None, **extra: Any) -> "Schedule":
        """A schedule of ``steps`` stamped with ``model``'s type, fingerprint and depth."""
        return cls(model=model_info(model), steps=steps,
                   protect=protect if protect is not None else dict(DEFAULT_PROTECT), **extra)

    @classmethod
    def from_dict(cls, data: Any, source: str = "schedule") -> "Schedule":
        """Validate a schedule's JSON form; every problem is a ScheduleError naming ``source``."""
        d = _validate(data, source)
        return cls(model=d["model"], steps=d["steps"], protect=d["protect"],
                   derived_from=d.get("derived_from"), predicted=dict(d.get("predicted") or {}),
                   verified=dict(d.get("verified") or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"attnflow_schedule": SCHEDULE_VERSION, "model": dict(self.model),
                "protect": dict(self.protect),
                "steps": [dict(s) for s in self.steps], "derived_from": self.derived_from,
                "predicted": dict(self.predicted), "verified": dict(self.verified)}

    def save(self, path: str | Path) -> Path:
        """Write the schedule's JSON to ``path``, atomically."""
        return save_schedule(self, path)

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model other than the one the schedule was made for (type, config fingerprint)."""
        info = model_info(model)
        for key in ("model_type", "fingerprint", "num_layers"):
            if info[key] != self.model[key]:
                raise ScheduleError(
                    f"this schedule was made for {self.model['model_type']} {self.model['fingerprint']} "
                    f"({self.model['num_layers']} layers), not for this {info['model_type']} "
                    f"{info['fingerprint']} ({info['num_layers']} layers): {key} differs. "
                    "Derive a schedule for this model (attnflow schedule).")

    def steps_of(self, op: str) -> list[dict[str, Any]]:
        return [s for s in self.steps if s["op"] == op]


def model_info(model: nn.Module) -> dict[str, Any]:
    """The ``model`` section of a schedule for ``model``."""
    return {"model_type": str(model.config.model_type), "fingerprint": adapters.fingerprint(model),
            "num_layers": len(adapters.decoder_layers(model))}


def load_schedule(source: "str | Path | dict[str, Any] | Schedule") -> Schedule:
    """A Schedule from a Schedule, its dict, or the path of its JSON file."""
    if isinstance(source, Schedule):
        return source
    if isinstance(source, dict):
        return Schedule.from_dict(source)
    path = Path(source)
    if not path.is_file():
        raise ScheduleError(f"schedule file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ScheduleError(f"{str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                            f"column {exc.colno}") from exc
    return Schedule.from_dict(data, str(path))


def save_schedule(schedule: Schedule, path: str | Path) -> Path:
    """Write ``schedule`` as JSON, atomically."""
    return write_json(path, schedule.to_dict())


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ScheduleError(f"{where} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _number(value: Any, where: str, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi \
            or not math.isfinite(value):
        span = f"in [{lo:g}, {hi:g}]" if hi < math.inf else f">= {lo:g} and finite"
        raise ScheduleError(f"{where} must be a number {span}, got {value!r}")
    return float(value)


def exit_checks(step: dict[str, Any], num_layers: int) -> range:
    """The layers whose last-row attention a ``visual_exit_dynamic`` step reads: ``from - 1``
    to ``to - 2`` (the share after layer l decides an exit at l + 1; at ``to`` all leave anyway)."""
    return range(step["from"] - 1, (step["to"] or num_layers) - 1)


def _step(raw: Any, where: str, num_layers: int) -> dict[str, Any]:
    if not isinstance(raw, dict) or "op" not in raw:
        raise ScheduleError(f"{where} must be an object with an 'op' key, got {raw!r}")
    op = raw["op"]
    if op not in _STEP_KEYS:
        raise ScheduleError(f"{where}: unknown op {op!r}; supported ops: {', '.join(OPS)}")
    spec = _STEP_KEYS[op]
    unknown = sorted(set(raw) - set(spec) - {"op"})
    if unknown:
        raise ScheduleError(f"{where} ({op}): unknown key(s) {unknown}; allowed: {sorted(spec)}")
    missing = [k for k, v in spec.items() if v is ... and k not in raw]
    if missing:
        raise ScheduleError(f"{where} ({op}): missing key(s) {missing}")
    step = {"op": op, **{k: raw.get(k, v) for k, v in spec.items()}}
    last = num_layers - 1
    if "layer" in step:  # layer 0 (before the first decoder layer): prune steps whose score needs no attention
        low = 0 if op == "prune_visual" and raw.get("by") in INPUT_SCORES else 1
        _int(step["layer"], f"{where} ({op}) layer", low, last)
    if op == "prune_visual":
        step["keep"] = _number(step["keep"], f"{where} (prune_visual) keep", 0.0, 1.0)
        if step["by"] not in SCORES:
            raise ScheduleError(f"{where} (prune_visual) by must be one of {list(SCORES)}, got {step['by']!r}")
        if step["by"] == "cls" and step["layer"] != 0:
            raise ScheduleError(f"{where} (prune_visual): by='cls' (the vision tower's [CLS] attention) acts before "
                                "the first decoder layer only: layer 0")
        if step["by"] == "random":
            step["seed"] = _int(0 if step["seed"] is None else step["seed"], f"{where} (prune_visual) seed", 0, 2**63 - 1)
        elif step.pop("seed") is not None:
            raise ScheduleError(f"{where} (prune_visual): seed applies to by='random' only")
        merge, recycle, proportional = step.pop("merge"), step.pop("recycle"), step.pop("proportional")
        for key, value in (("merge", merge), ("recycle", recycle), ("proportional", proportional)):
            if not isinstance(value, bool):
                raise ScheduleError(f"{where} (prune_visual) {key} must be true or false, got {value!r}")
            if value:
                step[key] = True
        if merge and step["by"] != "cls":
            raise ScheduleError(f"{where} (prune_visual): merge is VisionZip's contextual merge, for by='cls' only")
        if proportional and step["layer"] != 0:
            raise ScheduleError(f"{where} (prune_visual): proportional attention weighs the kept tokens before the "
                                "first decoder layer, for every layer: layer 0 only")
        if merge and recycle:
            raise ScheduleError(f"{where} (prune_visual): merge and recycle are two ways to keep dropped tokens' "
                                "content; a step takes one")
    if op == "visual_exit_dynamic":
        start = _int(step["from"], f"{where} (visual_exit_dynamic) from", 1, last)
        if step["to"] is not None:
            _int(step["to"], f"{where} (visual_exit_dynamic) to", start + 1, last)
        step["threshold"] = _number(step["threshold"], f"{where} (visual_exit_dynamic) threshold", 0.0)
    if op == "skip_layers":
        layers = step["layers"]
        if not isinstance(layers, list) or not layers:
            raise ScheduleError(f"{where} (skip_layers) layers must be a non-empty list, got {layers!r}")
        step["layers"] = sorted({_int(x, f"{where} (skip_layers) layer", 1, last) for x in layers})
        if step["tokens"] not in SKIP_TOKENS:
            raise ScheduleError(f"{where} (skip_layers) tokens must be one of {list(SKIP_TOKENS)}, "
                                f"got {step['tokens']!r}")
    return step


def _check_consistent(steps: list[dict[str, Any]], source: str, num_layers: int) -> None:
    """Cross-step rules: one exit, pruning before it, ranked and read layers present, shrinking keeps."""
    exits = [s["layer"] for s in steps if s["op"] == "visual_exit"]
    dynamic = [s for s in steps if s["op"] == "visual_exit_dynamic"]
    if len(exits) + len(dynamic) > 1:
        raise ScheduleError(f"{source}: more than one exit step (visual_exit or visual_exit_dynamic); a dynamic "
                            "exit's static bound is its 'to'")
    skipped: dict[int, str] = {}
    for s in steps:
        if s["op"] == "skip_layers":
            for layer in s["layers"]:
                if layer in skipped:
                    raise ScheduleError(f"{source}: layer {layer} is listed by two skip_layers steps")
                skipped[layer] = s["tokens"]
    prunes = sorted((s for s in steps if s["op"] == "prune_visual"), key=lambda s: s["layer"])
    for prev, cur in zip(prunes, prunes[1:]):
        if cur["layer"] == prev["layer"]:
            raise ScheduleError(f"{source}: two prune_visual steps at layer {cur['layer']}")
        if cur["keep"] > prev["keep"]:
            raise ScheduleError(f"{source}: prune_visual keep must not grow with depth "
                                f"(layer {prev['layer']}: {prev['keep']}, layer {cur['layer']}: {cur['keep']})")
    for s in prunes:
        if exits and s["layer"] >= exits[0]:
            raise ScheduleError(f"{source}: prune_visual at layer {s['layer']} comes at or after the "
                                f"visual_exit at layer {exits[0]}: no visual token is left to prune")
        if s["layer"] - 1 in skipped:
            raise ScheduleError(f"{source}: prune_visual at layer {s['layer']} ranks tokens by the "
                                f"attention of layer {s['layer'] - 1}, which visual tokens skip")
        if dynamic and s["layer"] > dynamic[0]["from"]:
            raise ScheduleError(f"{source}: prune_visual at layer {s['layer']} comes after the visual_exit_dynamic "
                                f"from layer {dynamic[0]['from']}, when a sample's visual tokens may have left")
    for s in dynamic:
        read = [layer for layer in exit_checks(s, num_layers) if layer in skipped]
        if read:
            raise ScheduleError(f"{source}: visual_exit_dynamic reads the attention of layer(s) {read}, which "
                                "skip_layers lets tokens bypass")


def _validate(data: Any, source: str) -> dict[str, Any]:
    """Check a schedule's JSON form and return it normalised (defaults filled in)."""
    if not isinstance(data, dict):
        raise ScheduleError(f"{source}: a schedule is a JSON object, got {type(data).__name__}")
    version = data.get("attnflow_schedule")
    if version != SCHEDULE_VERSION:
        raise ScheduleError(f"{source}: 'attnflow_schedule' must be {SCHEDULE_VERSION}, got {version!r} "
                            "(not an attnflow schedule, or from another version)")
    model = data.get("model")
    if not isinstance(model, dict) or any(k not in model for k in ("model_type", "fingerprint", "num_layers")):
        raise ScheduleError(f"{source}: 'model' must hold model_type, fingerprint and num_layers, got {model!r}")
    num_layers = _int(model["num_layers"], f"{source}: model.num_layers", 2, 1_000_000)
    protect = data.get("protect", DEFAULT_PROTECT)
    if not isinstance(protect, dict) or set(protect) - set(DEFAULT_PROTECT):
        raise ScheduleError(f"{source}: 'protect' takes only {sorted(DEFAULT_PROTECT)}, got {protect!r}")
    sinks = protect.get("visual_sinks", [])
    if not isinstance(sinks, list):
        raise ScheduleError(f"{source}: protect.visual_sinks must be a list of visual-token indices")
    sinks = sorted({_int(i, f"{source}: protect.visual_sinks entry", 0, 1_000_000) for i in sinks})
    steps = data.get("steps")
    if not isinstance(steps, list):
        raise ScheduleError(f"{source}: 'steps' must be a list, got {steps!r}")
    steps = [_step(s, f"{source}: steps[{i}]", num_layers) for i, s in enumerate(steps)]
    _check_consistent(steps, source, num_layers)
    for key in ("predicted", "verified"):
        if not isinstance(data.get(key) or {}, dict):
            raise ScheduleError(f"{source}: {key!r} must be an object")
    return {**data, "model": dict(model), "steps": steps, "protect": {"visual_sinks": sinks}}
